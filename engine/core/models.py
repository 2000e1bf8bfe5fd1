"""A plain description of every configured model and where its weights and pipeline are."""

from __future__ import annotations

import os
from collections.abc import Iterable
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
            "weights": source_state(m.source),
            "loaded": r is not None, "placement": r.placement if r else None,
            "memory_mb": round(r.nbytes / 2**20, 1) if r else None,
        })
    return rows


def source_state(source: str, marker: str = "model_index.json") -> str:
    """'local folder', 'downloaded', 'not downloaded' or 'missing folder' - without network.

    ``marker``: the file every snapshot of that kind has (a diffusers pipeline's
    model_index.json, a transformers model's config.json)."""
    if os.path.isabs(source):
        return "local folder" if os.path.isdir(source) else "missing folder"
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, marker)
    return "downloaded" if isinstance(found, str) else "not downloaded"


def missing_weights(config: Config, model_ids: Iterable[str]) -> dict[str, str]:
    """``{model id: why}`` for each of ``model_ids`` whose weights are not on this machine."""
    missing = {}
    for model_id in model_ids:
        spec = config.model(model_id)
        parts = [(spec.source, "model_index.json")]
        if spec.text_encoder_source:
            parts.append((spec.text_encoder_source, "config.json"))
        states = [source_state(source, marker) for source, marker in parts]
        if any(state in ("not downloaded", "missing folder") for state in states):
            missing[model_id] = " and ".join(sorted({s for s in states if s.startswith(("not", "missing"))}))
    return missing
