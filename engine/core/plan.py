"""One cached queue plan: the order the scheduler expects to run the queue in, with positions
and ETAs, computed once per change of the queue, the loaded models or the recorded costs.

Before this, every status message asked for its own plan each time the queue moved: n waiting
jobs x an O(n^2 log n) plan on every job start. Now the engine computes one ``QueuePlan``
(O(n log n), ``engine.scheduler.plan``) when something it depends on changed, and every reader —
``Engine.eta``, ``queue_snapshot``, the ``QueueMoved`` event — reads it in O(1) per job.

A plan stores each job's *offset*: the seconds from the end of the running job until its image,
from the per-job costs (steps x size per model, loads where the plan expects one). An ETA is the
running job's time left, read live, plus that offset.

What a job is expected to cost (``CostBook``) is learned from recorded timings. The scheduler's ``TimingBook`` knows one number per model. A job's time depends on what it
asks for too (4 steps or 50, 256 px or 768 px), so ``CostBook`` keeps, per model, the recent
jobs' ``(work, seconds)`` with ``work = steps x megapixels`` and fits

    generate_s = per_work * work + fixed            (both >= 0; least squares)

where ``generate_s`` is the time the job held the GPU thread, its model load apart, and ``fixed``
is what does not grow with steps: text encoders, VAE decode, safety checks, PNG, history.
With one kind of job only (no spread in ``work``) it falls back to a line through the origin.
It is a ``TimingBook`` as well (the per-model means the planner uses), so one object feeds both
the scheduler's plan and the ETAs, and it is seeded from the history at start: ETAs are right
after a restart, not only after the first jobs of the day.

A job is not guessed at for users when nothing recorded is like it: ``confident`` wants
recorded jobs of its model whose work spans within ``REACH`` times of its own (one 2-step
warm-up says little about a 300-step job: most of its time was the fixed part). The engine
shows no ETA then rather than a made-up one; the queue listing still gets a number.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from engine.cluster import Worker
from engine.config import Config
from engine.core.job import LiveJob
from engine.history import StoredJob
from engine.jobs import EngineEvent, GenerationParams, JobStatus, QueueMoved, QueuePlace
from engine.scheduler import Planned, QueuedJob, Scheduler, TimingBook, WorkerView, fair_order, plan, plan_workers

WINDOW = 64  # recent jobs per model: old enough to average, young enough to follow a new GPU
WORKERS_PLAN_DEPTH = 64  # several workers: jobs planned worker by worker (and shown an ETA); the rest in fair order
REACH = 3.0  # how far (as a factor of work) beyond the recorded jobs an estimate is still shown


def work_units(steps: int, width: int, height: int) -> float:
    """steps x megapixels: what the denoising time grows with."""
    return steps * width * height / 1e6


@dataclass(frozen=True, slots=True)
class Fit:
    per_work: float  # seconds per step-megapixel
    fixed: float  # seconds per job, whatever its size

    def seconds(self, work: float) -> float:
        return self.per_work * work + self.fixed


def fit_costs(samples: Iterable[tuple[float, float]]) -> Fit | None:
    """Least squares ``y = a x + c`` with ``a, c >= 0`` over ``(work, seconds)`` pairs, fitted
    again without the outliers (the first run after a load warming kernels up, a job slowed by
    a safety retry): residuals further than 3 scaled MADs from the median are dropped."""
    pts = [(x, y) for x, y in samples if x > 0 and y >= 0]
    fit = _least_squares(pts)
    if fit is None or len(pts) < 5:
        return fit
    residuals = [y - fit.seconds(x) for x, y in pts]
    centre = statistics.median(residuals)
    spread = 1.4826 * statistics.median(abs(r - centre) for r in residuals)  # a standard deviation, robustly
    limit = 3 * spread + 0.02 * statistics.mean(y for _, y in pts)
    kept = [p for p, r in zip(pts, residuals) if abs(r - centre) <= limit]
    return _least_squares(kept) if 3 <= len(kept) < len(pts) else fit


def _least_squares(pts: list[tuple[float, float]]) -> Fit | None:
    if not pts:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if n >= 3 and max(x for x, _ in pts) >= 1.5 * min(x for x, _ in pts):  # enough spread to tell a from c
        a = sum((x - mx) * (y - my) for x, y in pts) / sxx
        c = my - a * mx
        if a >= 0 and c >= 0:
            return Fit(a, c)
        if a < 0:  # more work took less time: noise; the mean is the honest answer
            return Fit(0.0, my)
    # through the origin: the ratio of sums
    return Fit(sum(y for _, y in pts) / sum(x for x, _ in pts), 0.0)


@dataclass(slots=True)
class CostBook(TimingBook):
    """Per-model job costs from recorded timings (see the module docstring)."""

    samples: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    fits: dict[str, Fit | None] = field(default_factory=dict)

    def record_job(self, params: GenerationParams, *, generate_s: float, load_s: float = 0.0) -> None:
        """One finished job (its final parameters: the model that made the image)."""
        self.record(params.model_id, generate_s=generate_s, load_s=load_s)
        window = self.samples.setdefault(params.model_id, deque(maxlen=WINDOW))
        window.append((work_units(params.steps, params.width, params.height), generate_s))
        self.fits.pop(params.model_id, None)

    def seed(self, jobs: Iterable[tuple[GenerationParams, float, float]]) -> int:
        """``(params, generate_s, load_s)`` of succeeded jobs, oldest first. Returns how many."""
        count = 0
        for params, generate_s, load_s in jobs:
            if generate_s > 0:
                self.record_job(params, generate_s=generate_s, load_s=load_s)
                count += 1
        return count

    def known(self, model_id: str) -> bool:
        return bool(self.samples.get(model_id))

    def confident(self, params: GenerationParams) -> bool:
        """Recorded jobs of this model come within ``REACH`` times of this one's work."""
        samples = self.samples.get(params.model_id)
        if not samples:
            return False
        work = work_units(params.steps, params.width, params.height)
        return min(x for x, _ in samples) / REACH <= work <= max(x for x, _ in samples) * REACH

    def knows_load(self, model_id: str) -> bool:
        return model_id in self.load_s

    def fit(self, model_id: str) -> Fit | None:
        if model_id not in self.fits:
            self.fits[model_id] = fit_costs(self.samples.get(model_id, ()))
        return self.fits[model_id]

    def job_s(self, params: GenerationParams) -> float:
        """Expected generate seconds of this job (every model it may need, not the load)."""
        fit = self.fit(params.model_id)
        if fit is None:
            return self.expected_generate_s(params.model_id)
        return fit.seconds(work_units(params.steps, params.width, params.height))

    def remaining_s(self, params: GenerationParams, elapsed_s: float, step: int = 0,
                    step_pace_s: float | None = None) -> float:
        """What is left of a running job: from its own pace once two steps are known, else the
        expected total less what has gone by. Never below the fixed part still to come (the
        decode), nor below zero."""
        expected = self.job_s(params)
        fit = self.fit(params.model_id)
        tail = min(fit.fixed, 0.5 * expected) if fit is not None else 0.0
        if step_pace_s is not None and step >= 2:
            return max(0.0, (params.steps - step) * step_pace_s + tail)
        return max(tail, expected - elapsed_s)


