"""One generation on a loaded pipeline: the step callback (progress, previews, NaN check),
cancellation between steps, and the phase an out-of-memory happened in.

Runs on the GPU thread (``_blocking``); foreign errors leave as the engine's (errors.py).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

from engine.errors import JobCancelledError
from engine.jobs import GenerationParams
from engine.pipelines.errors import translate_error
from engine.pipelines.loaders import LoadedPipeline
from engine.config import PreviewSettings
from engine.pipelines.previews import LatentPreviewer, Preview
from engine.safety.prevention import check_latents_blocking

StepCallback = Callable[[int, int], None]  # (step 1-based, total)
PreviewCallback = Callable[[Preview], None]


def generate_blocking(loaded: LoadedPipeline, params: GenerationParams, *, on_step: StepCallback,
                      cancel: threading.Event, tiled_decode: bool = False, on_preview: PreviewCallback | None = None,
                      previews: PreviewSettings | None = None) -> Any:
    """Run one generation; returns a PIL image of exactly ``params.width x params.height``.

    Out of memory after the last denoising step is reported with the phase "decoding with"
    (the VAE decode), before it with "generating with"; ``tiled_decode`` decodes in tiles, a
    lower peak for a retry (engine.residency decides when). ``on_preview`` gets a small
    picture of the latents now and then (previews.py; no VAE decode)."""
    import torch

    pipe = loaded.pipe
    steps_done = 0
    previewer = None
    if on_preview is not None and (previews or PreviewSettings()).enabled:
        previewer = LatentPreviewer.for_pipeline(loaded.spec.family, pipe, params.width, params.height,
                                                 previews or PreviewSettings(), on_preview)

    def step_end(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        nonlocal steps_done
        if cancel.is_set():
            # diffusers' own stop flag, then raise so a cancelled job skips the VAE decode too.
            p._interrupt = True
            raise JobCancelledError("")
        # NaN latents never recover: stop here instead of denoising and decoding a black square.
        check_latents_blocking(kwargs.get("latents"), loaded.spec.id, i + 1)
        steps_done = i + 1
        on_step(i + 1, params.steps)
        if previewer is not None:
            previewer.observe_blocking(p, i + 1, params.steps, kwargs.get("latents"))
        return {}

    if cancel.is_set():
        raise JobCancelledError("")
    kwargs: dict[str, Any] = dict(
        prompt=params.prompt,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance,
        width=params.width,
        height=params.height,
        # A CPU generator gives the same starting noise on every device, so a seed means the
        # same picture on the CPU demo and the GPU bot.
        generator=torch.Generator("cpu").manual_seed(params.seed),
        callback_on_step_end=step_end,
        output_type="pil",
    )
    if params.negative_prompt and loaded.spec.family != "flux":
        # FLUX.1-dev is guidance-distilled: a negative prompt needs true CFG (twice the work), so
        # it is not passed (README, "The models").
        kwargs["negative_prompt"] = params.negative_prompt
    if loaded.spec.family == "hidream":
        _fit_hidream_area(pipe, params.width, params.height)
    if tiled_decode:
        pipe.vae.enable_tiling()
    try:
        with torch.inference_mode():
            image = pipe(**kwargs).images[0]
    except JobCancelledError:
        raise
    except BaseException as exc:
        phase = "decoding with" if steps_done >= params.steps else "generating with"
        raise translate_error(exc, loaded.spec.id, phase) from exc
    finally:
        if tiled_decode:
            pipe.vae.disable_tiling()  # tiles are for the retry only: the same seed, the same pixels
    if image.size != (params.width, params.height):
        # HiDream renders a fixed pixel area rounded to 16 px; bring it to the size asked for.
        from PIL import Image

        image = image.resize((params.width, params.height), Image.Resampling.LANCZOS)
    return image


def _fit_hidream_area(pipe: Any, width: int, height: int) -> None:
    """HiDream ignores width x height as such: it keeps the aspect ratio and renders an area of
    ``(default_sample_size * vae_scale_factor) ** 2``. Setting the sample size from the request
    makes that area the one asked for (exact for square sizes)."""
    pipe.default_sample_size = max(1, math.isqrt(width * height) // pipe.vae_scale_factor)
