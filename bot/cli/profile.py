"""The ``--profile`` a command runs with: "tiny" builds its small twins of every model once."""

from __future__ import annotations

from engine import Config, ensure_tiny_models, with_tiny_models


def prepare(config: Config) -> Config:
    """The tiny profile builds its twins once (seconds), then every id points at them."""
    if config.profile != "tiny":
        return config
    return with_tiny_models(config, ensure_tiny_models(config.tiny_cache_dir))
