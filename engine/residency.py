"""What is loaded where: the seed's residency rule, used only from the GPU thread.

The rule (the full budget-aware manager comes later): keep every pipeline that was loaded
resident and load new ones beside it; unload the others only when loading an exclusive model
(HiDream), when an exclusive model is resident and another is wanted, or when a load runs out
of memory (then retry once). The CUDA cache is cleared around a swap, never between runs of
the same model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import ModelSpec
from engine.errors import OutOfMemoryError
from engine.pipelines import LoadedPipeline, free_memory_blocking, load_pipeline_blocking, release_blocking

log = logging.getLogger(__name__)

Loader = Callable[[ModelSpec, Any, Any], LoadedPipeline]


@dataclass(frozen=True, slots=True)
class ResidentModel:
    """One row of the status snapshot: plain data, safe to read from any thread."""

    model_id: str
    placement: str
    nbytes: int
    load_s: float
    last_used: float


class ResidencyManager:
    def __init__(self, device: Any, dtype: Any, *, loader: Loader = load_pipeline_blocking,
                 releaser: Callable[[LoadedPipeline], None] = release_blocking) -> None:
        self._device, self._dtype = device, dtype
        self._load, self._release = loader, releaser
        self._loaded: OrderedDict[str, LoadedPipeline] = OrderedDict()  # least recently used first
        self._last_used: dict[str, float] = {}
        self._lock = threading.Lock()  # guards the snapshot only; all mutation is on the GPU thread
        self._snapshot: tuple[ResidentModel, ...] = ()

    def acquire_blocking(self, spec: ModelSpec) -> tuple[LoadedPipeline, float]:
        """The pipeline for ``spec``, loading it if needed; returns it and the seconds spent loading."""
        loaded = self._loaded.get(spec.id)
        if loaded is None:
            started = time.perf_counter()
            loaded = self._load_blocking(spec)
            load_s = time.perf_counter() - started
        else:
            load_s = 0.0
        self._loaded.move_to_end(spec.id)
        self._last_used[spec.id] = time.time()
        self._publish()
        return loaded, load_s

    def free_others_blocking(self, keep: str) -> int:
        """Unload every pipeline but ``keep``; returns how many went (used by OOM recovery)."""
        others = [mid for mid in self._loaded if mid != keep]
        for mid in others:
            self.unload_blocking(mid)
        return len(others)

    def unload_blocking(self, model_id: str) -> bool:
        loaded = self._loaded.pop(model_id, None)
        if loaded is None:
            return False
        self._release(loaded)
        log.info("unloaded %s", model_id)
        self._publish()
        return True

    def unload_all_blocking(self) -> None:
        for mid in list(self._loaded):
            self.unload_blocking(mid)

    def is_resident(self, model_id: str) -> bool:
        return model_id in {r.model_id for r in self.snapshot()}

    def snapshot(self) -> tuple[ResidentModel, ...]:
        with self._lock:
            return self._snapshot

    # -- internals -------------------------------------------------------------------------

    def _load_blocking(self, spec: ModelSpec) -> LoadedPipeline:
        # 1. an exclusive model runs alone, and nothing loads beside one
        if spec.exclusive or any(p.spec.exclusive for p in self._loaded.values()):
            self.free_others_blocking(keep=spec.id)
        free_memory_blocking(self._device)  # before a swap: hand the cache back first
        # 2. load; out of memory -> unload everything else and try once more
        try:
            loaded = self._load(spec, self._device, self._dtype)
        except OutOfMemoryError:
            if not self.free_others_blocking(keep=spec.id):
                raise
            log.warning("%s: out of memory while loading; unloaded the others, retrying once", spec.id)
            loaded = self._load(spec, self._device, self._dtype)
        self._loaded[spec.id] = loaded
        free_memory_blocking(self._device)  # after a swap: the loader's temporaries
        return loaded

    def _publish(self) -> None:
        rows = tuple(
            ResidentModel(mid, p.placement, p.nbytes, p.load_s, self._last_used.get(mid, 0.0))
            for mid, p in self._loaded.items()
        )
        with self._lock:
            self._snapshot = rows
