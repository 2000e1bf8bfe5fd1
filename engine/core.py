"""Engine: submit, cancel, status and events; owns the queue, the GPU thread and its runner.

Everything here runs on the asyncio loop and never waits on torch: torch work is handed to
the ``GpuExecutor`` and awaited as a future; progress comes back with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from engine.admission import Admission
from engine.config import Config
from engine.errors import EngineClosedError, EngineError, JobCancelledError
from engine.eta import CostBook
from engine.executor import GpuExecutor, JobRunner, RunOutput, default_runner_blocking
from engine.history import DataFolderLock, Deliveries, HistoryStore, StorageError, StoredJob
from engine.jobs import (
    FINAL_EVENTS,
    EngineEvent,
    GenerationParams,
    JobCancelled,
    JobEvent,
    JobFailed,
    JobFinished,
    JobPreviewed,
    JobProgressed,
    JobQueued,
    JobRequest,
    JobResult,
    JobStarted,
    JobStatus,
    QueueMoved,
    QueuePlace,
    Timings,
)
from engine.llm import ChatLLM, LLMCache
from engine.normalise import clean_prompt, normalise, requested_model
from engine.plan import QueuePlan, build_plan
from engine.pipelines import configure_torch_blocking, resolve_device_blocking, resolve_dtype
from engine.previews import Preview
from engine.residency import ResidencyStatus, ResidentModel
from engine.router import Router, build_router, explicit_choice
from engine.safety import Attempt
from engine.scheduler import Planned, QueuedJob, RoundRobin, make_scheduler, needed_soon, plan

log = logging.getLogger(__name__)

STOPPED_MESSAGE = "The bot stopped before your job finished; it is kept and will run when the bot is back."
SEED_JOBS = 500  # recent finished jobs read at start to seed the ETAs


@dataclass(slots=True, eq=False)
class _Job:
    id: str
    request: JobRequest
    params: GenerationParams
    events: asyncio.Queue[JobEvent]
    created_at: float = field(default_factory=time.time)
    queued_mono: float = field(default_factory=time.perf_counter)
    status: JobStatus = JobStatus.QUEUED
    cancel: threading.Event = field(default_factory=threading.Event)
    cancelled_by_user: bool = False  # else a set cancel flag means "the engine is stopping"
    # what the scheduler sees (engine/scheduler.py): arrival order, round-robin tag, fairness
    seq: int = 0
    fair_tag: float = 0.0
    passed_over: int = 0
    first_passed_at: float | None = None
    started_mono: float | None = None
    # what the ETAs see of a running job (written on the GPU thread, read on the loop)
    load_expected_s: float = 0.0
    step: int = 0
    first_step_at: float | None = None
    last_step_at: float | None = None
    previewed: bool = False  # a preview went out for the current attempt
    _view: QueuedJob | None = None  # what ``view`` built last; dropped when what it shows changes

    @property
    def user_key(self) -> str:
        return _user_key(self.request)

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


class JobHandle:
    """What ``submit`` returns: the job's id and parameters, its events, a way to cancel it."""

    def __init__(self, engine: Engine, job: _Job, position: int) -> None:
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


@dataclass(frozen=True, slots=True)
class QueueEntry:
    job_id: str
    position: int  # 0 = running now
    model_id: str
    user: str
    status: JobStatus
    waited_s: float
    eta_s: float | None = None  # seconds until the image is expected, from recorded per-model timings


