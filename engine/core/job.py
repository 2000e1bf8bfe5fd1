"""One live job as the engine keeps it (``LiveJob``), and the caller's handle on it (``JobHandle``)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from engine.errors import EngineError, JobCancelledError
from engine.jobs import FINAL_EVENTS, GenerationParams, JobEvent, JobFailed, JobFinished, JobRequest, JobResult, JobStatus
from engine.scheduler import QueuedJob


@dataclass(slots=True, eq=False)
class LiveJob:
    id: str
    request: JobRequest
    params: GenerationParams
    events: asyncio.Queue[JobEvent]
    created_at: float = field(default_factory=time.time)
    queued_mono: float = field(default_factory=time.perf_counter)
    status: JobStatus = JobStatus.QUEUED
    cancel: threading.Event = field(default_factory=threading.Event)
    cancelled_by_user: bool = False  # else a set cancel flag means "the engine is stopping"
    # what the scheduler sees (engine/scheduler/): arrival order, round-robin tag, fairness
    seq: int = 0
    fair_tag: float = 0.0
    passed_over: int = 0
    first_passed_at: float | None = None
    started_mono: float | None = None
    worker: str = ""  # the worker running it (or that ran it last)
    worker_losses: int = 0  # times a worker died or hung under it: the second one fails it
    # what the ETAs see of a running job (written on the GPU thread, read on the loop)
    load_expected_s: float = 0.0
    step: int = 0
    first_step_at: float | None = None
    last_step_at: float | None = None
    previewed: bool = False  # a preview went out for the current attempt
    _view: QueuedJob | None = None  # what ``view`` built last; dropped when what it shows changes

    @property
    def user_key(self) -> str:
        return user_key(self.request)

    def view(self) -> QueuedJob:
        """What the scheduler sees; built once and kept until the job is queued again or passed over
        (every plan reads all waiting jobs' views)."""
        if self._view is None:
            self._view = QueuedJob(self.id, self.params.model_id, self.user_key, self.seq, self.queued_mono,
                                   self.fair_tag, self.passed_over, self.first_passed_at)
        return self._view

    def passed(self, now: float) -> None:
        """A job behind it in fair order started first."""
        self.passed_over += 1
        self.first_passed_at = now if self.first_passed_at is None else self.first_passed_at
        self._view = None


class Cancels(Protocol):
    """What a handle needs of the engine."""

    async def cancel(self, job_id: str) -> bool: ...


class JobHandle:
    """What ``submit`` returns: the job's id and parameters, its events, a way to cancel it."""

    def __init__(self, engine: Cancels, job: LiveJob, position: int) -> None:
        self._engine, self._job = engine, job
        self.id = job.id
        self.params = job.params
        self.position = position  # 1 = next to run
        self._final: JobEvent | None = None

    @property
    def status(self) -> JobStatus:
        return self._job.status

    async def events(self) -> AsyncIterator[JobEvent]:
        """This job's events in order, ending with JobFinished, JobFailed or JobCancelled.
        Each event is delivered once; after the end, iterating again yields nothing."""
        while self._final is None:
            event = await self._job.events.get()
            if isinstance(event, FINAL_EVENTS):
                self._final = event
            yield event

    async def result(self) -> JobResult:
        """Wait for the image; a failed job raises EngineError, a cancelled one JobCancelledError."""
        async for _ in self.events():
            pass
        match self._final:
            case JobFinished(result=result):
                return result
            case JobFailed(message=message):
                raise EngineError(message)
            case _:
                raise JobCancelledError(self.id)

    async def cancel(self) -> bool:
        return await self._engine.cancel(self.id)


def user_key(request: JobRequest) -> str:
    """Whose seat a job takes, and whose turn it is in the round robin."""
    return f"{request.requester.platform}:{request.requester.user_id}"
