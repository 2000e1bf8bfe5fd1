"""A plan onto a Config: each model's quantisation and offload, unless config.toml names them
for that model (explicit per-model keys always win)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from engine.config import Config, ModelSpec, QuantSettings
from engine.placement.planner import Plan, plan_placements

log = logging.getLogger(__name__)


def plan_for_config(config: Config, gpu_gb: float, *, fp8: bool = False,
                    shares: Mapping[str, float] | None = None) -> Plan:
    """The plan for the models of ``config`` on a card of ``gpu_gb`` GiB (sizes by family);
    ``shares``: each model's share of jobs (None: every model counts the same)."""
    families = {mid: spec.family for mid, spec in config.models.items()}
    return plan_placements(families, gpu_gb, reserve_gb=config.residency.reserve_gb,
                           ram_gb=config.residency.cpu_ram_gb, fp8=fp8,
                           exclusive=[mid for mid, spec in config.models.items() if spec.exclusive], shares=shares)


def explicit_keys(spec: ModelSpec) -> list[str]:
    """The placement keys config.toml sets for this model (the plan leaves those alone)."""
    return [k for k in ("quant", "offload") if k in spec.model_fields_set]


def apply_plan(config: Config, plan: Plan) -> Config:
    models = {}
    for mid, spec in config.models.items():
        placed = plan.models.get(mid)
        if placed is None:
            models[mid] = spec
            continue
        update: dict[str, object] = {}
        kept = explicit_keys(spec)
        if "quant" not in kept:
            update["quant"] = QuantSettings(denoiser=placed.denoiser,  # type: ignore[arg-type]
                                            text_encoders={n: q for n, q in placed.text_encoders.items() if q != "bf16"})
        if "offload" not in kept:
            update["offload"] = placed.offload
        models[mid] = spec.model_copy(update=update)
        log.info("placement auto: %s -> denoiser %s, text encoders %s, offload %s (%.1f GB on the card)%s", mid,
                 placed.denoiser, dict(placed.text_encoders), placed.offload, placed.gb,
                 f"; config.toml's {', '.join(kept)} kept" if kept else "")
    return config.model_copy(update={"models": models})
