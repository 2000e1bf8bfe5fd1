"""A plain description of every configured model and where its weights and pipeline are."""

from __future__ import annotations

import os
from typing import Any

from engine.config import Config
from engine.residency import ResidentModel


def describe_models(config: Config, resident: tuple[ResidentModel, ...]) -> list[dict[str, Any]]:
    here = {r.model_id: r for r in resident}
    rows = []
    for m in config.models.values():
        r = here.get(m.id)
        rows.append({
            "id": m.id, "display_name": m.display_name, "family": m.family, "good_at": m.good_at,
            "emoji": m.emoji, "source": m.source, "text_encoder_source": m.text_encoder_source,
            "steps": m.steps, "guidance": m.guidance, "steps_range": list(m.steps_range),
            "guidance_range": list(m.guidance_range), "offload": m.offload, "exclusive": m.exclusive,
            "weights": weights_state(m.source),
            "loaded": r is not None, "placement": r.placement if r else None,
            "memory_mb": round(r.nbytes / 2**20, 1) if r else None,
        })
    return rows


def weights_state(source: str) -> str:
    """'local folder', 'downloaded', 'not downloaded' or 'missing folder' - without network."""
    if os.path.isabs(source):
        return "local folder" if os.path.isdir(source) else "missing folder"
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, "model_index.json")
    return "downloaded" if isinstance(found, str) else "not downloaded"
