"""The residency manager's plain data: status rows and the ``DeviceOps`` seam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from engine.config import ModelSpec

if TYPE_CHECKING:
    from engine.pipelines import LoadedPipeline

GiB = 2**30
OFFLOADED = ("model-offload", "sequential-offload")
LOAD_PHASE = "loading"  # OutOfMemoryError.phase values (engine.pipelines sets them)
DECODE_PHASE = "decoding with"


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