@dataclass(frozen=True, slots=True)
class QueuePlan:
    key: Hashable  # what it was computed from; another key: compute again
    planned: tuple[Planned, ...]
    offsets: tuple[float, ...]  # per planned job: seconds after the running job ends until its image
    grounded: int  # how many leading jobs have recorded costs behind them (the rest: no ETA shown)
    index: Mapping[str, int]  # job id -> index in ``planned``
    made_at: float = 0.0  # perf_counter when it was made (several workers: offsets count from here)

    def position(self, job_id: str) -> int | None:
        i = self.index.get(job_id)
        return None if i is None else i + 1

    def eta(self, job_id: str, running_left_s: float, running_grounded: bool) -> float | None:
        """Seconds until ``job_id``'s image, or None where it would rest on defaults."""
        i = self.index.get(job_id)
        if i is None or not running_grounded or i >= self.grounded:
            return None
        return round(running_left_s + self.offsets[i], 1)

    def rough_eta(self, job_id: str, running_left_s: float) -> float:
        """The same, defaults included (the admin's queue listing wants a number for every job)."""
        return round(running_left_s + self.offsets[self.index[job_id]], 1)


def build_plan(key: Hashable, scheduler: Scheduler, queue: Sequence[QueuedJob],
               params: Mapping[str, GenerationParams], resident: Collection[str], parked: Collection[str],
               now: float, book: CostBook, busy_for_s: float) -> QueuePlan:
    """Plan the whole queue once, then walk it adding each job's own cost."""
    planned = tuple(plan(scheduler, queue, resident, now, book, parked=parked, busy_for_s=busy_for_s))
    return _with_offsets(key, planned, params, book, now, several=False)


