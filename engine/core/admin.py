"""The admin calls (preload, unload, pin; what is loaded where; the workers): a base of ``Engine``.

With one worker (embedded, the default) every call goes to it, as it always did. With several,
``worker=`` names one ("w1", as ``/workers`` lists them); without it a preload goes where the
model is already, else to the worker with the most room that can hold it, and an unload or a
pin applies on every worker that holds the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.cluster import Worker, WorkerInfo
from engine.config import Config
from engine.core.job import LiveJob
from engine.core.normalise import requested_model
from engine.errors import EngineClosedError, RequestError
from engine.jobs import JobRequest
from engine.residency import ResidencyStatus, ResidentModel


@dataclass(frozen=True, slots=True)
class WorkerState:
    """One worker as ``/workers`` shows it."""

    info: WorkerInfo
    alive: bool
    resident: tuple[ResidentModel, ...]
    status: ResidencyStatus | None
    job_id: str | None  # the job it runs now
    job_model: str | None
    running_s: float  # how long that job has run


class Admin:
    """Preload, unload, pin and the residency readings, over the engine's workers."""

    config: Config
    _workers: list[Worker]
    _running: dict[str, LiveJob]
    _closing: bool
    _started: bool

    _queue_changed: Callable[[], None]  # the planner's: what is loaded changed, so did the plan

    async def preload(self, model_id: str, *, pin: bool = False, worker: str | None = None) -> float:
        """Make a model resident ahead of demand (admin); runs on the worker's GPU thread between
        jobs. ``pin``: exempt it from eviction by the cost rule. Returns the seconds spent loading
        (0.0 if it was already resident)."""
        self._check_open()
        model_id = self._known_model(model_id)
        target = self._worker(worker) if worker else self._preload_target(model_id)
        if not target.fits(model_id):
            raise RequestError("worker", target.info.name, f"`{model_id}` does not fit on its card ({target.info.card})")
        try:
            return await target.preload(model_id, pin=pin)
        finally:
            self._queue_changed()  # what is loaded changed: the plan and the ETAs with it

    async def pin(self, model_id: str, pinned: bool = True, *, worker: str | None = None) -> None:
        """Pin (or unpin) a model: a pinned model is not evicted to make room (admin)."""
        self._check_open()
        model_id = self._known_model(model_id)
        targets = self._targets(model_id, worker)
        if pinned and not targets:  # several workers, none holds it: a pin would apply nowhere
            raise RequestError("model", model_id, "it is loaded on no worker, so there is nothing to pin; preload it "
                                                  "with a pin (`/preload MODEL [on WORKER]`, pin=True) or name a worker")
        for w in targets:
            await w.pin(model_id, pinned)

    async def unload(self, model_id: str, *, worker: str | None = None) -> bool:
        """Drop a model from memory (admin); False if it was not loaded anywhere asked."""
        self._check_open()
        model_id = self._known_model(model_id)
        try:
            dropped = [await w.unload(model_id) for w in self._targets(model_id, worker)]
            return any(dropped)
        finally:
            self._queue_changed()

    def residency_status(self, worker: str | None = None) -> ResidencyStatus | None:
        """Which model is where, bytes, last use, pins; the GPU budget, used and free; the RAM tier
        (of one worker: the first unless named)."""
        if not self._workers:
            return None
        return (self._worker(worker) if worker else self._workers[0]).residency_status()

    def resident_models(self) -> tuple[ResidentModel, ...]:
        """Every worker's loaded models (a model loaded on two workers is listed twice)."""
        return tuple(m for w in self._workers for m in w.resident_models())

    def workers(self) -> list[WorkerState]:
        """Each worker: its card, whether it is up, what it holds, the job it runs (``/workers``)."""
        now = time.perf_counter()
        out = []
        for w in self._workers:
            job = self._running.get(w.info.name)
            started = job.started_mono if job is not None and job.started_mono is not None else now
            out.append(WorkerState(w.info, w.alive, w.resident_models(), w.residency_status(),
                                   job.id if job else None, job.params.model_id if job else None, now - started))
        return out

    # -- helpers ---------------------------------------------------------------------------

    def _worker(self, name: str | None) -> Worker:
        for w in self._workers:
            if w.info.name == name:
                return w
        names = ", ".join(w.info.name for w in self._workers)
        raise RequestError("worker", name, f"it must be one of the workers: {names}")

    def _targets(self, model_id: str, worker: str | None) -> list[Worker]:
        if worker:
            return [self._worker(worker)]
        if len(self._workers) == 1:
            return list(self._workers)
        return [w for w in self._workers if model_id in _loaded(w)]

    def _preload_target(self, model_id: str) -> Worker:
        """Where the model is already; else the live worker that can hold it with the most room."""
        if len(self._workers) == 1:
            return self._workers[0]
        live = [w for w in self._workers if w.alive and w.fits(model_id)]
        if not live:
            raise RequestError("model", model_id, "no worker that is up can hold it")
        holding = [w for w in live if model_id in _loaded(w)]
        return holding[0] if holding else max(live, key=_room)

    def _check_open(self) -> None:
        """Refused at once when the engine is not running (never queued onto a worker that has stopped)."""
        if self._closing or not self._started:
            raise EngineClosedError("admin")

    def _known_model(self, model_id: str) -> str:
        return requested_model(JobRequest(prompt="-", model=model_id), self.config) or self.config.default_model

    def _resident_ids(self) -> frozenset[str]:
        return frozenset(m.model_id for m in self.resident_models())


def _loaded(worker: Worker) -> frozenset[str]:
    ready, parked = worker.placement_sets()
    return ready | parked


def _room(worker: Worker) -> int:
    status = worker.residency_status()
    free = status.gpu_free_bytes if status is not None else None
    return free if free is not None else 0
