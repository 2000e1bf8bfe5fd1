"""Engine: submit, cancel, status and events; owns the queue and the GPU workers.

Everything here runs on the asyncio loop and never waits on torch: torch work is handed to a
worker (engine/cluster/: embedded, the GPU thread in this process; or Ray actors) and awaited.
The dispatcher (dispatch.py), the queue plan (plan.py) and the admin calls (admin.py) are its
bases; the seats in the queue are admission.py's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from engine.cluster import Worker
from engine.cluster.local import LocalWorker
from engine.config import Config
from engine.core.admin import Admin
from engine.core.admission import Admission
from engine.core.dispatch import STOPPED_MESSAGE, Dispatcher
from engine.core.feedback import explicit_fields, record_quietly, start_with_learned, switch_fields
from engine.core.job import JobHandle, LiveJob, user_key
from engine.core.normalise import check_request, clean_prompt, normalise, requested_model
from engine.core.plan import CostBook, QueuePlan, recorded_busy_s
from engine.core.presets import ModelPresets
from engine.cluster.runner import JobRunner
from engine.errors import EngineClosedError, RequestError
from engine.history import DataFolderLock, HistoryStore, StoredJob
from engine.jobs import EngineEvent, GenerationParams, JobCancelled, JobFailed, JobQueued, JobRequest, JobStatus
from engine.placement.traffic import RECENT_JOBS
from engine.router import Router, build_router, explicit_choice
from engine.scheduler import RoundRobin, make_scheduler

log = logging.getLogger(__name__)

SEED_JOBS = 500  # recent finished jobs read at start to seed the ETAs


class Engine(Admin, Dispatcher):
    """``async with Engine(config) as engine: handle = await engine.submit(JobRequest(...))``."""

    def __init__(self, config: Config, *, history: HistoryStore | None = None, router: Router | None = None,
                 runner_factory: Callable[[Config, Any, Any], JobRunner] | None = None,
                 workers: Sequence[Worker] | None = None) -> None:
        self.config = config
        self._history = history  # None: the engine opens (and closes) the one in config.data_dir
        self._owns_history = history is None
        self._data_lock: DataFolderLock | None = None  # one process runs the jobs of a data folder
        self._resumed: dict[str, JobHandle] = {}  # jobs taken back at start, until each is final
        self._runner_factory = runner_factory
        # embedded (the default): one GPU thread here; Ray modes: the workers are made at entry;
        # ``workers`` given: those (tests and benchmarks drive several in one process)
        self._workers: list[Worker] = list(workers) if workers else (
            [LocalWorker(runner_factory=runner_factory)] if config.cluster.embedded else [])
        # The router LLM runs on the GPU thread, between jobs (docs/ROUTER.md); with Ray workers
        # it runs on one of them, between its jobs (docs/CLUSTER.md).
        local = next((w for w in self._workers if isinstance(w, LocalWorker)), None)
        self._router = router or (build_router(config, remote_llm=self._llm_on_a_worker) if local is None else
                                  build_router(config, run_on_gpu_thread=local.call,
                                               llm=lambda: local.chat_llm_blocking(config.router_llm_id)))
        self._scheduler = make_scheduler(config.scheduler)
        self._round_robin = RoundRobin()
        self._timings = CostBook()  # the scheduler's per-model timings and the per-job ETA costs
        self._arrivals = itertools.count()
        self._started = False
        self._queue: deque[LiveJob] = deque()
        self._jobs: dict[str, LiveJob] = {}
        self._running: dict[str, LiveJob] = {}  # worker name -> the job it runs
        self._runs: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._admission = Admission(config.limits.max_queued_jobs, config.scheduler.max_queued_per_user)
        self._dispatcher: asyncio.Task[None] | None = None
        self._subscribers: set[asyncio.Queue[EngineEvent]] = set()
        # the cached queue plan and what it depends on (plan.py)
        self._queue_version = 0
        self._costs_version = 0
        self._plan_cache: QueuePlan | None = None
        self._publish_pending = False
        self.presets: ModelPresets | None = None  # set on entry: steps/guidance chosen from /sweep sheets

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
            try:
                self.presets = ModelPresets(self.config, self._history)
                await self.presets.load()
                # 2. the workers (their runners), the ETAs; 3. the jobs an earlier run left
                await self._start_workers(await self._traffic())
                await self._seed_timings()
                await start_with_learned(self._router, self.feedback)  # what `router learn` applied
                await self._take_back_unfinished()
                if self.config.history.keep_images_days:
                    await self.history.prune_images(self.config.history.keep_images_days)
            except BaseException:
                self._admission.closed = True
                await self._stop_workers()
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

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _traffic(self) -> dict[str, float] | None:
        """The history's recent jobs per model, for ``engine.placement = "auto"`` (None: count equally)."""
        if self.config.placement != "auto" or self._history is None:
            return None
        return await self._history.model_shares(RECENT_JOBS) or None

    async def _start_workers(self, shares: dict[str, float] | None) -> None:
        """Make the workers (Ray modes) and start them all; the config the first one runs with
        (the auto placement for its card) is the engine's. Runs before the dispatcher starts:
        nothing reads the config concurrently yet."""
        if not self._workers:
            from engine.cluster.modes import make_workers  # ray, lazily: only the Ray modes import it

            self._workers = await asyncio.to_thread(make_workers, self.config, self._runner_factory)
        configs = await asyncio.gather(*(w.start(self.config, shares) for w in self._workers))
        self.config, self._started = configs[0], True

    async def _stop_workers(self) -> None:
        results = await asyncio.gather(*(w.stop() for w in self._workers), return_exceptions=True)
        for worker, result in zip(self._workers, results):
            if isinstance(result, Exception):
                log.warning("worker %s did not stop cleanly: %s", worker.info.name, result)

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
        for name, job in self._running.items():
            job.cancel.set()
            self._worker(name).cancel(job.id)
        self._wakeup.set()
        if self._dispatcher is not None:
            await self._dispatcher
        while self._runs:  # the jobs running now end within a step ("kept for the next start")
            await asyncio.gather(*self._runs, return_exceptions=True)
        # submits already past their seat finish (routing may still use the GPU thread): each
        # ends recorded and answered "kept for the next start", or refused
        await self._admission.all_entered()
        router_aclose = getattr(self._router, "aclose", None)
        if router_aclose is not None:
            await router_aclose()
        await self._stop_workers()
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
        seeded = self._timings.seed((j.params, recorded_busy_s(j), j.timings.load_s) for j in jobs)
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
            job.worker_losses = await self.history.worker_losses(job.id)  # the crash-loop guard spans restarts
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
    def _job_from_history(stored: StoredJob) -> LiveJob:
        p = stored.params
        request = JobRequest(prompt=p.prompt, model=stored.model_asked, negative_prompt=p.negative_prompt,
                             steps=p.steps, guidance=p.guidance, width=p.width, height=p.height, seed=p.seed,
                             requester=stored.requester, origin=stored.origin, nsfw_allowed=stored.nsfw_allowed)
        waited = max(0.0, time.time() - stored.created_at)
        return LiveJob(id=stored.id, request=request, params=p, events=asyncio.Queue(), created_at=stored.created_at,
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
        user = user_key(request)
        self._admission.reserve(user)  # raises: closing, queue full, this user at the cap
        return await self._enter(request, prompt, explicit, user)

    async def submit_group(self, requests: list[JobRequest]) -> list[JobHandle]:
        """Several jobs of one user (/compare, /sweep), admitted whole or not at all: every seat is
        checked and taken in one step before the first await, so a group never runs in part."""
        if not requests or len({user_key(r) for r in requests}) != 1:
            raise ValueError("a group is one or more requests of one user")
        for r in requests:  # every field of every request first: a bad one refuses the group before any seat
            check_request(r, self.config)
        checked = [(r, clean_prompt(r.prompt, self.config.limits), requested_model(r, self.config)) for r in requests]
        user = user_key(requests[0])
        self._admission.reserve_many(user, len(requests))  # raises: closing, queue full, this user's cap
        entries = [asyncio.ensure_future(self._enter(r, prompt, explicit, user)) for r, prompt, explicit in checked]
        done = await asyncio.gather(*entries, return_exceptions=True)
        handles = [h for h in done if isinstance(h, JobHandle)]
        failure = next((e for e in done if isinstance(e, BaseException)), None)
        if failure is not None:  # one could not be recorded: the rest are taken back, not run in part
            for handle in handles:
                await self.cancel(handle.id)
            raise failure
        return handles

    async def _enter(self, request: JobRequest, prompt: str, explicit: str | None, user: str) -> JobHandle:
        """The seat is taken: route, record and queue the job, or give the seat back."""
        self._admission.entering()
        try:
            params = await self._route(request, prompt, explicit)
            if self._closing:
                raise EngineClosedError("submit")
            queuing = asyncio.ensure_future(self._record_and_queue(request, params, explicit))
        except BaseException:
            self._admission.release(user)
            self._admission.entered()
            raise
        queuing.add_done_callback(self._queued_or_failed)
        return await asyncio.shield(queuing)

    async def _route(self, request: JobRequest, prompt: str, explicit: str | None) -> GenerationParams:
        if explicit:
            decision = explicit_choice(explicit, self.config)
        else:  # a near tie goes to a model that is already loaded
            decision = await self._router.route(prompt, resident=self._resident_ids())
        spec = self.config.model(decision.model_id)
        if self.presets is not None:  # a /sweep preset stands over config.toml's steps and guidance
            spec = self.presets.apply(spec)
        params = normalise(request, spec, self.config, route_reason=decision.reason)
        if len(self._workers) > 1 and not any(w.fits(params.model_id) for w in self._workers):
            raise RequestError("model", params.model_id, "no GPU worker's card can hold it (see /workers)")
        return params

    async def _record_and_queue(self, request: JobRequest, params: GenerationParams, explicit: str | None) -> JobHandle:
        """The seat is held: record the job, then queue it on that seat (or give it back)."""
        created = time.time()
        try:
            # Recorded before it is acknowledged: once submit returns, a crash cannot lose the job.
            stored = await self.history.record_queued(requester=request.requester, origin=request.origin,
                                                      model_asked=explicit, params=params, created_at=created,
                                                      nsfw_allowed=request.nsfw_allowed)
        except BaseException:
            self._admission.release(user_key(request))
            raise
        job = LiveJob(id=stored.id, request=request, params=params, events=asyncio.Queue(), created_at=created)
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
        if explicit:  # routing feedback, the weaker kind (docs/ROUTER.md): once the job is queued, not before
            await record_quietly(self.feedback, "explicit", **explicit_fields(stored.id, request, params.prompt, explicit))
        return JobHandle(self, job, position)

    def _queued_or_failed(self, queuing: asyncio.Future[JobHandle]) -> None:
        if not queuing.cancelled() and queuing.exception() is not None:  # retrieved: its caller may be gone
            log.debug("a submit failed while recording: %s", queuing.exception())
        self._admission.entered()

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
        if job.worker:
            self._worker(job.worker).cancel(job.id)  # a worker in another process has its own flag
        return True

    async def record_feedback(self, kind: str, prompt: str, chosen_model: str, **fields: Any) -> bool:
        """Routing feedback: ``kind`` "switch", "compare_pick" or "explicit"; ``fields``: router_pick,
        from_model, server_id, job_id, user_key (RoutingFeedback.record). False: already there, or
        not recorded (logged; feedback never fails a command)."""
        return await record_quietly(self.feedback, kind, prompt=prompt, chosen_model=chosen_model, **fields)

    async def record_switch(self, job: StoredJob, chosen_model: str, user_key: str) -> bool:
        """A model-switch reaction on ``job``'s result by ``user_key`` ("discord:1234"): once per (job, user)."""
        fields = switch_fields(job, chosen_model, user_key)
        return fields is not None and await record_quietly(self.feedback, "switch", **fields)

    def status(self, job_id: str) -> JobStatus | None:
        job = self._jobs.get(job_id)
        return job.status if job else None

    def subscribe(self) -> asyncio.Queue[EngineEvent]:
        """Every job's events, and a ``QueueMoved`` after each change of the queue (for the
        delivery side); call ``unsubscribe`` when done."""
        q: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[EngineEvent]) -> None:
        self._subscribers.discard(q)
