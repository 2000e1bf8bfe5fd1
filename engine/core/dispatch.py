"""The dispatcher: from the queue to the workers and back, one job per worker at a time, as
numbered steps (``Dispatcher._run``): take the scheduler's pick for a free worker, run it there
(make resident, generate, safety checks: ``JobRunner`` on the worker's GPU thread), record the
outcome, send the events. A worker lost under a job puts the job back in its fair place, once.

Runs on the asyncio loop; a worker's reports come back to it in order (``_hopper``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from engine.cluster import Worker, WorkerLostError
from engine.core.admission import Admission
from engine.core.job import JobHandle, LiveJob
from engine.core.plan import QueuePlanner
from engine.cluster.runner import RunOutput
from engine.errors import EngineError, JobCancelledError
from engine.history import Deliveries, HistoryStore, PresetStore, RoutingFeedback, SeenKeys, StorageError
from engine.jobs import (
    JobCancelled,
    JobEvent,
    JobFailed,
    JobFinished,
    JobPreviewed,
    JobProgressed,
    JobQueued,
    JobResult,
    JobStarted,
    JobStatus,
    Timings,
)
from engine.pipelines import Preview
from engine.safety import Attempt
from engine.scheduler import Pick, RoundRobin, needed_soon, pick_for_worker

log = logging.getLogger(__name__)

WORKER_BACK_POLL_S = 0.5  # while a worker is down and jobs wait: how often to see whether it is back
MAX_WORKER_LOSSES = 2  # a job present at this many worker deaths fails (crash-loop guard)
STOPPED_MESSAGE = "The bot stopped before your job finished; it is kept and will run when the bot is back."


class Dispatcher(QueuePlanner):
    """Takes jobs off the queue and runs them; a base of ``Engine`` (its state is set there)."""

    _history: HistoryStore | None
    _resumed: dict[str, JobHandle]
    _runs: set[asyncio.Task[None]]
    _admission: Admission
    _round_robin: RoundRobin
    _arrivals: Iterator[int]
    _wakeup: asyncio.Event
    _closing: bool
    _llm_worker: str = ""  # the worker that ran the router's LLM last (Ray modes)

    @property
    def history(self) -> HistoryStore:
        assert self._history is not None, "enter the engine first (async with Engine(...))"
        return self._history

    @property
    def deliveries(self) -> Deliveries:
        """Which chat messages show which job: the bot records and looks up its messages here."""
        return Deliveries(self.history)

    @property
    def presets_store(self) -> PresetStore:
        """Model presets and contact sheets (/sweep, /compare), kept across restarts."""
        return PresetStore(self.history)

    @property
    def feedback(self) -> RoutingFeedback:
        """Users' own model choices (routing feedback), the learned examples, the learns."""
        return RoutingFeedback(self.history)

    @property
    def dedup(self) -> SeenKeys:
        """Platform ids already handled (Slack event and trigger ids), kept across restarts."""
        return SeenKeys(self.history)

    # -- the dispatcher: each free worker takes the scheduler's pick for it --------------------

    async def _dispatch(self) -> None:
        """Starts jobs on free workers whenever something changed (a job queued, a job ended, a
        worker came back); each run is a task of its own, and starts the next pick as it ends."""
        while not self._closing:
            self._wakeup.clear()
            self._start_free_workers()
            if self._queue and not all(w.alive for w in self._workers):
                # a worker is coming back (started again after a loss): look again now and then,
                # as nothing else may change until it is up
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), WORKER_BACK_POLL_S)
            else:
                await self._wakeup.wait()

    async def _llm_on_a_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """The router's LLM call when the workers are Ray actors: ``fn(llm, *args)`` on the worker
        that served it last if it is up and free, else on a free one, else on the first one up
        (behind its job, as the GPU thread runs it in embedded mode). One worker keeps the LLM
        while it can: each one that serves it loads a copy."""
        up = [w for w in self._workers if w.alive]
        if not up:
            raise EngineError("no GPU worker is up")
        pool = [w for w in up if w.info.name not in self._running] or up
        chosen = next((w for w in pool if w.info.name == self._llm_worker), pool[0])
        self._llm_worker = chosen.info.name
        return await chosen.with_llm(self.config.router_llm_id, fn, *args)

    def _start_free_workers(self) -> None:
        """Every free, live worker takes its pick (none: it idles until something changes)."""
        for worker in self._workers:
            name = worker.info.name
            if self._closing or not self._queue:
                return
            if name in self._running or not worker.alive:
                continue
            job = self._next_job(worker)
            if job is not None:
                self._running[name], job.worker = job, name  # taken before the task runs: the next worker sees it busy
                task = asyncio.create_task(self._run_guarded(job, worker), name=f"promptpics-run-{job.id}")
                self._runs.add(task)
                task.add_done_callback(self._runs.discard)

    async def _run_guarded(self, job: LiveJob, worker: Worker) -> None:
        try:
            await self._run(job, worker)  # its run, in numbered steps
        except Exception:  # the history itself failed: answer the job, keep the dispatcher
            log.exception("job %s: could not be recorded", job.id)
            self._emit_final(job, JobFailed(job.id, "HistoryError", f"Sorry, something went wrong (job `{job.id}`)."))
        finally:
            self._running.pop(worker.info.name, None)
            self._queue_changed()
            self._start_free_workers()  # at once, as one worker always did: no loop turn for others to slip in

    def _next_job(self, worker: Worker) -> LiveJob | None:
        """The scheduler picks for this worker; the jobs it overtakes are counted, which bounds how
        often that happens (passes are counted over all workers). One worker: the scheduler's own
        pick, as before workers; several: ``pick_for_worker`` (engine/scheduler/multi.py)."""
        now = time.perf_counter()
        views = [j.view() for j in self._queue]
        if len(self._workers) == 1:
            resident, parked = worker.placement_sets()
            pick: Pick | None = self._scheduler.pick(views, resident, now, parked)
        else:
            mine, *others = sorted(self._worker_views(now), key=lambda v: v.name != worker.info.name)
            pick = pick_for_worker(self._scheduler, views, mine, others, now, self._timings)
        if pick is None:
            return None
        by_id = {j.id: j for j in self._queue}
        for passed_id in pick.passed_over:
            by_id[passed_id].passed(now)
        job = by_id[pick.job_id]
        self._dequeue(job)
        self._round_robin.started(job.fair_tag)
        if pick.passed_over:
            log.info("job %s: runs before %d earlier job(s) (%s)", job.id, len(pick.passed_over), pick.reason)
        return job

    def _enqueue(self, job: LiveJob) -> None:
        """Into the queue, on the seat its submit holds (``Admission``)."""
        job.seq = next(self._arrivals)
        job.fair_tag = self._round_robin.tag(job.user_key)
        job._view = None
        self._queue.append(job)
        self._queue_changed()

    def _dequeue(self, job: LiveJob) -> None:
        """Out of the queue (it starts or is cancelled): its seat goes back."""
        self._queue.remove(job)
        self._admission.release(job.user_key)
        self._queue_changed()

    async def _run(self, job: LiveJob, worker: Worker) -> None:
        # 1. started: what the ETAs and the eviction rule read while it runs
        job.status, job.worker = JobStatus.RUNNING, worker.info.name
        started = job.started_mono = time.perf_counter()
        ready, _ = worker.placement_sets()
        job.load_expected_s = 0.0 if job.params.model_id in ready else self._timings.expected_load_s(job.params.model_id)
        # what to keep when something must be evicted: the models the next jobs planned here need
        planned = self._current_plan().planned
        if len(self._workers) > 1:
            planned = tuple(p for p in planned if p.worker == worker.info.name)
        worker.set_needed_soon(needed_soon(planned))
        queue_wait = started - job.queued_mono
        self._emit(job, JobStarted(job.id, job.params.model_id))
        # 2. the worker's reports (progress, previews, attempts) hop to the loop, in order.
        #    Each attempt of the safety loop opens and closes its row as it happens (a crash keeps them).
        recorder = _AttemptRecorder(self.history, job.id, worker.info.name)
        hop = _hopper(asyncio.get_running_loop())

        def on_step(step: int, total: int) -> None:  # worker -> loop
            now = time.perf_counter()
            if step == 1 or job.first_step_at is None:  # a new attempt starts counting again
                job.first_step_at = now
            job.step, job.last_step_at = step, now
            hop(self._emit, job, JobProgressed(job.id, step, total))

        def on_preview(preview: Preview) -> None:  # worker -> loop
            job.previewed = True
            hop(self._emit, job, JobPreviewed(
                job.id, preview.step, preview.total, preview.image, preview.mime, preview.width, preview.height))

        def on_attempt(attempt: Attempt) -> None:  # worker -> loop, in order
            hop(recorder.add, attempt)
            if attempt.outcome is not None and attempt.outcome != "succeeded" and job.previewed:
                # the safety loop rejected that image: its preview must not stay up
                job.previewed = False
                hop(self._emit, job, JobPreviewed(job.id, 0, job.params.steps, b"", ""))
            if attempt.outcome is None:
                job.step, job.first_step_at = 0, None

        def timings(out: RunOutput | None = None) -> Timings:
            return Timings(queue_wait, out.load_s if out else 0.0, out.generate_s if out else 0.0,
                           time.perf_counter() - job.queued_mono)

        # 3. on the worker: make resident, generate, safety checks, PNG (JobRunner.run_blocking)
        try:
            try:
                out: RunOutput = await worker.run(job.id, job.params, nsfw_allowed=job.request.nsfw_allowed,
                                                  cancel=job.cancel, on_step=on_step, on_attempt=on_attempt,
                                                  on_preview=on_preview)
            finally:
                await recorder.drain()
        # 4. the outcome, recorded in the history, then the job's final event
        except JobCancelledError:
            if not job.cancelled_by_user:  # the engine is stopping: stays RUNNING, taken back at start
                log.info("job %s: interrupted by shutdown; kept for the next start", job.id)
                self._emit_final(job, JobFailed(job.id, "EngineStopped", STOPPED_MESSAGE))
                return
            log.info("job %s: cancelled while running", job.id)
            await self._finish(job, JobStatus.CANCELLED, JobCancelled(job.id, while_running=True), timings())
        except WorkerLostError as exc:
            await self._lost(job, exc, timings())
        except EngineError as exc:
            log.warning("job %s: %s", job.id, exc.user_message, exc_info=exc.__cause__ is not None)
            await self._finish(job, JobStatus.FAILED, JobFailed(job.id, type(exc).__name__, exc.user_message), timings())
        except Exception:
            log.exception("job %s: unexpected failure", job.id)
            message = f"Sorry, something went wrong (job `{job.id}`)."
            await self._finish(job, JobStatus.FAILED, JobFailed(job.id, "GenerationError", message), timings())
        else:
            final = getattr(out, "params", None) or job.params  # the safety loop may have fallen back
            # what the job held the worker for, the load apart: generation, safety checks and
            # retries, PNG; what the next job in line waits for
            busy_s = max(out.generate_s, time.perf_counter() - started - out.load_s)
            self._timings.record_job(final, generate_s=busy_s, load_s=out.load_s)
            self._costs_version += 1
            await self._succeed(job, out, timings(out))

    async def _lost(self, job: LiveJob, exc: WorkerLostError, timings: Timings) -> None:
        """The worker died or hung under the job: not the job's fault. Its open attempt is closed
        as interrupted and it goes back to its fair place (its arrival and round-robin tag kept),
        once; a job present at a second loss fails with a sentence (it may be what kills them)."""
        if self._closing:  # stays RUNNING in the history: taken back at the next start
            self._emit_final(job, JobFailed(job.id, "EngineStopped", STOPPED_MESSAGE))
            return
        in_history = await self.history.requeue_job(job.id, finished_at=time.time())  # its open attempt: interrupted
        # counted here too (a worker may die before the attempt is opened) and in the history (across restarts)
        job.worker_losses = max(job.worker_losses + 1, in_history)
        log.warning("job %s: worker %s lost (%s); loss %d", job.id, exc.worker, exc.why, job.worker_losses)
        if job.worker_losses >= MAX_WORKER_LOSSES:
            message = (f"This job was running when a GPU worker stopped ({exc.why}), {job.worker_losses} times; "
                       "it is not tried again in case it is what stops them.")
            await self._finish(job, JobStatus.FAILED, JobFailed(job.id, "WorkerLost", message), timings)
            return
        job.status, job.step, job.first_step_at, job.previewed = JobStatus.QUEUED, 0, None, False
        job.started_mono, job._view = None, None
        self._admission.hold(job.user_key)  # its seat again, over any cap: it was accepted long ago
        self._queue.append(job)  # fair order is by (tag, arrival): the same place it had
        self._queue_changed()
        self._emit(job, JobQueued(job.id, self._position(job.id), job.params, eta_s=self.eta(job.id)))
        self._wakeup.set()

    async def _succeed(self, job: LiveJob, out: RunOutput, timings: Timings) -> None:
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

    async def _finish(self, job: LiveJob, status: JobStatus, event: JobEvent, timings: Timings | None = None) -> None:
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

    def _emit_final(self, job: LiveJob, event: JobEvent) -> None:
        self._jobs.pop(job.id, None)  # a long-running bot must not keep every job in memory
        self._resumed.pop(job.id, None)
        self._emit(job, event)

    def _emit(self, job: LiveJob, event: JobEvent) -> None:
        job.events.put_nowait(event)
        for q in self._subscribers:
            q.put_nowait(event)


def _hopper(loop: asyncio.AbstractEventLoop) -> Callable[..., None]:
    """``hop(fn, *args)``: ``fn(*args)`` on the loop, in the order hopped. From the loop itself (a
    worker in another process reports there) it runs at once; from a worker's thread it is queued
    on the loop, ahead of the run's own result, so nothing reported is read after the run ends."""
    loop_thread = threading.get_ident()

    def hop(fn: Callable[..., Any], *args: Any) -> None:
        if threading.get_ident() == loop_thread:
            fn(*args)
        elif not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop closed between the check and the call
                pass
    return hop


class _AttemptRecorder:
    """Writes one job's attempts to the history in the order the GPU thread reported them:
    ``outcome is None`` opens the row (``record_started``), the second report closes it."""

    def __init__(self, history: HistoryStore, job_id: str, worker: str = "") -> None:
        self._history, self._job_id, self._worker = history, job_id, worker
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
                self._job_id, started_at=a.started_at, model_id=a.model_id, prompt_used=a.prompt_used,
                worker=self._worker)
        else:
            await self._history.record_attempt_end(
                self._job_id, self._numbers[a.n], outcome=a.outcome, verdicts=a.verdicts,
                retry_reason=a.retry_reason, finished_at=a.finished_at or time.time())
