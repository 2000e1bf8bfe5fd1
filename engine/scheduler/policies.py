"""Which queued job runs next: FIFO, or model affinity with fairness bounds. Pure functions.

The dispatcher (engine/core/) owns the queue; it hands this module plain views of the queued
jobs, the set of models that are ready on the device (and the set parked in RAM), and the
time. Nothing here touches torch, asyncio or a clock, so every rule is testable with numbers.

Two policies:

``fifo``
    Arrival order. With the seed's residency rule this is the baseline the benchmark measures.

``affinity`` (the default)
    The *fair order* is round-robin over users: each job gets a tag when it arrives (start-time
    fair queuing, ``RoundRobin``): one more than the larger of its user's previous tag and the
    tag of the latest job started. Sorting by tag (ties by arrival) serves backlogged users in
    turn, keeps each user's jobs in their order, and gives no credit for idle time. Among the
    jobs it may pick, affinity takes the first in fair order whose model is ready on the
    device; failing that one whose model is parked in RAM (a copy, not a disk load); failing
    that the first in fair order (its model gets loaded). Two bounds keep this fair:

    * ``max_passed_over`` (K): a job is *passed over* when a job behind it in fair order
      starts before it. No job is passed over more than K times.
    * ``max_extra_wait_s`` (T): once T seconds have gone by since a job was first passed over,
      nothing behind it in fair order starts before it: from then on it runs as it would
      under plain round-robin.

    Both bounds are enforced the same way: walk the fair order; the first job that has hit a
    bound blocks everything behind it, so the pick comes from the jobs up to and including it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from engine.config import SchedulerSettings
from engine.errors import EngineError, QueueFullError

# -- plain data ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """What the scheduler knows of one queued job."""

    job_id: str
    model_id: str
    user_id: str
    seq: int  # arrival order: unique, increasing
    arrived_at: float  # seconds, any monotonic clock (the same one as ``now``)
    fair_tag: float = 0.0  # from RoundRobin.tag() at arrival; all equal: arrival order
    passed_over: int = 0  # times a job behind it in fair order started first
    first_passed_at: float | None = None  # when that first happened


@dataclass(frozen=True, slots=True)
class Pick:
    job_id: str
    passed_over: tuple[str, ...]  # the queued jobs this pick overtakes: each gets one more pass
    reason: str  # "fifo", "resident", "parked", "load", "bound" (a job at its bound runs)


class UserQueueFullError(QueueFullError):
    """One user already has as many jobs waiting as the per-user cap allows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        EngineError.__init__(self, f"You already have {limit} jobs waiting, the most one person may queue; "
                                   "please wait for one of them to finish.")


class Scheduler(Protocol):
    name: str

    def pick(self, queue: Sequence[QueuedJob], resident: Collection[str], now: float,
             parked: Collection[str] = ()) -> Pick: ...


# -- the policies ----------------------------------------------------------------------------


class FifoScheduler:
    """Arrival order, nothing else."""

    name = "fifo"

    def pick(self, queue: Sequence[QueuedJob], resident: Collection[str], now: float,
             parked: Collection[str] = ()) -> Pick:
        if not queue:
            raise ValueError("pick from an empty queue")
        return Pick(min(queue, key=lambda j: j.seq).job_id, (), "fifo")


class AffinityScheduler:
    """Prefer a job whose model is ready; bounded unfairness; users round-robin."""

    name = "affinity"

    def __init__(self, max_passed_over: int = 8, max_extra_wait_s: float = 300.0) -> None:
        self.max_passed_over = max_passed_over
        self.max_extra_wait_s = max_extra_wait_s

    def pick(self, queue: Sequence[QueuedJob], resident: Collection[str], now: float,
             parked: Collection[str] = ()) -> Pick:
        if not queue:
            raise ValueError("pick from an empty queue")
        order = fair_order(queue)
        allowed = self._allowed(order, now)
        chosen, reason = self._choose(allowed, resident, parked)
        if reason == "load" and chosen is allowed[-1] and self._at_bound(chosen, now):
            reason = "bound"
        index = order.index(chosen)
        return Pick(chosen.job_id, tuple(j.job_id for j in order[:index]), reason)

    def _at_bound(self, job: QueuedJob, now: float) -> bool:
        if job.passed_over >= self.max_passed_over:
            return True
        return job.first_passed_at is not None and now - job.first_passed_at >= self.max_extra_wait_s

    def _allowed(self, order: list[QueuedJob], now: float) -> list[QueuedJob]:
        """The fair-order prefix up to and including the first job at a bound: picking any
        job behind that one would pass it over once more."""
        for i, job in enumerate(order):
            if self._at_bound(job, now):
                return order[: i + 1]
        return order

    @staticmethod
    def _choose(allowed: list[QueuedJob], resident: Collection[str],
                parked: Collection[str]) -> tuple[QueuedJob, str]:
        for job in allowed:
            if job.model_id in resident:
                return job, "resident"
        for job in allowed:
            if job.model_id in parked:
                return job, "parked"
        return allowed[0], "load"


def make_scheduler(settings: SchedulerSettings) -> Scheduler:
    if settings.policy == "fifo":
        return FifoScheduler()
    return AffinityScheduler(settings.max_passed_over, settings.max_extra_wait_s)


# -- helpers the dispatcher and the benchmark share --------------------------------------------


def fair_order(queue: Iterable[QueuedJob]) -> list[QueuedJob]:
    """Round-robin over users (by fair tag), each user's jobs in arrival order."""
    return sorted(queue, key=lambda j: (j.fair_tag, j.seq))


@dataclass(slots=True)
class RoundRobin:
    """Start-time fair queuing tags. The dispatcher asks ``tag(user)`` as a job arrives and
    calls ``started(tag)`` as one starts; the tag goes into the job's ``QueuedJob``.

    A user with ten jobs queued holds tags v+1 ... v+10; another user arriving later gets v'+1,
    which sorts between them: one burst cannot starve the others."""

    virtual: float = 0.0  # the largest tag started so far
    last: dict[str, float] = field(default_factory=dict)  # each user's latest tag, while ahead of virtual

    def tag(self, user_id: str) -> float:
        tag = max(self.virtual, self.last.get(user_id, 0.0)) + 1.0
        self.last[user_id] = tag
        return tag

    def started(self, tag: float) -> None:
        self.virtual = max(self.virtual, tag)
        for user in [u for u, t in self.last.items() if t <= self.virtual]:
            del self.last[user]  # no different from a user never seen: keeps the map small


def apply_pick(queue: Sequence[QueuedJob], pick: Pick, now: float) -> list[QueuedJob]:
    """The queue after ``pick`` starts: the chosen job gone, every overtaken job one pass more."""
    passed = set(pick.passed_over)
    out = []
    for job in queue:
        if job.job_id == pick.job_id:
            continue
        if job.job_id in passed:
            job = replace(job, passed_over=job.passed_over + 1,
                          first_passed_at=now if job.first_passed_at is None else job.first_passed_at)
        out.append(job)
    return out


def check_user_cap(queue: Iterable[QueuedJob], user_id: str, cap: int) -> None:
    """Raise ``UserQueueFullError`` if ``user_id`` already has ``cap`` jobs queued."""
    if sum(1 for j in queue if j.user_id == user_id) >= cap:
        raise UserQueueFullError(cap)
