"""The queue's plan: the order a policy would run the queue in if nothing else arrived, with
start times from recorded per-model timings. O(n log n) for the shipped policies (an affinity
replay over a lazy segment tree, FIFO by arrival); any other policy is replayed pick by pick."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.scheduler.policies import AffinityScheduler, FifoScheduler, QueuedJob, Scheduler, apply_pick, fair_order


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
    worker: str = ""  # which worker runs it (multi.plan_workers); "" from plan(): the one worker


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
