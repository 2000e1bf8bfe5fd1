"""PNG encoding with the generation parameters embedded, so a saved file says how to remake it."""

from __future__ import annotations

import io
import json
from typing import Any

from engine.jobs import GenerationParams

SOFTWARE = "PromptPics"
PARAMS_KEY = "promptpics"  # one JSON text chunk with every parameter


def encode_png(image: Any, params: GenerationParams, model_display_name: str = "") -> bytes:
    """PIL image -> PNG bytes with iTXt chunks (UTF-8: prompts may hold any script or emoji)."""
    from PIL.PngImagePlugin import PngInfo

    meta = params_metadata(params, model_display_name)
    info = PngInfo()
    info.add_itxt("Software", SOFTWARE)
    info.add_itxt(PARAMS_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True))
    for key in ("prompt", "negative_prompt", "model", "seed", "steps", "guidance"):
        info.add_itxt(key, str(meta[key]))
    # The A1111-style "parameters" chunk, which most image viewers and UIs already read.
    info.add_itxt("parameters", a1111_parameters(params, model_display_name))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def params_metadata(params: GenerationParams, model_display_name: str = "") -> dict[str, Any]:
    return {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "model": params.model_id,
        "model_name": model_display_name or params.model_id,
        "seed": params.seed,
        "steps": params.steps,
        "guidance": params.guidance,
        "width": params.width,
        "height": params.height,
    }


def a1111_parameters(params: GenerationParams, model_display_name: str = "") -> str:
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    lines.append(
        f"Steps: {params.steps}, CFG scale: {params.guidance:g}, Seed: {params.seed}, "
        f"Size: {params.width}x{params.height}, Model: {model_display_name or params.model_id}"
    )
    return "\n".join(lines)


def read_png_metadata(png: bytes) -> dict[str, Any]:
    """The parameters embedded by ``encode_png`` (an empty dict for a PNG from elsewhere)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        text = getattr(image, "text", {}) or {}
    raw = text.get(PARAMS_KEY)
    return json.loads(raw) if raw else {}