class Engine:
    """``async with Engine(config) as engine: handle = await engine.submit(JobRequest(...))``."""

    def __init__(self, config: Config, *, history: HistoryStore | None = None, router: Router | None = None,
                 runner_factory: Callable[[Config, Any, Any], JobRunner] | None = None) -> None:
        self.config = config
        self._history = history  # None: the engine opens (and closes) the one in config.data_dir
        self._owns_history = history is None
        self._data_lock: DataFolderLock | None = None  # one process runs the jobs of a data folder
        self._resumed: dict[str, JobHandle] = {}  # jobs taken back at start, until each is final
        # The router LLM runs on the GPU thread, between jobs (docs/ROUTER.md).
        self._router = router or build_router(
            config, run_on_gpu_thread=lambda fn, *args: self._executor.submit(fn, *args), llm=self._router_llm_blocking)
        self._runner_factory = runner_factory or default_runner_blocking
        self._executor = GpuExecutor()
        self._scheduler = make_scheduler(config.scheduler)
        self._round_robin = RoundRobin()
        self._timings = CostBook()  # the scheduler's per-model timings and the per-job ETA costs
        self._arrivals = itertools.count()
        self._runner: JobRunner | None = None
        self._llms: LLMCache | None = None  # the chat LLMs, shared by the router and the safety rewriter
        self._queue: deque[_Job] = deque()
        self._jobs: dict[str, _Job] = {}
        self._running: _Job | None = None
        self._wakeup = asyncio.Event()
        self._closing = False
        self._admission = Admission(config.limits.max_queued_jobs, config.scheduler.max_queued_per_user)
        self._admitting = 0  # submits past their seat, not yet queued (aclose waits for them)
        self._admitted = asyncio.Event()  # set while _admitting is 0
        self._admitted.set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._subscribers: set[asyncio.Queue[EngineEvent]] = set()
        # the cached queue plan and what it depends on (engine/plan.py)
        self._queue_version = 0
        self._costs_version = 0
        self._plan_cache: QueuePlan | None = None
        self._publish_pending = False
        self.device: Any = None

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        # 1. own the data folder, before anything is taken back from its history: a second
        #    process would otherwise adopt (and run again) the live one's jobs
        folder = self._history.data_dir if self._history is not None else self.config.data_dir
        self._data_lock = await asyncio.to_thread(DataFolderLock.acquire, folder)
        try:
            if self._history is None:
                self._history = await HistoryStore.open(self.config.data_dir,
                                                        busy_timeout_s=self.config.history.busy_timeout_s)
            self._executor.start()
            try:
                # 2. the GPU thread, the runner, the ETAs; 3. the jobs an earlier run left
                self._runner = await self._executor.submit(self._setup_blocking)
                await self._seed_timings()
                await self._take_back_unfinished()
                if self.config.history.keep_images_days:
                    await self.history.prune_images(self.config.history.keep_images_days)
            except BaseException:
                self._admission.closed = True
                await self._executor.stop()
                await self._close_history()
                raise
        except BaseException:
            self._release_data_folder()
            raise
        self._dispatcher = asyncio.create_task(self._dispatch(), name="promptpics-dispatcher")
        return self

    @property
    def resumed(self) -> list[JobHandle]:
        """Handles of the jobs taken back from the history at start that are not final yet
        (each is released when its job ends: a long-running bot keeps none of them)."""
        return list(self._resumed.values())

    @property
    def history(self) -> HistoryStore:
        assert self._history is not None, "enter the engine first (async with Engine(...))"
        return self._history

    @property
    def deliveries(self) -> Deliveries:
        """Which chat messages show which job: the bot records and looks up its messages here."""
        return Deliveries(self.history)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _setup_blocking(self) -> JobRunner:
        device = resolve_device_blocking(self.config.device)
        configure_torch_blocking(device)
        self.device = device
        return self._runner_factory(self.config, device, resolve_dtype(device, self.config.cuda_dtype))

    def _llm_cache_blocking(self) -> LLMCache:
        """GPU thread: the runner's chat-LLM cache (the safety rewriter's), or one of our own."""
        if self._llms is None:
            self._llms = getattr(self._runner, "llms", None) or LLMCache(
                self.device, resolve_dtype(self.device, self.config.cuda_dtype))
        return self._llms

    def _router_llm_blocking(self) -> ChatLLM:
        return self._llm_cache_blocking().get_blocking(self.config.router_llm_id)

    async def warm_up_router(self) -> None:
        """Load the router's embedding model and LLM now rather than on the first prompt."""
        warm_up = getattr(self._router, "warm_up", None)
        if warm_up is not None:
            await warm_up()

    async def aclose(self) -> None:
        """Stop taking jobs and interrupt the running one. Queued and interrupted jobs stay in
        the history and run after the next start; their handles here get EngineStopped."""
        if self._closing:
            return
        self._closing = self._admission.closed = True  # from here on, submits are refused at once
        while self._queue:
            job = self._queue.popleft()
            self._admission.release(job.user_key)
            self._emit_final(job, JobFailed(job.id, "EngineStopped", STOPPED_MESSAGE))
        if self._running is not None:
            self._running.cancel.set()
        self._wakeup.set()
        if self._dispatcher is not None:
            await self._dispatcher
        # submits already past their seat finish (routing may still use the GPU thread): each
        # ends recorded and answered "kept for the next start", or refused
        await self._admitted.wait()
        if self._runner is not None:
            await self._executor.submit(self._runner.residency.unload_all_blocking)
        llms = self._llms or getattr(self._runner, "llms", None)
        if llms is not None:
            await self._executor.submit(llms.release_all_blocking)
        router_aclose = getattr(self._router, "aclose", None)
        if router_aclose is not None:
            await router_aclose()
        await self._executor.stop()
        await self._close_history()
        self._release_data_folder()

    def _release_data_folder(self) -> None:
        if self._data_lock is not None:
            self._data_lock.release()
            self._data_lock = None

    async def _close_history(self) -> None:
        if self._owns_history and self._history is not None:
            await self._history.close()

    async def _seed_timings(self) -> None:
        """ETAs from the first job on: the recent finished jobs' timings, oldest first."""
        jobs = [j for j in reversed(await self.history.recent_jobs(limit=SEED_JOBS))
                if j.status is JobStatus.SUCCEEDED and j.params.model_id in self.config.models]
        seeded = self._timings.seed((j.params, _busy_s(j), j.timings.load_s) for j in jobs)
        if seeded:
            log.info("ETAs seeded from %d recorded job(s)", seeded)

    async def _take_back_unfinished(self) -> None:
        """Jobs that were queued or running when the last process died run again, in their
        original order (a running one restarts from scratch as a new attempt)."""
        for stored in await self.history.requeue_interrupted():
            if stored.params.model_id not in self.config.models:
                message = f"Model `{stored.params.model_id}` is no longer configured, so this job cannot run."
                await self.history.record_failed(stored.id, error_kind="ModelLoadError", error_message=message,
                                                 timings=stored.timings, finished_at=time.time())
                continue
            job = self._job_from_history(stored)
            self._jobs[job.id] = job
            self._admission.hold(job.user_key)  # accepted by the earlier run: no cap applies again
            self._enqueue(job)
            self._resumed[job.id] = JobHandle(self, job, len(self._queue))
        for handle in self._resumed.values():  # one plan for them all
            handle.position = self._position(handle.id)
            self._emit(handle._job, JobQueued(handle.id, handle.position, handle.params, resumed=True,
                                              eta_s=self.eta(handle.id)))
        if self._resumed:
            log.info("took back %d unfinished job(s) from the history", len(self._resumed))

    @staticmethod
    def _job_from_history(stored: StoredJob) -> _Job:
        p = stored.params
        request = JobRequest(prompt=p.prompt, model=stored.model_asked, negative_prompt=p.negative_prompt,
                             steps=p.steps, guidance=p.guidance, width=p.width, height=p.height, seed=p.seed,
                             requester=stored.requester, origin=stored.origin, nsfw_allowed=stored.nsfw_allowed)
        waited = max(0.0, time.time() - stored.created_at)
        return _Job(id=stored.id, request=request, params=p, events=asyncio.Queue(), created_at=stored.created_at,
                    queued_mono=time.perf_counter() - waited)

    # -- the public surface ----------------------------------------------------------------

    async def submit(self, request: JobRequest) -> JobHandle:
        """Validate, route, queue. Raises RequestError / QueueFullError with a ready sentence.

        Rule 6 (decide, then await): the seat in the queue is checked and taken before the first
        await and given back if anything after it fails, so concurrent submits cannot pass a cap.
        Once the job is being recorded it is as good as accepted: a caller cancelled from then on
        (a dropped interaction) does not take it back half-written; it is queued and delivered."""
        prompt = clean_prompt(request.prompt, self.config.limits)
        explicit = requested_model(request, self.config)
        user = _user_key(request)
        self._admission.reserve(user)  # raises: closing, queue full, this user at the cap
        self._admitting += 1
        self._admitted.clear()
        try:
            params = await self._route(request, prompt, explicit)
            if self._closing:
                raise EngineClosedError("submit")
            queuing = asyncio.ensure_future(self._record_and_queue(request, params, explicit))
        except BaseException:
            self._admission.release(user)
            self._admission_done()
            raise
        queuing.add_done_callback(self._queued_or_failed)
        return await asyncio.shield(queuing)

    async def _route(self, request: JobRequest, prompt: str, explicit: str | None) -> GenerationParams:
        if explicit:
            decision = explicit_choice(explicit, self.config)
        else:  # a near tie goes to a model that is already loaded
            decision = await self._router.route(prompt, resident=self._resident_ids())
        return normalise(request, self.config.model(decision.model_id), self.config, route_reason=decision.reason)

    async def _record_and_queue(self, request: JobRequest, params: GenerationParams, explicit: str | None) -> JobHandle:
        """The seat is held: record the job, then queue it on that seat (or give it back)."""
        created = time.time()
        try:
            # Recorded before it is acknowledged: once submit returns, a crash cannot lose the job.
            stored = await self.history.record_queued(requester=request.requester, origin=request.origin,
                                                      model_asked=explicit, params=params, created_at=created,
                                                      nsfw_allowed=request.nsfw_allowed)
        except BaseException:
            self._admission.release(_user_key(request))
            raise
        job = _Job(id=stored.id, request=request, params=params, events=asyncio.Queue(), created_at=created)
        if self._closing:  # stopped while it was being recorded: it is kept, and runs after the next start
            self._admission.release(job.user_key)
            self._emit(job, JobFailed(job.id, "EngineStopped", STOPPED_MESSAGE))
            return JobHandle(self, job, 0)
        self._jobs[job.id] = job
        self._enqueue(job)  # the seat held since the start of submit is the job's now
        position = self._position(job.id)
        eta_s = self.eta(job.id)
        log.info("job %s: queued #%d for %s (%s)%s", job.id, position, params.model_id, params.route_reason,
                 f", ETA {eta_s:.1f} s" if eta_s is not None else "")
        self._emit(job, JobQueued(job.id, position, params, eta_s=eta_s))
        self._wakeup.set()
        return JobHandle(self, job, position)

    def _queued_or_failed(self, queuing: asyncio.Future[JobHandle]) -> None:
        if not queuing.cancelled() and queuing.exception() is not None:  # retrieved: its caller may be gone
            log.debug("a submit failed while recording: %s", queuing.exception())
        self._admission_done()

    def _admission_done(self) -> None:
        self._admitting -= 1
        if not self._admitting:
            self._admitted.set()

    async def cancel(self, job_id: str) -> bool:
        """Queued: removed at once. Running: stopped within one denoising step. Else False."""
        job = self._jobs.get(job_id)
        if job is None or job.status.is_final:
            return False
        if job.status is JobStatus.QUEUED and job in self._queue:
            self._dequeue(job)
            await self._finish(job, JobStatus.CANCELLED, JobCancelled(job.id, while_running=False))
            return True
        job.cancelled_by_user = True
        job.cancel.set()  # the step callback sees it on the GPU thread
        return True

    def status(self, job_id: str) -> JobStatus | None:
        job = self._jobs.get(job_id)
        return job.status if job else None

    def queue_snapshot(self) -> list[QueueEntry]:
        """The running job (position 0) and the queue in the order the scheduler expects to run
        it, each with an ETA from the recorded timings (defaults where none are recorded yet).
        Reads the cached plan: O(n)."""
        now = time.perf_counter()
        busy_for = self._running_left_s(now)
        entries = [self._entry(self._running, 0, now, busy_for)] if self._running is not None else []
        queue_plan = self._current_plan()
        entries += [self._entry(self._jobs[p.job_id], p.position, now, queue_plan.rough_eta(p.job_id, busy_for))
                    for p in queue_plan.planned]
        return entries

    def eta(self, job_id: str) -> float | None:
        """Seconds until ``job_id``'s image is expected: what is left of the running job, then
        the jobs the scheduler would run first, each at its recorded cost (steps x size per
        model, load times where a model must be loaded). None for a job not running or queued,
        or while a job on the way has nothing recorded like it (no made-up numbers). O(1) on
        the cached plan."""
        now = time.perf_counter()
        if self._running is not None and self._running.id == job_id:
            return self._running_left_s(now) if self._running_grounded() else None
        grounded = self._running is None or self._running_grounded()
        return self._current_plan().eta(job_id, self._running_left_s(now), grounded)

    def _position(self, job_id: str) -> int:
        return self._current_plan().position(job_id) or len(self._queue)

    def _current_plan(self) -> QueuePlan:
        """The cached plan, computed again only when the queue, the loaded models, the running
        job's model or the recorded costs changed since."""
        ready, parked = self._placements()
        running = self._running.params.model_id if self._running is not None else None
        key = (self._queue_version, self._costs_version, ready, parked, running)
        if self._plan_cache is None or self._plan_cache.key != key:
            if running is not None:  # its model is ready once it finishes
                ready |= {running}
            self._plan_cache = build_plan(
                key, self._scheduler, [j.view() for j in self._queue], {j.id: j.params for j in self._queue},
                ready, parked, time.perf_counter(), self._timings, self._running_left_s(time.perf_counter()))
        return self._plan_cache

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
        left, grounded = self._running_left_s(now), self._running is None or self._running_grounded()
        places = tuple(QueuePlace(p.job_id, p.position, queue_plan.eta(p.job_id, left, grounded))
                       for p in queue_plan.planned)
        event = QueueMoved(places, self._running.id if self._running is not None else None)
        for q in self._subscribers:
            q.put_nowait(event)

    def _entry(self, j: _Job, position: int, now: float, eta_s: float) -> QueueEntry:
        user = j.request.requester.display_name or j.request.requester.user_id
        return QueueEntry(j.id, position, j.params.model_id, user, j.status, now - j.queued_mono, round(eta_s, 1))

    async def preload(self, model_id: str, *, pin: bool = False) -> float:
        """Make a model resident ahead of demand (admin); runs on the GPU thread between jobs.
        ``pin``: exempt it from eviction by the cost rule. Returns the seconds spent loading
        (0.0 if it was already resident)."""
        runner = self._check_open()
        spec = self.config.model(self._known_model(model_id))
        try:
            return float(await self._executor.submit(functools.partial(runner.residency.preload_blocking, spec, pin=pin)))
        finally:
            self._queue_changed()  # what is loaded changed: the plan and the ETAs with it

    async def pin(self, model_id: str, pinned: bool = True) -> None:
        """Pin (or unpin) a model: a pinned model is not evicted to make room (admin)."""
        runner = self._check_open()
        await self._executor.submit(runner.residency.pin_blocking, self._known_model(model_id), pinned)

    def residency_status(self) -> ResidencyStatus | None:
        """Which model is where, bytes, last use, pins; the GPU budget, used and free; the RAM tier."""
        return self._runner.residency.status() if self._runner else None

    async def unload(self, model_id: str) -> bool:
        """Drop a model from memory (admin); False if it was not loaded."""
        runner = self._check_open()
        try:
            return bool(await self._executor.submit(runner.residency.unload_blocking, self._known_model(model_id)))
        finally:
            self._queue_changed()

    def _check_open(self) -> JobRunner:
        """The runner, for an admin call; refused at once when the engine is not running
        (never queued onto a GPU thread that has stopped)."""
        if self._closing or self._runner is None:
            raise EngineClosedError("admin")
        return self._runner

    def _known_model(self, model_id: str) -> str:
        return requested_model(JobRequest(prompt="-", model=model_id), self.config) or self.config.default_model

    def _resident_ids(self) -> frozenset[str]:
        return frozenset(m.model_id for m in self.resident_models())

    def resident_models(self) -> tuple[ResidentModel, ...]:
        return self._runner.residency.snapshot() if self._runner else ()

    def subscribe(self) -> asyncio.Queue[EngineEvent]:
        """Every job's events, and a ``QueueMoved`` after each change of the queue (for the
        delivery side); call ``unsubscribe`` when done."""
        q: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[EngineEvent]) -> None:
        self._subscribers.discard(q)

    # -- the dispatcher: one job at a time on the GPU thread ------------------------------

    async def _dispatch(self) -> None:
        while True:
            while not self._queue and not self._closing:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._closing:
                return
            job = self._next_job()
            try:
                await self._run(job)
            except Exception:  # the history itself failed: answer the job, keep the dispatcher
                log.exception("job %s: could not be recorded", job.id)
                self._emit_final(job, JobFailed(job.id, "HistoryError", f"Sorry, something went wrong (job `{job.id}`)."))
            finally:
                self._running = None
                self._queue_changed()

    def _next_job(self) -> _Job:
        """The scheduler picks; the jobs it overtakes are counted, which bounds how often that happens."""
        now = time.perf_counter()
        resident, parked = self._placements()
        pick = self._scheduler.pick([j.view() for j in self._queue], resident, now, parked)
        by_id = {j.id: j for j in self._queue}
        for passed_id in pick.passed_over:
            by_id[passed_id].passed(now)
        job = by_id[pick.job_id]
        self._dequeue(job)
        self._round_robin.started(job.fair_tag)
        if pick.passed_over:
            log.info("job %s: runs before %d earlier job(s) (%s)", job.id, len(pick.passed_over), pick.reason)
        return job

    def _enqueue(self, job: _Job) -> None:
        """Into the queue, on the seat its submit holds (``Admission``)."""
        job.seq = next(self._arrivals)
        job.fair_tag = self._round_robin.tag(job.user_key)
        job._view = None
        self._queue.append(job)
        self._queue_changed()

    def _dequeue(self, job: _Job) -> None:
        """Out of the queue (it starts or is cancelled): its seat goes back."""
        self._queue.remove(job)
        self._admission.release(job.user_key)
        self._queue_changed()

    def _placements(self) -> tuple[frozenset[str], frozenset[str]]:
        """(models ready on the device, models parked in RAM), from the thread-safe snapshot."""
        rows = self._runner.residency.snapshot() if self._runner else ()
        ready = frozenset(r.model_id for r in rows if r.where != "cpu-ram")
        return ready, frozenset(r.model_id for r in rows) - ready

    def _plan(self, *, busy_for_s: float = 0.0, limit: int | None = None) -> list[Planned]:
        resident, parked = self._placements()
        if self._running is not None:  # its model is ready once it finishes
            resident |= {self._running.params.model_id}
        return plan(self._scheduler, [j.view() for j in self._queue], resident, time.perf_counter(), self._timings,
                    parked=parked, busy_for_s=busy_for_s, limit=limit)

    def _running_left_s(self, now: float) -> float:
        job = self._running
        if job is None or job.started_mono is None:
            return 0.0
        pace = None
        if job.step >= 2 and job.first_step_at is not None and job.last_step_at is not None:
            pace = (job.last_step_at - job.first_step_at) / (job.step - 1)
        if job.step == 0:  # loading or encoding the prompt: the load, if one was expected, is still ahead
            return self._timings.remaining_s(job.params, now - job.started_mono - job.load_expected_s)
        steps_from = job.first_step_at if job.first_step_at is not None else job.started_mono
        return self._timings.remaining_s(job.params, now - steps_from, job.step, pace)

    def _running_grounded(self) -> bool:
        """The running job's remaining time rests on something measured: its own pace (two
        steps in), or recorded jobs of its model (and a recorded load, if it loads)."""
        job = self._running
        if job is None:
            return False
        if job.step >= 2:
            return True
        return self._timings.confident(job.params) and (
            job.load_expected_s == 0.0 or self._timings.knows_load(job.params.model_id))

    async def _run(self, job: _Job) -> None:
        assert self._runner is not None
        job.status, self._running = JobStatus.RUNNING, job
        started = job.started_mono = time.perf_counter()
        ready, _ = self._placements()
        job.load_expected_s = 0.0 if job.params.model_id in ready else self._timings.expected_load_s(job.params.model_id)
        # what to keep when something must be evicted: the models the next planned jobs need
        self._runner.residency.set_needed_soon(needed_soon(self._current_plan().planned))
        queue_wait = started - job.queued_mono
        self._emit(job, JobStarted(job.id, job.params.model_id))
        # Each attempt of the safety loop opens and closes its row as it happens (a crash keeps them).
        recorder = _AttemptRecorder(self.history, job.id)

        def on_step(step: int, total: int) -> None:  # GPU thread -> loop
            now = time.perf_counter()
            if step == 1 or job.first_step_at is None:  # a new attempt starts counting again
                job.first_step_at = now
            job.step, job.last_step_at = step, now
            self._executor.call_soon_threadsafe(self._emit, job, JobProgressed(job.id, step, total))

        def on_preview(preview: Preview) -> None:  # GPU thread -> loop
            job.previewed = True
            self._executor.call_soon_threadsafe(self._emit, job, JobPreviewed(
                job.id, preview.step, preview.total, preview.image, preview.mime, preview.width, preview.height))

        def on_attempt(attempt: Attempt) -> None:  # GPU thread -> loop, in order
            self._executor.call_soon_threadsafe(recorder.add, attempt)
            if attempt.outcome is not None and attempt.outcome != "succeeded" and job.previewed:
                # the safety loop rejected that image: its preview must not stay up
                job.previewed = False
                self._executor.call_soon_threadsafe(self._emit, job, JobPreviewed(job.id, 0, job.params.steps, b"", ""))
            if attempt.outcome is None:
                job.step, job.first_step_at = 0, None

        def timings(out: RunOutput | None = None) -> Timings:
            return Timings(queue_wait, out.load_s if out else 0.0, out.generate_s if out else 0.0,
                           time.perf_counter() - job.queued_mono)

        try:
            try:
                out: RunOutput = await self._executor.submit(self._runner.run_blocking, job.id, job.params, on_step,
                                                             job.cancel, job.request.nsfw_allowed, on_attempt,
                                                             on_preview)
            finally:
                await recorder.drain()
        except JobCancelledError:
            if not job.cancelled_by_user:  # the engine is stopping: stays RUNNING, taken back at start
                log.info("job %s: interrupted by shutdown; kept for the next start", job.id)
                self._emit_final(job, JobFailed(job.id, "EngineStopped", STOPPED_MESSAGE))
                return
            log.info("job %s: cancelled while running", job.id)
            await self._finish(job, JobStatus.CANCELLED, JobCancelled(job.id, while_running=True), timings())
        except EngineError as exc:
            log.warning("job %s: %s", job.id, exc.user_message, exc_info=exc.__cause__ is not None)
            await self._finish(job, JobStatus.FAILED, JobFailed(job.id, type(exc).__name__, exc.user_message), timings())
        except Exception:
            log.exception("job %s: unexpected failure", job.id)
            message = f"Sorry, something went wrong (job `{job.id}`)."
            await self._finish(job, JobStatus.FAILED, JobFailed(job.id, "GenerationError", message), timings())
        else:
            final = getattr(out, "params", None) or job.params  # the safety loop may have fallen back
            # what the job held the GPU thread for, the load apart: generation, safety checks and
            # retries, PNG; what the next job in line waits for
            busy_s = max(out.generate_s, time.perf_counter() - started - out.load_s)
            self._timings.record_job(final, generate_s=busy_s, load_s=out.load_s)
            self._costs_version += 1
            await self._succeed(job, out, timings(out))

    async def _succeed(self, job: _Job, out: RunOutput, timings: Timings) -> None:
        params = out.params or job.params
        try:
            if params != job.params:  # rewritten prompt, new seed or fallback model: keep what made it
                await self.history.update_params(job.id, params)
            path = await self.history.record_succeeded(job.id, png=out.png, timings=timings, finished_at=time.time())
        except StorageError as exc:  # disk full: this job fails, the bot stays up
            log.error("job %s: %s", job.id, exc)
            await self._finish(job, JobStatus.FAILED, JobFailed(job.id, "StorageError", exc.user_message), timings)
            return
        result = JobResult(job.id, out.png, params, out.width, out.height, timings, str(path), out.notice)
        log.info("job %s: finished in %.2f s (load %.2f, generate %.2f)", job.id, timings.total_s, timings.load_s,
                 timings.generate_s)
        job.status = JobStatus.SUCCEEDED
        self._emit_final(job, JobFinished(job.id, result))

    # -- helpers ---------------------------------------------------------------------------

    async def _finish(self, job: _Job, status: JobStatus, event: JobEvent, timings: Timings | None = None) -> None:
        """Record a FAILED or CANCELLED outcome, then tell the listeners."""
        job.status = status
        now = time.time()
        if status is JobStatus.CANCELLED:
            await self.history.record_cancelled(job.id, finished_at=now, timings=timings)
        else:
            assert isinstance(event, JobFailed)
            await self.history.record_failed(job.id, error_kind=event.error_kind, error_message=event.message,
                                             timings=timings or Timings(), finished_at=now)
        self._emit_final(job, event)

    def _emit_final(self, job: _Job, event: JobEvent) -> None:
        self._jobs.pop(job.id, None)  # a long-running bot must not keep every job in memory
        self._resumed.pop(job.id, None)
        self._emit(job, event)

    def _emit(self, job: _Job, event: JobEvent) -> None:
        job.events.put_nowait(event)
        for q in self._subscribers:
            q.put_nowait(event)


