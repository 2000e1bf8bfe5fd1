"""The worker seam: what the engine asks of one GPU, wherever that GPU is.

    Worker          the protocol (here). The dispatcher (engine/core/dispatch.py) only talks to this.
    WorkerInfo      what /workers shows of one: name, card, host, memory budget
    WorkerLostError the worker died (or hung) under a job: the engine, not the worker, decides
                    what runs again (engine/core/dispatch.py)
    runner.py       JobRunner: what a worker's GPU thread does for one job (resident, generate, check, PNG)
    local.py        LocalWorker: today's GPU thread and job runner in this process (embedded mode,
                    the default; imports no ray)
    ray_worker.py   RayWorker: one Ray actor per GPU (modes "local" and "cluster"); ray is
                    imported there, lazily, and nowhere else in the engine
    messages.py     what a RayWorker and its actor send each other (plain data)
    modes.py        the workers a ``[cluster]`` table asks for

Contract of ``Worker.run`` (tests/test_worker_contract.py runs one body against every kind):
the callbacks get the job's progress, previews and safety attempts in the order they happened,
from any thread (the caller hops them to its loop; they must be cheap); the coroutine returns
the final ``RunOutput`` (PNG bytes included) or raises what the job runner raised
(``JobCancelledError`` after ``cancel``, an ``EngineError`` with a user sentence, ...), or
``WorkerLostError`` when the worker itself went away.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from engine.errors import EngineError

if TYPE_CHECKING:
    from engine.config import Config
    from engine.cluster.runner import RunOutput
    from engine.jobs import GenerationParams
    from engine.pipelines import PreviewCallback
    from engine.residency import ResidencyStatus, ResidentModel
    from engine.safety import Attempt

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    name: str  # "gpu" (embedded), "w0", "w1", ...: what /workers, /preload ... on and the history show
    card: str  # "NVIDIA H200, 139.8 GiB", "cpu"
    host: str = ""
    budget_bytes: int | None = None  # the residency manager's GPU budget; None: no budget (CPU)


class WorkerLostError(EngineError):
    """The worker died or stopped answering under a job. Not the job's fault: the dispatcher
    puts the job back in its fair place (once; a second loss fails it with a sentence)."""

    def __init__(self, worker: str, why: str) -> None:
        self.worker, self.why = worker, why
        super().__init__(f"The GPU worker `{worker}` stopped while running your job ({why}).")


class Worker(Protocol):
    """One GPU (or a share of one) that runs jobs. See the module docstring for ``run``'s contract."""

    @property
    def info(self) -> WorkerInfo: ...

    @property
    def alive(self) -> bool: ...

    async def start(self, config: Config, shares: dict[str, float] | None = None) -> Config:
        """Build the runner (residency, safety detectors); returns the config it runs with
        (``engine.placement = "auto"`` may have changed the placements for its card)."""
        ...

    async def stop(self) -> None:
        """Unload everything and end; a job in progress is interrupted first (``cancel``)."""
        ...

    async def run(self, job_id: str, params: GenerationParams, *, nsfw_allowed: bool, cancel: threading.Event,
                  on_step: Callable[[int, int], None], on_attempt: Callable[[Attempt], None],
                  on_preview: PreviewCallback | None) -> RunOutput: ...

    def cancel(self, job_id: str) -> None:
        """Stop ``job_id`` within one denoising step (its ``run`` raises JobCancelledError)."""
        ...

    def placement_sets(self) -> tuple[frozenset[str], frozenset[str]]:
        """(models ready on this worker's device, models parked in its RAM): cached, no call out."""
        ...

    def residency_status(self) -> ResidencyStatus | None: ...

    def resident_models(self) -> tuple[ResidentModel, ...]: ...

    def fits(self, model_id: str) -> bool:
        """Whether the model can run on this worker's card at all (its budget, its placement)."""
        ...

    def set_needed_soon(self, models: Sequence[str]) -> None: ...

    async def preload(self, model_id: str, *, pin: bool = False) -> float: ...

    async def unload(self, model_id: str) -> bool: ...

    async def pin(self, model_id: str, pinned: bool = True) -> None: ...

    def call(self, fn: Callable[..., T], *args: Any) -> Any:
        """An awaitable for ``fn(*args)`` on this worker's own thread, between jobs (the router's
        LLM in embedded mode). Workers in another process refuse it (NotImplementedError)."""
        ...

    async def with_llm(self, llm_id: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(llm, *args)`` on this worker's own thread, between jobs, with its chat LLM ``llm_id``
        loaded (the router's LLM call on Ray workers). ``fn`` and ``args`` must pickle: a
        module-level function and plain values."""
        ...


__all__ = ["Worker", "WorkerInfo", "WorkerLostError"]
