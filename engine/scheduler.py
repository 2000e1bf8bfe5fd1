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

import math
from collections import deque
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
    ``limit``: plan only the first so many jobs.

    O(n log n) for the two shipped policies (``_AffinityReplay``, ``_FifoReplay``); any other
    ``Scheduler`` is replayed pick by pick (O(n^2 log n), ``_PickReplay``)."""
    replay = _replay_for(scheduler, queue, parked)
    ready = list(resident)
    keep = max(1, len(ready)) if capacity is None else capacity
    t = now + busy_for_s
    out: list[Planned] = []
    while replay.left and (limit is None or len(out) < limit):
        job = replay.take(ready, t)
        loads = job.model_id not in ready
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


class _Replay(Protocol):
    left: int

    def take(self, ready: Collection[str], now: float) -> QueuedJob: ...


def _replay_for(scheduler: Scheduler, queue: Sequence[QueuedJob], parked: Collection[str]) -> _Replay:
    if type(scheduler) is AffinityScheduler:
        return _AffinityReplay(queue, parked, scheduler.max_passed_over, scheduler.max_extra_wait_s)
    if type(scheduler) is FifoScheduler:
        return _FifoReplay(queue)
    return _PickReplay(scheduler, queue, parked)


class _PickReplay:
    """Any policy: ask it for every pick over what is left (the reference the fast ones must match)."""

    def __init__(self, scheduler: Scheduler, queue: Sequence[QueuedJob], parked: Collection[str]) -> None:
        self._scheduler, self._queue, self._parked = scheduler, list(queue), parked
        self.left = len(self._queue)

    def take(self, ready: Collection[str], now: float) -> QueuedJob:
        pick = self._scheduler.pick(self._queue, ready, now, self._parked)
        job = next(j for j in self._queue if j.job_id == pick.job_id)
        self._queue = apply_pick(self._queue, pick, now)
        self.left = len(self._queue)
        return job


class _FifoReplay:
    def __init__(self, queue: Sequence[QueuedJob]) -> None:
        self._order = sorted(queue, key=lambda j: j.seq)
        self.left = len(self._order)

    def take(self, ready: Collection[str], now: float) -> QueuedJob:
        self.left -= 1
        return self._order[len(self._order) - self.left - 1]


class _AffinityReplay:
    """``AffinityScheduler.pick`` over and over, in O(log n) a pick.

    Three facts make it fast. The fair order never changes during a plan (tags are fixed at
    arrival), so it is sorted once. The job picked is always the first remaining job of its model
    in fair order (every job before it in the allowed prefix has another model), so each model's
    jobs are a queue popped from the front. And a pick passes over exactly the remaining jobs
    before it: one more pass, and a first-passed time, for a prefix of the fair order, which a
    lazy segment tree (``_BoundTree``) applies and searches ("the first job at a bound") in
    O(log n)."""

    def __init__(self, queue: Sequence[QueuedJob], parked: Collection[str], max_passed_over: int,
                 max_extra_wait_s: float) -> None:
        self._order = fair_order(queue)
        self._parked = parked
        self._heads: dict[str, deque[int]] = {}
        for i, job in enumerate(self._order):
            self._heads.setdefault(job.model_id, deque()).append(i)
        self._tree = _BoundTree(self._order, max_passed_over, max_extra_wait_s)
        self._gone = [False] * len(self._order)
        self._first = 0  # the first remaining job in fair order
        self.left = len(self._order)

    def take(self, ready: Collection[str], now: float) -> QueuedJob:
        bound = self._tree.first_at_bound(now)
        last = len(self._order) - 1 if bound is None else bound  # the allowed prefix ends here
        chosen = self._first_head(ready, last)
        if chosen is None:
            chosen = self._first_head(self._parked, last)
        if chosen is None:
            chosen = self._first
        job = self._order[chosen]
        self._heads[job.model_id].popleft()
        if chosen > self._first:  # else no job remains before it
            self._tree.pass_over_before(chosen, now)
        self._tree.remove(chosen)
        self._gone[chosen] = True
        while self._first < len(self._order) and self._gone[self._first]:
            self._first += 1
        self.left -= 1
        return job

    def _first_head(self, models: Collection[str], last: int) -> int | None:
        best: int | None = None
        for model in models:
            head = self._heads.get(model)
            if head and head[0] <= last and (best is None or head[0] < best):
                best = head[0]
        return best


class _BoundTree:
    """Over the fair order: each remaining job's times passed over (max per node) and first-passed
    time (min per node), with "one more pass at time t for every job before i".

    The tags of an update stay on the nodes it covers (no push-down): a node holds its children's
    combined value plus its own tag, so an update or a removal rebuilds one path upwards, and the
    search carries the tags of the nodes above it down. Iterative throughout: this runs 200
    times in a plan of 200 jobs, once per queue change, on the event loop."""

    def __init__(self, order: Sequence[QueuedJob], max_passed_over: int, max_extra_wait_s: float) -> None:
        self._k, self._t = max_passed_over, max_extra_wait_s
        n = max(1, len(order))
        size = 1
        while size < n:
            size *= 2
        self._size = size
        self._most = [-math.inf] * (2 * size)  # passed-over count, the most in the subtree (own tag in)
        self._earliest = [math.inf] * (2 * size)  # first-passed time, the earliest in the subtree (own tag in)
        self._alive = [0] * (2 * size)
        self._add = [0] * (2 * size)  # this node's tag: passes every job below it got
        self._cap = [math.inf] * (2 * size)  # this node's tag: a first-passed time for every job below it
        for i, job in enumerate(order):
            leaf = size + i
            self._most[leaf] = job.passed_over
            self._earliest[leaf] = math.inf if job.first_passed_at is None else job.first_passed_at
            self._alive[leaf] = 1
        for node in range(size - 1, 0, -1):
            self._pull(node)

    def _pull(self, node: int) -> None:
        self._rebuild(node, node)

    def _rebuild(self, a: int, b: int) -> None:
        """Recompute nodes ``a`` and ``b`` (one depth) and all their ancestors from their children."""
        most, earliest, alive, add, cap = self._most, self._earliest, self._alive, self._add, self._cap
        inf = math.inf
        while a:
            for node in (a, b) if a != b else (a,):
                left, right = 2 * node, 2 * node + 1
                n = alive[node] = alive[left] + alive[right]
                if n:
                    ml, mr, el, er, c = most[left], most[right], earliest[left], earliest[right], cap[node]
                    most[node] = (ml if ml > mr else mr) + add[node]
                    e = el if el < er else er
                    earliest[node] = e if e < c else c
                else:
                    most[node], earliest[node] = -inf, inf
            a >>= 1
            b >>= 1

    def _apply(self, node: int, now: float) -> None:
        self._add[node] += 1
        if now < self._cap[node]:
            self._cap[node] = now
        if self._alive[node]:
            self._most[node] += 1
            if now < self._earliest[node]:
                self._earliest[node] = now

    def first_at_bound(self, now: float) -> int | None:
        """The first remaining job (fair order) that may not be passed over again, if any. The
        same comparisons as ``AffinityScheduler._at_bound``, on the subtree's extremes."""
        most, earliest, alive, k, t = self._most, self._earliest, self._alive, self._k, self._t
        if not (alive[1] and (most[1] >= k or now - earliest[1] >= t)):
            return None
        node, add, cap = 1, 0, math.inf
        while node < self._size:
            add += self._add[node]
            cap = min(cap, self._cap[node])
            left = 2 * node
            at_bound = alive[left] and (most[left] + add >= k or now - min(earliest[left], cap) >= t)
            node = left if at_bound else left + 1
        return node - self._size

    def pass_over_before(self, end: int, now: float) -> None:
        """Every remaining job at a fair-order index below ``end``: one more pass, first passed at ``now``
        if it never was (times only grow during a plan, so a cap is the same as "set if unset")."""
        if end <= 0:
            return
        lo, hi = self._size, self._size + end
        last = hi - 1
        while lo < hi:  # the O(log n) nodes that exactly cover [0, end)
            if lo & 1:
                self._apply(lo, now)
                lo += 1
            if hi & 1:
                hi -= 1
                self._apply(hi, now)
            lo >>= 1
            hi >>= 1
        self._rebuild(self._size >> 1, last >> 1)  # the covering nodes' ancestors, from below

    def remove(self, index: int) -> None:
        node = self._size + index
        self._most[node], self._earliest[node], self._alive[node] = -math.inf, math.inf, 0
        self._rebuild(node >> 1, node >> 1)


def needed_soon(planned: Sequence[Planned], horizon: int = 8) -> tuple[str, ...]:
    """Models the next ``horizon`` planned jobs need, soonest first, each once."""
    seen: dict[str, None] = {}
    for p in planned[:horizon]:
        seen.setdefault(p.model_id, None)
    return tuple(seen)


def _mean(values: Iterable[float], default: float) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else default
