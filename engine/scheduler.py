"""Which queued job runs next: FIFO, or model affinity with fairness bounds. Pure functions.

The dispatcher (engine/core.py) owns the queue; it hands this module plain views of the queued
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

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from engine.errors import ConfigError, EngineError, QueueFullError

POLICIES = ("affinity", "fifo")


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


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    policy: str = "affinity"
    max_passed_over: int = 8  # K
    max_extra_wait_s: float = 300.0  # T
    max_queued_per_user: int = 10


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


# -- ETA: recorded per-model timings, replayed through the policy --------------------------------


@dataclass(slots=True)
class TimingBook:
    """Per-model seconds, as an exponential moving average of what the GPU thread reported.

    A model never seen yet is assumed to cost the mean of the others (or the defaults)."""

    default_generate_s: float = 10.0
    default_load_s: float = 20.0
    weight: float = 0.3  # of the newest observation
    generate_s: dict[str, float] = field(default_factory=dict)
    load_s: dict[str, float] = field(default_factory=dict)

    def record(self, model_id: str, *, generate_s: float, load_s: float = 0.0) -> None:
        self.generate_s[model_id] = self._blend(self.generate_s.get(model_id), generate_s)
        if load_s > 0:  # 0 means it was resident: says nothing about the load cost
            self.load_s[model_id] = self._blend(self.load_s.get(model_id), load_s)

    def expected_generate_s(self, model_id: str) -> float:
        return self.generate_s.get(model_id, _mean(self.generate_s.values(), self.default_generate_s))

    def expected_load_s(self, model_id: str) -> float:
        return self.load_s.get(model_id, _mean(self.load_s.values(), self.default_load_s))

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.weight) * old + self.weight * new


@dataclass(frozen=True, slots=True)
class Planned:
    job_id: str
    model_id: str
    position: int  # 1 = next to run
    start_s: float  # seconds from now until it starts
    eta_s: float  # seconds from now until its image is expected
    loads: bool  # whether the plan expects a model load before it


def plan(scheduler: Scheduler, queue: Sequence[QueuedJob], resident: Collection[str], now: float,
         timings: TimingBook, *, parked: Collection[str] = (), busy_for_s: float = 0.0,
         capacity: int | None = None, limit: int | None = None) -> list[Planned]:
    """The order the policy would run the queue in if nothing else arrived, with start times.

    ``busy_for_s``: what is left of the running job. ``capacity``: how many models stay ready
    at once (least recently used goes); default: as many as are ready now, at least one.
    ``limit``: plan only the first so many jobs."""
    ready = list(resident)
    keep = max(1, len(ready)) if capacity is None else capacity
    left = list(queue)
    t = now + busy_for_s
    out: list[Planned] = []
    while left and (limit is None or len(out) < limit):
        pick = scheduler.pick(left, ready, t, parked)
        job = next(j for j in left if j.job_id == pick.job_id)
        loads = job.model_id not in ready
        left = apply_pick(left, pick, t)
        start = t
        if loads:
            t += timings.expected_load_s(job.model_id)
        else:
            ready.remove(job.model_id)
        ready.append(job.model_id)  # most recently used last
        del ready[: max(0, len(ready) - keep)]
        t += timings.expected_generate_s(job.model_id)
        out.append(Planned(job.job_id, job.model_id, len(out) + 1, start - now, t - now, loads))
    return out


def needed_soon(planned: Sequence[Planned], horizon: int = 8) -> tuple[str, ...]:
    """Models the next ``horizon`` planned jobs need, soonest first, each once."""
    seen: dict[str, None] = {}
    for p in planned[:horizon]:
        seen.setdefault(p.model_id, None)
    return tuple(seen)


def _mean(values: Iterable[float], default: float) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else default


# -- configuration ---------------------------------------------------------------------------


def parse_scheduler_config(raw: Mapping[str, Any]) -> SchedulerSettings:
    """The ``[scheduler]`` table; every broken rule is a ConfigError naming key and value."""
    known = {"policy", "max_passed_over", "max_extra_wait_s", "max_queued_per_user"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"scheduler.{key}", raw[key], f"it is not a known key here (known: {', '.join(sorted(known))})")
    d = SchedulerSettings()
    policy = raw.get("policy", d.policy)
    if policy not in POLICIES:
        raise ConfigError("scheduler.policy", policy, f"it must be one of {', '.join(repr(p) for p in POLICIES)}")
    k = _whole(raw, "max_passed_over", d.max_passed_over, low=0)
    t = _number(raw, "max_extra_wait_s", d.max_extra_wait_s)
    cap = _whole(raw, "max_queued_per_user", d.max_queued_per_user, low=1)
    return SchedulerSettings(policy, k, t, cap)


def _whole(raw: Mapping[str, Any], key: str, default: int, *, low: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"scheduler.{key}", value, "it must be a whole number")
    if value < low:
        raise ConfigError(f"scheduler.{key}", value, f"it must be at least {low}")
    return value


def _number(raw: Mapping[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"scheduler.{key}", value, "it must be a number of seconds")
    if value < 0:
        raise ConfigError(f"scheduler.{key}", value, "it must be at least 0 seconds")
    return float(value)