def _user_key(request: JobRequest) -> str:
    return f"{request.requester.platform}:{request.requester.user_id}"


def _busy_s(job: StoredJob) -> float:
    """A recorded job's time on the GPU thread, its load apart (as ``_run`` records it live)."""
    t = job.timings
    return max(t.generate_s, t.total_s - t.queue_wait_s - t.load_s)


class _AttemptRecorder:
    """Writes one job's attempts to the history in the order the GPU thread reported them:
    ``outcome is None`` opens the row (``record_started``), the second report closes it."""

    def __init__(self, history: HistoryStore, job_id: str) -> None:
        self._history, self._job_id = history, job_id
        self._numbers: dict[int, int] = {}  # the policy's attempt n -> the history's (it goes on after restarts)
        self._last: asyncio.Task[None] | None = None

    def add(self, attempt: Attempt) -> None:  # on the loop
        self._last = asyncio.ensure_future(self._write(self._last, attempt))

    async def drain(self) -> None:
        if self._last is not None:
            await self._last

    async def _write(self, previous: asyncio.Task[None] | None, a: Attempt) -> None:
        if previous is not None:
            await previous
        if a.outcome is None:
            self._numbers[a.n] = await self._history.record_started(
                self._job_id, started_at=a.started_at, model_id=a.model_id, prompt_used=a.prompt_used)
        else:
            await self._history.record_attempt_end(
                self._job_id, self._numbers[a.n], outcome=a.outcome, verdicts=a.verdicts,
                retry_reason=a.retry_reason, finished_at=a.finished_at or time.time())
