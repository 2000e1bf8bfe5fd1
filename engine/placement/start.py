"""``engine.placement = "auto"`` at start-up: measure the card, plan, apply (GPU thread)."""

from __future__ import annotations

import logging
from typing import Any

from engine.config import Config
from engine.pipelines.quantise import FP8_MIN_CAPABILITY
from engine.placement.apply import apply_plan, plan_for_config

log = logging.getLogger(__name__)


def auto_placement_blocking(config: Config, device: Any) -> Config:
    """``config`` with the planner's placements for this card; unchanged unless ``auto`` on CUDA."""
    if config.placement != "auto":
        return config
    if getattr(device, "type", None) != "cuda":
        log.info("placement auto: no CUDA device, nothing to plan (the CPU runs every model unquantised)")
        return config
    import torch

    props = torch.cuda.get_device_properties(device)
    gpu_gb = props.total_memory / 2**30
    fp8 = (props.major, props.minor) >= FP8_MIN_CAPABILITY
    log.info("placement auto: %s, %.1f GiB, fp8 %s", props.name, gpu_gb, "yes" if fp8 else "no")
    return apply_plan(config, plan_for_config(config, gpu_gb, fp8=fp8))
