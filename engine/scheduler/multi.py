"""Which queued job a free GPU worker takes when several workers drain one queue, and the plan
across all of them. Pure: no torch, asyncio or clock.

The engine keeps one global queue and one fair order (passes are counted globally, the pass
bound scaled by the number of workers: ``scaled_bounds``); jobs are never assigned to a worker
ahead of time. When a worker frees up it asks ``pick_for_worker``
with a plain view of itself and of the others. Within the allowed fair prefix (the same one
``AffinityScheduler`` uses, so its bounds hold across all workers), among the jobs whose model
fits this worker's card, the rules in order:

1. ``resident``: the first whose model is ready on this worker;
2. ``parked``: the first whose model is parked in this worker's RAM;
3. ``load``: the first whose model is warm nowhere (not ready, parked or running on any other
   worker): someone has to load it, and this worker is free;
4. ``second_copy``: the first whose model is warm elsewhere, but whose backlog outlasts three of
   its loads (``SECOND_COPY_LOADS``): (expected seconds of that model's queued jobs) / (workers
   holding it), plus the shortest time left on those holders when all are busy; else waiting
   for the holder is cheaper than a second copy;
5. ``bound``: the job at a fairness bound, if it fits here, runs here whatever its model, so
   no bound is ever exceeded by waiting for a warm worker.

Otherwise the worker idles (returns None): every job it could take runs sooner, or as soon, on a
worker that already holds its model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from engine.scheduler.policies import AffinityScheduler, FifoScheduler, Pick, QueuedJob, Scheduler, apply_pick, fair_order
from engine.scheduler.replay import Planned, TimingBook

# A second copy of a model busy elsewhere is loaded when its backlog B outlasts this many of its
# loads L. While the copy loads, the holder keeps draining; then the two split the rest, so the
# backlog clears at L + (B - L) / 2 instead of B: (B - L) / 2 sooner. The copy is worth it when that
# is at least the load it causes later (it takes the room of a model this card held, loaded again
# somewhere): (B - L) / 2 >= L, B >= 3 L. Chosen so, then checked on traces it was not chosen on
# (bench/scheduler.py --workers 4, seeds 11-20: 11.2 loads on average where 1 L made 30-57 on
# seeds 1-10 and 2 L made 21.0; docs/PERFORMANCE.md, "Many workers").
SECOND_COPY_LOADS = 3.0


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What the scheduler knows of one GPU worker."""

    name: str
    resident: frozenset[str]  # models ready on this worker's device
    parked: frozenset[str] = frozenset()  # models parked in its RAM
    fits: frozenset[str] | None = None  # models that can run on its card at all; None: every model
    busy_model: str | None = None  # the model of the job it is running; None: free
    busy_left_s: float = 0.0  # seconds until that job ends

    def can_run(self, model_id: str) -> bool:
        return self.fits is None or model_id in self.fits

    def holds(self, model_id: str) -> bool:
        """Warm here: ready, parked, or running."""
        return model_id in self.resident or model_id in self.parked or model_id == self.busy_model


def pick_for_worker(scheduler: Scheduler, queue: Sequence[QueuedJob], worker: WorkerView,
                    others: Sequence[WorkerView], now: float, book: TimingBook) -> Pick | None:
    """The job ``worker`` should start now, or None if it should idle (see the module docstring).

    With no other workers and ``fits`` None this is exactly ``scheduler.pick``. FIFO takes the
    first job by arrival that fits; any other policy picks among the jobs that fit this worker,
    as if it were alone."""
    if type(scheduler) is not AffinityScheduler:
        fitting = [j for j in queue if worker.can_run(j.model_id)]
        if not fitting:
            return None
        if type(scheduler) is FifoScheduler:
            return Pick(min(fitting, key=lambda j: j.seq).job_id, (), "fifo")
        return scheduler.pick(fitting, worker.resident, now, worker.parked)
    order = fair_order(queue)
    if not order:
        return None
    # the prefix AffinityScheduler.pick uses, over the global queue, with the pass bound for N workers
    scheduler = scaled_bounds(scheduler, len(others) + 1)
    allowed = scheduler._allowed(order, now)
    at_bound = scheduler._at_bound(allowed[-1], now)
    chosen = _choose(allowed, at_bound, queue, worker, others, book)
    if chosen is None:
        return None
    job, reason = chosen
    if reason == "load" and job is allowed[-1] and at_bound:
        reason = "bound"  # as AffinityScheduler names a load that a bound forced
    return Pick(job.job_id, tuple(j.job_id for j in order[: order.index(job)]), reason)


def _choose(allowed: list[QueuedJob], last_at_bound: bool, queue: Sequence[QueuedJob], worker: WorkerView,
            others: Sequence[WorkerView], book: TimingBook) -> tuple[QueuedJob, str] | None:
    """Rules 1-5 of the module docstring over the allowed prefix."""
    candidates = [j for j in allowed if worker.can_run(j.model_id)]
    for job in candidates:
        if job.model_id in worker.resident:
            return job, "resident"
    for job in candidates:
        if job.model_id in worker.parked:
            return job, "parked"
    for job in candidates:
        if not any(o.holds(job.model_id) for o in others):
            return job, "load"
    queued = Counter(j.model_id for j in queue)
    for job in candidates:
        if backlog_s(job.model_id, queued[job.model_id], others, book) > SECOND_COPY_LOADS * book.expected_load_s(job.model_id):
            return job, "second_copy"
    if last_at_bound and candidates and candidates[-1] is allowed[-1]:
        return allowed[-1], "bound"
    return None


