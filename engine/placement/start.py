"""``engine.placement = "auto"`` at start-up: measure the card, plan, apply (GPU thread)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from engine.config import Config
from engine.errors import ConfigError
from engine.pipelines.quantise import FP8_MIN_CAPABILITY
from engine.placement.apply import apply_plan, plan_for_config
from engine.placement.traffic import describe_shares

log = logging.getLogger(__name__)


def auto_placement_blocking(config: Config, device: Any, shares: Mapping[str, float] | None = None) -> Config:
    """``config`` with the planner's placements for this card; unchanged unless ``auto`` on CUDA.
    ``shares``: each model's share of recent jobs (the history's); None counts models equally."""
    if config.placement != "auto":
        return config
    if getattr(device, "type", None) != "cuda":
        log.info("placement auto: no CUDA device, nothing to plan (the CPU runs every model unquantised)")
        return config
    gpu_gb, fp8 = measure_card_blocking(device)
    log.info("placement auto: %s", describe_shares(shares, "the history's recent jobs" if shares else "too few jobs in the history"))
    return apply_plan(config, plan_for_config(config, gpu_gb, fp8=fp8, shares=shares))


def measure_card_blocking(device: Any = None) -> tuple[float, bool]:
    """(GiB of memory, runs float8) of a CUDA card (the first one by default); raises
    ``ConfigError`` without CUDA."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--gpu-gb", None, "this machine has no CUDA GPU to measure: give the card's size, e.g. --gpu-gb 24")
    props = torch.cuda.get_device_properties(device if device is not None else 0)
    fp8 = (props.major, props.minor) >= FP8_MIN_CAPABILITY
    log.info("placement: %s, %.1f GiB, fp8 %s", props.name, props.total_memory / 2**30, "yes" if fp8 else "no")
    return props.total_memory / 2**30, fp8