def build_plan_workers(key: Hashable, scheduler: Scheduler, queue: Sequence[QueuedJob],
                       params: Mapping[str, GenerationParams], workers: Sequence[WorkerView], now: float,
                       book: CostBook) -> QueuePlan:
    """The plan across several workers (``plan_workers``): each job's offset is its planned end,
    counted from ``now``, its own cost in place of its model's mean.

    Simulating N workers is O(n^2) in the queue, so it plans the first ``WORKERS_PLAN_DEPTH`` jobs;
    the rest follow in fair order, after them, with no ETA shown (their position is still theirs)."""
    planned = plan_workers(scheduler, queue, workers, now, book, limit=WORKERS_PLAN_DEPTH)
    shown = _with_offsets(key, tuple(planned), params, book, now, several=True)
    taken = {p.job_id for p in planned}
    after = max((p.start_s for p in planned), default=0.0)
    rest = [Planned(j.job_id, j.model_id, len(planned) + i + 1, after, after, False)
            for i, j in enumerate(j for j in fair_order(queue) if j.job_id not in taken)]
    if not rest:
        return shown
    everything = tuple(planned) + tuple(rest)
    offsets = shown.offsets + tuple(after + book.job_s(params[p.job_id]) for p in rest)
    return QueuePlan(key, everything, offsets, shown.grounded, {p.job_id: i for i, p in enumerate(everything)}, now)


def _with_offsets(key: Hashable, planned: tuple[Planned, ...], params: Mapping[str, GenerationParams],
                  book: CostBook, now: float, *, several: bool) -> QueuePlan:
    """One worker: the jobs run one after the other, each adding its own cost. Several: each job
    starts when its worker is planned to take it (``start_s``)."""
    offsets: list[float] = []
    grounded, still_grounded, t = 0, True, 0.0
    for p in planned:
        job = params[p.job_id]
        if several:
            t = p.start_s
        if p.loads:
            t += book.expected_load_s(p.model_id)
            still_grounded = still_grounded and book.knows_load(p.model_id)
        t += book.job_s(job)
        still_grounded = still_grounded and book.confident(job)
        grounded += still_grounded
        offsets.append(t)
    return QueuePlan(key, planned, tuple(offsets), grounded, {p.job_id: i for i, p in enumerate(planned)}, now)


@dataclass(frozen=True, slots=True)
class QueueEntry:
    job_id: str
    position: int  # 0 = running now
    model_id: str
    user: str
    status: JobStatus
    waited_s: float
    eta_s: float | None = None  # seconds until the image is expected, from recorded per-model timings
    worker: str = ""  # the worker running it (position 0)


def recorded_busy_s(job: StoredJob) -> float:
    """A recorded job's time on the GPU thread, its load apart (as the dispatcher records it live)."""
    t = job.timings
    return max(t.generate_s, t.total_s - t.queue_wait_s - t.load_s)