def scaled_bounds(scheduler: AffinityScheduler, workers: int) -> AffinityScheduler:
    """The pass bound K for ``workers`` workers: K x workers. A pass is one job started ahead; N
    workers start N jobs in the time one starts one, so K x N passes are the same delay in time as
    K on one card (the time bound T is unchanged). Counting K alone made every job whose model sat
    on a busy worker hit its bound within a round of picks, forcing a load on whichever worker was
    free: 32-57 loads where 15-29 do (bench/scheduler.py --workers 4, seeds 1-10)."""
    if workers <= 1:
        return scheduler
    return AffinityScheduler(scheduler.max_passed_over * workers, scheduler.max_extra_wait_s)


def backlog_s(model_id: str, queued: int, others: Sequence[WorkerView], book: TimingBook) -> float:
    """How long the workers already holding ``model_id`` would take to clear its ``queued`` jobs:
    the work split among them, after the first of them frees up when all are busy."""
    holders = [o for o in others if o.holds(model_id)]
    if not holders:
        return 0.0
    wait = min(o.busy_left_s for o in holders) if all(o.busy_model is not None for o in holders) else 0.0
    return book.expected_generate_s(model_id) * queued / len(holders) + wait


# -- the plan across workers -----------------------------------------------------------------------


@dataclass(slots=True)
class _Lane:
    """One worker while a plan is replayed: when it frees up, what its card holds (least recently
    used first), and whether it idled since the last job started anywhere."""

    view: WorkerView
    free_at: float  # on the caller's clock (absolute, as replay.plan counts, so the sums match)
    ready: list[str]
    keep: int  # how many models stay ready at once, as in replay.plan
    running: str | None
    idle: bool = False

    def at(self, t: float) -> WorkerView:
        busy = self.free_at > t
        return WorkerView(self.view.name, frozenset(self.ready), self.view.parked, self.view.fits,
                          self.running if busy else None, self.free_at - t if busy else 0.0)


def plan_workers(scheduler: Scheduler, queue: Sequence[QueuedJob], workers: Sequence[WorkerView], now: float,
                 book: TimingBook, *, limit: int | None = None) -> list[Planned]:
    """The order the queue would run in across ``workers`` if nothing else arrived, with start
    times, each job's worker, and whether it loads; ``pick_for_worker`` asked pick by pick.

    The worker that frees first picks. One that idles waits for the next job to start anywhere
    (the only change that can give it work) and is asked again then. If every worker idles and
    none is busy, the first with a job it can take loads it anyway, so the plan ends. Jobs no
    worker can take (their model fits no card, or they wait behind one at its bound) stay out of
    the plan. A card keeps as many models ready as it holds now (at least one), least recently
    used going first, as ``replay.plan`` assumes. O(n^2 log n) for n queued jobs and a few workers."""
    lanes = [_lane(w, now) for w in workers]
    left = list(queue)
    out: list[Planned] = []
    while left and lanes and (limit is None or len(out) < limit):
        waiting = [lane for lane in lanes if not lane.idle]
        if waiting:
            lane = min(waiting, key=lambda w: w.free_at)
            t = lane.free_at
            pick = pick_for_worker(scheduler, left, lane.at(t), [o.at(t) for o in lanes if o is not lane], t, book)
        else:
            t = max(w.free_at for w in lanes)
            lane, pick = _forced(scheduler, left, lanes, t)
        if pick is None:
            if not waiting:
                break
            lane.idle = True
            continue
        job = next(j for j in left if j.job_id == pick.job_id)
        left = apply_pick(left, pick, t)
        for other in lanes:
            if other.idle:
                other.idle, other.free_at = False, max(other.free_at, t)
        out.append(_run(lane, job, t, now, book, len(out) + 1))
    return out


def _lane(worker: WorkerView, now: float) -> _Lane:
    ready = list(worker.resident)
    if worker.busy_model is not None and worker.busy_model not in ready:
        ready.append(worker.busy_model)
    busy_for = worker.busy_left_s if worker.busy_model is not None else 0.0
    return _Lane(worker, now + busy_for, ready, max(1, len(ready)), worker.busy_model)


def _forced(scheduler: Scheduler, queue: Sequence[QueuedJob], lanes: list[_Lane],
            now: float) -> tuple[_Lane, Pick | None]:
    """Every worker idles and none is busy: the first allowed job some worker can take, loaded there."""
    if type(scheduler) is not AffinityScheduler:
        return lanes[0], None  # the other policies idle only when nothing fits
    order = fair_order(queue)
    allowed = scaled_bounds(scheduler, len(lanes))._allowed(order, now)
    for lane in sorted(lanes, key=lambda w: w.free_at):
        job = next((j for j in allowed if lane.view.can_run(j.model_id)), None)
        if job is not None:
            return lane, Pick(job.job_id, tuple(j.job_id for j in order[: order.index(job)]), "load")
    return lanes[0], None


def _run(lane: _Lane, job: QueuedJob, t: float, now: float, book: TimingBook, position: int) -> Planned:
    """Start ``job`` on ``lane`` at ``t``: the model made ready (least recently used goes), the clock moved on."""
    loads = job.model_id not in lane.ready
    end = t
    if loads:
        end += book.expected_load_s(job.model_id)
    end += book.expected_generate_s(job.model_id)
    if not loads:
        lane.ready.remove(job.model_id)
    lane.ready.append(job.model_id)
    del lane.ready[: max(0, len(lane.ready) - lane.keep)]
    lane.free_at, lane.running = end, job.model_id
    return Planned(job.job_id, job.model_id, position, t - now, end - now, loads, lane.view.name)
