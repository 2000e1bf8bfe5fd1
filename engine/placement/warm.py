"""``promptpics download --quantise``: fill the quantised cache now (engine/pipelines/quant_cache.py),
so that the first job of a quantised model does not wait for its parts to be quantised on the
CPU. The models get the placements the engine would give them at start-up (``engine.placement =
"auto"`` included) and the dtype it would load them in: the cache's keys are the engine's."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engine.config import Config
from engine.pipelines.quant_cache import cacheable_parts
from engine.placement.start import auto_placement_blocking


@dataclass(frozen=True, slots=True)
class Warmed:
    """One model: the parts the cache keeps for it, those written now, and how long that took."""

    model_id: str
    parts: tuple[str, ...]  # its int8/fp8 parts (empty: nothing to quantise)
    written: tuple[str, ...]  # written now (empty: all were cached already)
    seconds: float


def warm_quantised_cache_blocking(config: Config, model_ids: Sequence[str],
                                  shares: Mapping[str, float] | None = None) -> list[Warmed]:
    from engine.pipelines import configure_torch_blocking, resolve_device_blocking, resolve_dtype
    from engine.pipelines.loaders import quantise_into_cache_blocking

    device = resolve_device_blocking(config.device)
    configure_torch_blocking(device)  # the libraries' loading bars stay out of a quiet run
    config = auto_placement_blocking(config, device, shares)
    dtype = resolve_dtype(device, config.cuda_dtype)
    out = []
    for model_id in model_ids:
        spec = config.model(model_id)
        started = time.perf_counter()
        parts = tuple(cacheable_parts(spec))
        written = quantise_into_cache_blocking(spec, dtype, config.data_dir / "quantised", device) if parts else []
        out.append(Warmed(model_id, parts, tuple(written), time.perf_counter() - started))
    return out