class QueuePlanner:
    """The engine's reading of its queue: the cached plan, positions, ETAs and ``QueueMoved``.
    A base of ``Engine``; the state it reads is set in ``Engine.__init__``.

    One worker (embedded, the default): the plan runs after the running job, in the scheduler's
    order (``engine.scheduler.plan``, O(n log n)); an ETA is what is left of the running job plus
    the job's offset. Several workers: each frees up in its own time, so the plan simulates them
    all with the rule the dispatcher picks by (``plan_workers``), from the moment it was made; an
    ETA is the job's offset less the time gone by since."""

    config: Config
    _queue: deque[LiveJob]
    _jobs: dict[str, LiveJob]
    _running: dict[str, LiveJob]  # worker name -> the job it runs
    _workers: list[Worker]
    _scheduler: Scheduler
    _timings: CostBook
    _subscribers: set[asyncio.Queue[EngineEvent]]
    _queue_version: int
    _costs_version: int
    _plan_cache: QueuePlan | None
    _publish_pending: bool

    def queue_snapshot(self) -> list[QueueEntry]:
        """The running jobs (position 0) and the queue in the order the scheduler expects to run
        it, each with an ETA from the recorded timings (defaults where none are recorded yet).
        Reads the cached plan: O(n)."""
        now = time.perf_counter()
        entries = [self._entry(job, 0, now, self._left_s(job, now)) for job in self._running.values()]
        queue_plan = self._current_plan()
        base = self._eta_base(now)
        entries += [self._entry(self._jobs[p.job_id], p.position, now, queue_plan.rough_eta(p.job_id, base))
                    for p in queue_plan.planned]
        return entries

    def eta(self, job_id: str) -> float | None:
        """Seconds until ``job_id``'s image is expected: what is left of the running job(s), then
        the jobs the scheduler would run first, each at its recorded cost (steps x size per
        model, load times where a model must be loaded). None for a job not running or queued,
        or while a job on the way has nothing recorded like it (no made-up numbers). O(1) on
        the cached plan."""
        now = time.perf_counter()
        job = self._jobs.get(job_id)
        if job is not None and job.worker and self._running.get(job.worker) is job:
            return self._left_s(job, now) if self._grounded(job) else None
        grounded = all(self._grounded(j) for j in self._running.values())
        return self._current_plan().eta(job_id, self._eta_base(now), grounded)

    def _position(self, job_id: str) -> int:
        return self._current_plan().position(job_id) or len(self._queue)

    def _current_plan(self) -> QueuePlan:
        """The cached plan, computed again only when the queue, the loaded models, the running
        jobs or the recorded costs changed since."""
        placements = tuple(w.placement_sets() for w in self._workers)
        running = tuple(sorted((name, j.id) for name, j in self._running.items()))
        key = (self._queue_version, self._costs_version, placements, running)
        if self._plan_cache is None or self._plan_cache.key != key:
            now = time.perf_counter()
            views, params = [j.view() for j in self._queue], {j.id: j.params for j in self._queue}
            if len(self._workers) > 1:
                self._plan_cache = build_plan_workers(key, self._scheduler, views, params, self._worker_views(now),
                                                      now, self._timings)
            else:
                ready, parked = placements[0] if placements else (frozenset(), frozenset())
                job = next(iter(self._running.values()), None)
                if job is not None:  # its model is ready once it finishes
                    ready |= {job.params.model_id}
                self._plan_cache = build_plan(key, self._scheduler, views, params, ready, parked, now, self._timings,
                                              self._left_s(job, now))
        return self._plan_cache

    def _worker_views(self, now: float) -> list[WorkerView]:
        """What the multi-worker rule sees of each live worker: its placements, what it can hold,
        the model it is busy with and for how long."""
        views = []
        for w in self._workers:
            if not w.alive:
                continue
            ready, parked = w.placement_sets()
            job = self._running.get(w.info.name)
            busy = job.params.model_id if job is not None else None
            fits = frozenset(m for m in self.config.models if w.fits(m))
            views.append(WorkerView(w.info.name, ready | ({busy} if busy else set()), parked, fits, busy,
                                    self._left_s(job, now)))
        return views

    def _eta_base(self, now: float) -> float:
        """What a plan offset is counted from: the end of the running job (one worker), or the
        moment the plan was made (several: offsets are from then)."""
        if len(self._workers) > 1:
            assert self._plan_cache is not None
            return self._plan_cache.made_at - now
        job = next(iter(self._running.values()), None)
        return self._left_s(job, now)

    def _queue_changed(self) -> None:
        """Something the plan depends on changed: one ``QueueMoved`` goes out once the loop is
        free, however many changes this loop iteration made."""
        self._queue_version += 1
        if self._subscribers and not self._publish_pending:
            self._publish_pending = True
            asyncio.get_running_loop().call_soon(self._publish_plan)

    def _publish_plan(self) -> None:
        self._publish_pending = False
        if not self._subscribers:
            return
        queue_plan = self._current_plan()
        now = time.perf_counter()
        base = self._eta_base(now)
        grounded = all(self._grounded(j) for j in self._running.values())
        places = tuple(QueuePlace(p.job_id, p.position, queue_plan.eta(p.job_id, base, grounded))
                       for p in queue_plan.planned)
        event = QueueMoved(places, next(iter(self._running.values())).id if self._running else None)
        for q in self._subscribers:
            q.put_nowait(event)

    def _entry(self, j: LiveJob, position: int, now: float, eta_s: float) -> QueueEntry:
        user = j.request.requester.display_name or j.request.requester.user_id
        return QueueEntry(j.id, position, j.params.model_id, user, j.status, now - j.queued_mono, round(eta_s, 1),
                          j.worker if position == 0 else "")

    def _left_s(self, job: LiveJob | None, now: float) -> float:
        """What is left of a running job (0 for none)."""
        if job is None or job.started_mono is None:
            return 0.0
        pace = None
        if job.step >= 2 and job.first_step_at is not None and job.last_step_at is not None:
            pace = (job.last_step_at - job.first_step_at) / (job.step - 1)
        if job.step == 0:  # loading or encoding the prompt: the load, if one was expected, is still ahead
            return self._timings.remaining_s(job.params, now - job.started_mono - job.load_expected_s)
        steps_from = job.first_step_at if job.first_step_at is not None else job.started_mono
        return self._timings.remaining_s(job.params, now - steps_from, job.step, pace)

    def _grounded(self, job: LiveJob) -> bool:
        """A running job's remaining time rests on something measured: its own pace (two
        steps in), or recorded jobs of its model (and a recorded load, if it loads)."""
        if job.step >= 2:
            return True
        return self._timings.confident(job.params) and (
            job.load_expected_s == 0.0 or self._timings.knows_load(job.params.model_id))
