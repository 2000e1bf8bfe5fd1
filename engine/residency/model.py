"""The residency manager's plain data: settings, status rows, the ``DeviceOps`` seam, config."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.config import ModelSpec
    from engine.pipelines import LoadedPipeline

GiB = 2**30
OFFLOADED = ("model-offload", "sequential-offload")
LOAD_PHASE = "loading"  # OutOfMemoryError.phase values (engine.pipelines sets them)
DECODE_PHASE = "decoding with"


@dataclass(frozen=True, slots=True)
class ResidencySettings:
    gpu_budget_gb: float = 0.0  # 0: free GPU memory minus reserve_gb
    reserve_gb: float = 3.0  # kept free for activations and the VAE decode
    cpu_ram_gb: float = 0.0  # RAM tier for evicted pipelines; 0: off (evicted = released)


@dataclass(frozen=True, slots=True)
class ResidentModel:
    """One row of the status snapshot: plain data, safe to read from any thread."""

    model_id: str
    placement: str  # the pipeline's placement: "gpu", "cpu", "model-offload", "sequential-offload"
    nbytes: int  # parameters + buffers
    load_s: float
    last_used: float  # time.time()
    where: str = "gpu"  # "gpu", "offloaded", "cpu" (ready) or "cpu-ram" (parked)
    device_bytes: int = 0  # what it counts against the GPU budget
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class ResidencyStatus:
    models: tuple[ResidentModel, ...]
    gpu_budget_bytes: int | None  # None: no budget (a CPU device without gpu_budget_gb)
    gpu_used_bytes: int
    ram_budget_bytes: int | None  # None: the RAM tier is off
    ram_used_bytes: int
    pinned: tuple[str, ...]

    @property
    def gpu_free_bytes(self) -> int | None:
        return None if self.gpu_budget_bytes is None else self.gpu_budget_bytes - self.gpu_used_bytes


class DeviceOps(Protocol):
    """Everything the manager does to a device; tests and the benchmark hand in fakes."""

    can_park: bool  # whether evicted pipelines may be parked in RAM (CUDA only)
    keeps_host_copy: bool  # a parked pipeline's RAM copy stays after it goes back (re-parking is a copy)

    def load(self, spec: ModelSpec, device: Any, dtype: Any) -> LoadedPipeline: ...
    def release(self, loaded: LoadedPipeline) -> None: ...
    def park(self, loaded: LoadedPipeline) -> None: ...
    def unpark(self, loaded: LoadedPipeline) -> None: ...  # on failure: back in RAM, then raise
    def forget_host_copy(self, loaded: LoadedPipeline) -> None: ...  # of a pipeline on the GPU
    def offload(self, loaded: LoadedPipeline) -> bool: ...
    def free_bytes(self) -> int | None: ...  # device memory not held by live tensors
    def allocated_bytes(self) -> int | None: ...  # None: not measurable (CPU)
    def clear_cache(self) -> None: ...
    def expected_bytes(self, spec: ModelSpec, dtype: Any) -> int | None: ...
    def device_bytes(self, loaded: LoadedPipeline, measured: int | None) -> int: ...


# -- configuration ---------------------------------------------------------------------------


def parse_residency_config(raw: Mapping[str, Any]) -> ResidencySettings:
    """The ``[residency]`` table; every broken rule is a ConfigError naming key and value."""
    known = {"gpu_budget_gb", "reserve_gb", "cpu_ram_gb"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"residency.{key}", raw[key], f"it is not a known key here (known: {', '.join(sorted(known))})")
    d = ResidencySettings()
    values = {}
    for key in sorted(known):
        value = raw.get(key, getattr(d, key))
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"residency.{key}", value, "it must be a number of GiB")
        if value < 0:
            raise ConfigError(f"residency.{key}", value, "it must be at least 0 GiB")
        values[key] = float(value)
    return ResidencySettings(**values)
