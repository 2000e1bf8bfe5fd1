"""The ``tiny`` profile: every model and LLM id points at its locally built twin."""

from __future__ import annotations

from typing import Any

from engine.config.schema import Config

PROFILES = ("real", "tiny")


def with_tiny_models(config: Config, tiny: Any) -> Config:
    """``config`` with each model's source (and the LLM ids) swapped for the tiny twins.

    ``tiny`` is an ``engine.tiny.TinyModels``; the loaders are the production ones.
    """
    by_family = {"flux": tiny.flux, "sdxl": tiny.sdxl, "sd3": tiny.sd3, "hidream": tiny.hidream}
    models = {
        mid: m.model_copy(update={
            "source": str(by_family[m.family]),
            "text_encoder_source": str(tiny.hidream_llama) if m.family == "hidream" else None,
        })
        for mid, m in config.models.items()
    }
    return config.model_copy(update={"models": models, "router_llm_id": str(tiny.chat_llm),
                                     "rewrite_llm_id": str(tiny.chat_llm)})
