"""``RayWorker``: one GPU behind a Ray actor (modes "local" and "cluster", docs/CLUSTER.md).

Two halves, one module (what they send each other: messages.py):

    WorkerActor  runs in the actor's process on the GPU host: today's ``LocalWorker`` (its GPU
                 thread and job runner), a job's callbacks bridged from that thread into a
                 streaming generator (progress, attempts, previews, then ``Finished``)
    RayWorker    the bot side: implements the ``Worker`` protocol over the actor's handle;
                 caches what the engine reads synchronously (residency, info), turns the actor's
                 death or silence into ``WorkerLostError``

``ray`` is imported inside functions only: ``import engine`` never imports it (the optional
``[cluster]`` extra; tests/test_cluster_ray.py checks it in a subprocess).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from engine.cluster import WorkerInfo, WorkerLostError
from engine.cluster.local import LocalWorker, RunnerFactory
from engine.cluster.messages import Finished, Raised, Residency, Started, Step
from engine.errors import EngineClosedError, EngineError
from engine.pipelines import Preview
from engine.safety import Attempt

if TYPE_CHECKING:
    from engine.config import Config
    from engine.cluster.runner import RunOutput
    from engine.jobs import GenerationParams
    from engine.pipelines import PreviewCallback
    from engine.residency import ResidencyStatus, ResidentModel

log = logging.getLogger(__name__)


def import_ray() -> Any:
    """The ``ray`` module, imported on first use (``Any``: ray ships no complete type stubs)."""
    import ray

    return ray


_DONE = object()


class WorkerTakenError(EngineError):
    """A named worker already serves another bot (mode "cluster", the same namespace)."""

    def __init__(self, worker: str, owner: str) -> None:
        self.worker, self.owner = worker, owner
        super().__init__(f"The GPU worker `{worker}` already serves the bot at {owner}: give this bot a "
                         "`cluster.namespace` of its own, or, if that bot is gone for good, end its workers "
                         f"(`ray kill` them by name, or `ray stop` on the GPU hosts).")


# -- the actor's side ------------------------------------------------------------------------


class WorkerActor:
    """Runs in the actor's process (an async actor: its methods share one loop, so ``cancel``
    and ``residency`` answer while a job runs). Holds a ``LocalWorker``; a detached actor keeps
    it, and its loaded models, across bot restarts."""

    def __init__(self, name: str, runner_factory: RunnerFactory | None) -> None:
        self._name, self._factory = name, runner_factory
        self._worker = LocalWorker(name, runner_factory=runner_factory)
        self._config: Config | None = None
        self._asked: tuple[Config, dict[str, float] | None] | None = None
        self._cancels: dict[str, threading.Event] = {}
        self._starting = asyncio.Lock()
        self._owner = ""  # the bot this worker serves: "host:data folder"

    async def start(self, config: Config, shares: dict[str, float] | None, owner: str = "") -> Started | Raised:
        """Idempotent: a bot that re-attaches with the same config keeps what is loaded; another
        config rebuilds the runner (the models it loaded may not match it any more). Another bot
        (another host or data folder) is refused: two bots would each schedule this one card as
        their own, and each start with its config would unload the other's models."""
        async with self._starting:
            if self._owner and owner and owner != self._owner:
                return Raised.of(WorkerTakenError(self._name, self._owner))
            self._owner = owner or self._owner
            try:
                if self._config is not None and self._asked != (config, shares):
                    log.info("worker %s: started again with another config; unloading", self._name)
                    await self._worker.stop()
                    self._worker, self._config = LocalWorker(self._name, runner_factory=self._factory), None
                if self._config is None:
                    self._asked = (config, shares)
                    self._config = await self._worker.start(config, shares)
            except Exception as exc:  # noqa: BLE001 - the bot raises it (Raised.rebuild)
                return Raised.of(exc)
        return Started(self._config, replace(self._worker.info, host=socket.gethostname()), self.residency(),
                       os.getpid())

    async def run(self, job_id: str, params: GenerationParams, nsfw_allowed: bool) -> AsyncIterator[object]:
        """The job's events in the order they happened (the GPU thread's callbacks hop onto this
        loop with ``call_soon_threadsafe``, ahead of the job's own result), then ``Finished``."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[object] = asyncio.Queue()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        cancel = self._cancels.setdefault(job_id, threading.Event())  # set already if its cancel came first
        job = asyncio.ensure_future(self._worker.run(
            job_id, params, nsfw_allowed=nsfw_allowed, cancel=cancel, on_step=lambda step, total: put(Step(step, total)),
            on_attempt=put, on_preview=put))
        job.add_done_callback(lambda _: events.put_nowait(_DONE))
        try:
            while (item := await events.get()) is not _DONE:
                yield item
        finally:
            cancel.set()  # a no-op after the job ended; the stream cancelled (ray.cancel): stop within a step
            self._cancels.pop(job_id, None)
        error = job.exception()
        yield Finished(None if error else job.result(), Raised.of(error) if error else None, self.residency())

    def cancel(self, job_id: str) -> None:
        """Sets the flag the job's step callback checks. Async actor methods run concurrently, so
        a cancel may overtake its job's ``run``: the flag then waits for it."""
        self._cancels.setdefault(job_id, threading.Event()).set()

    def residency(self) -> Residency:
        ready, parked = self._worker.placement_sets()
        config = self._config
        fits = frozenset(m for m in config.models if self._worker.fits(m)) if config else frozenset()
        return Residency(ready, parked, self._worker.residency_status(), self._worker.resident_models(), fits)

    def set_needed_soon(self, models: Sequence[str]) -> None:
        self._worker.set_needed_soon(models)

    async def preload(self, model_id: str, pin: bool) -> tuple[float, Residency] | Raised:
        return await self._answer(self._worker.preload(model_id, pin=pin))

    async def unload(self, model_id: str) -> tuple[bool, Residency] | Raised:
        return await self._answer(self._worker.unload(model_id))

    async def pin(self, model_id: str, pinned: bool) -> tuple[None, Residency] | Raised:
        return await self._answer(self._worker.pin(model_id, pinned))

    async def with_llm(self, llm_id: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, Residency] | Raised:
        return await self._answer(self._worker.with_llm(llm_id, fn, *args))

    async def stop(self) -> None:
        await self._worker.stop()

    async def _answer(self, call: Any) -> Any:
        try:
            return await call, self.residency()
        except Exception as exc:  # noqa: BLE001 - the bot raises it (Raised.rebuild)
            return Raised.of(exc)


# -- the bot's side --------------------------------------------------------------------------


@dataclass(slots=True)
class RaySession:
    """Ray as this process joined it: shut down when the last worker stops, if we started it."""

    owned: bool
    users: int = 0

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.owned:
            import_ray().shutdown()


@dataclass(frozen=True, slots=True)
class ActorSpec:
    """How a worker's actor is placed (modes.py fills it from ``[cluster]``)."""

    num_gpus: float
    resource: str = ""  # a custom resource instead of GPUs (one unit per worker)
    detached_name: str = ""  # mode "cluster": a named detached actor, re-attached to on restart
    namespace: str = "promptpics"

    def options(self) -> dict[str, Any]:
        # restarts on, task retries off: the engine, not Ray, decides what runs again
        opts: dict[str, Any] = {"max_restarts": -1, "max_task_retries": 0, "num_cpus": 0,
                                "num_gpus": 0 if self.resource else self.num_gpus}
        if self.resource:
            opts["resources"] = {self.resource: 1}
        if self.detached_name:
            opts.update(name=self.detached_name, namespace=self.namespace, lifetime="detached", get_if_exists=True)
        return opts


class RayWorker:
    """The ``Worker`` protocol over one ``WorkerActor``. What the engine reads synchronously
    (``placement_sets``, ``info``, ...) is the cache of the actor's last answer."""

    def __init__(self, name: str, spec: ActorSpec, *, watchdog_s: float, session: RaySession,
                 runner_factory: RunnerFactory | None = None) -> None:
        self._name, self._spec, self._session = name, spec, session
        self.watchdog_s = watchdog_s  # a job with no event for this long: the worker is hung
        session.users += 1
        self._actor = import_ray().remote(WorkerActor).options(**spec.options()).remote(name, runner_factory)
        self._info = WorkerInfo(name, "not started")
        self._residency = Residency()
        self._asked: tuple[Config, dict[str, float] | None] | None = None
        self._started = False  # False again after a loss: the restarted actor is started before its next job
        self._stopped = False
        self._streams: dict[str, Any] = {}
        self._needed: tuple[str, ...] = ()
        self._restarting: asyncio.Future[Config] | None = None
        self.pid: int | None = None  # the actor's process (tests kill it; /workers may show it)

    # -- what the engine reads (cached) ------------------------------------------------------

    @property
    def info(self) -> WorkerInfo:
        return self._info

    @property
    def alive(self) -> bool:
        """Started and not stopped. A lost worker being started again in the background is not:
        the dispatcher sends its jobs to the others meanwhile. If that restart failed, it is
        alive again, so that its next job starts it (``_ready``)."""
        return self._asked is not None and not self._stopped and (self._started or self._restarting is None)

    def placement_sets(self) -> tuple[frozenset[str], frozenset[str]]:
        return self._residency.ready, self._residency.parked

    def residency_status(self) -> ResidencyStatus | None:
        return self._residency.status

    def resident_models(self) -> tuple[ResidentModel, ...]:
        return self._residency.models

    def fits(self, model_id: str) -> bool:
        return model_id in self._residency.fits

    def set_needed_soon(self, models: Sequence[str]) -> None:
        if tuple(models) != self._needed and self._started:
            self._needed = tuple(models)
            self._actor.set_needed_soon.remote(self._needed)  # fire and forget: a hint for its evictions

    # -- lifetime ----------------------------------------------------------------------------

    async def start(self, config: Config, shares: dict[str, float] | None = None) -> Config:
        self._asked = (config, shares)
        return await self._start()

    async def _start(self) -> Config:
        assert self._asked is not None
        config, shares = self._asked
        owner = f"{socket.gethostname()}:{config.data_dir}"
        started = self._raise(await self._call(self._actor.start.remote(config, shares, owner), "it did not start"))
        self._info, self._residency, self.pid, self._started = started.info, started.residency, started.pid, True
        self._needed = ()
        return started.config

    async def stop(self) -> None:
        """Interrupt the job in progress. Mode "local": unload and end the actor. Mode "cluster":
        the detached actor stays up with its models, for the next bot to re-attach to."""
        if self._stopped:
            return
        self._stopped = True
        if self._restarting is not None:
            self._restarting.cancel()
        for job_id in list(self._streams):
            self.cancel(job_id)
        try:
            if not self._spec.detached_name:
                ray = import_ray()
                try:  # a lost worker (not started again) has nothing loaded: no need to wait for its restart
                    if self._started:
                        await self._actor.stop.remote()
                except ray.exceptions.RayError as exc:
                    log.warning("worker %s: could not unload before stopping (%s)", self._name, exc)
                ray.kill(self._actor, no_restart=True)
        finally:
            self._session.release()

    # -- jobs --------------------------------------------------------------------------------

    async def run(self, job_id: str, params: GenerationParams, *, nsfw_allowed: bool, cancel: threading.Event,
                  on_step: Callable[[int, int], None], on_attempt: Callable[[Attempt], None],
                  on_preview: PreviewCallback | None) -> RunOutput:
        await self._ready()
        stream = self._actor.run.options(num_returns="streaming").remote(job_id, params, nsfw_allowed)
        self._streams[job_id] = stream
        try:
            if cancel.is_set():
                self.cancel(job_id)
            while True:
                event = await self._next(stream)
                if isinstance(event, Step):
                    on_step(event.step, event.total)
                elif isinstance(event, Finished):
                    self._residency = event.residency
                    if event.error is not None:
                        raise event.error.rebuild(self._name)
                    assert event.output is not None
                    return event.output
                elif isinstance(event, Attempt):
                    on_attempt(event)
                elif isinstance(event, Preview) and on_preview is not None:
                    on_preview(event)
        except asyncio.CancelledError:  # the engine gave up on the job: so does the worker
            self.cancel(job_id)
            raise
        finally:
            self._streams.pop(job_id, None)

    async def _next(self, stream: Any) -> object:
        """The stream's next event; the watchdog and the actor's death become ``WorkerLostError``."""

        async def next_event() -> object:
            return await (await stream.__anext__())

        return await self._call(next_event(), f"no word from it for {self.watchdog_s:g} s", self.watchdog_s)

    def cancel(self, job_id: str) -> None:
        """The actor sets the job's cancel flag; its step callback raises within one step, and
        ``run`` raises the runner's ``JobCancelledError``."""
        if job_id in self._streams:
            self._actor.cancel.remote(job_id)

    # -- admin -------------------------------------------------------------------------------

    async def preload(self, model_id: str, *, pin: bool = False) -> float:
        return float(await self._admin(self._actor.preload, model_id, pin))

    async def unload(self, model_id: str) -> bool:
        return bool(await self._admin(self._actor.unload, model_id))

    async def pin(self, model_id: str, pinned: bool = True) -> None:
        await self._admin(self._actor.pin, model_id, pinned)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError("a Ray worker takes picklable work only: use with_llm")

    async def with_llm(self, llm_id: str, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._admin(self._actor.with_llm, llm_id, fn, args)

    async def _admin(self, method: Any, *args: Any) -> Any:
        await self._ready()
        # a preload is a model load: the watchdog's rule (longer than any load) holds for it too
        answer = await self._call(method.remote(*args), f"no answer for {self.watchdog_s:g} s", self.watchdog_s)
        value, self._residency = self._raise(answer)
        return value

    # -- the seam to Ray ---------------------------------------------------------------------

    async def _ready(self) -> None:
        if self._stopped or self._asked is None:
            raise EngineClosedError(self._name)
        restarting, self._restarting = self._restarting, None
        if restarting is not None:
            with contextlib.suppress(Exception):  # logged (_log_restart); this job starts it below
                await restarting
        if not self._started:
            await self._start()

    def _restart_soon(self) -> None:
        """After a loss: start the restarted actor now (Ray brings its process back in a second
        or two), so the next job does not wait for its runner to be built."""
        if self._stopped or self._restarting is not None:
            return
        self._restarting = asyncio.ensure_future(self._start_again())
        self._restarting.add_done_callback(self._log_restart)

    async def _start_again(self, tries: int = 3) -> Config:
        # a call sent before Ray has seen the old process die fails with it: the next one waits
        # for the restarted process
        for _ in range(tries - 1):
            with contextlib.suppress(WorkerLostError):
                return await self._start()
        return await self._start()

    def _log_restart(self, task: asyncio.Future[Config]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            log.warning("worker %s: not started again yet (%s); the next job tries again", self._name, error)

    async def _call(self, awaitable: Any, hung: str, timeout_s: float | None = None) -> Any:
        """Await the actor; its death, or no answer within ``timeout_s`` (the actor is then
        killed, so Ray restarts it), is ``WorkerLostError`` and empties the cached residency."""
        ray = import_ray()
        try:
            return await asyncio.wait_for(awaitable, timeout_s)
        except TimeoutError:
            log.error("worker %s: %s; killing it so that Ray restarts it", self._name, hung)
            ray.kill(self._actor, no_restart=False)
            raise self._lost(hung) from None
        except StopAsyncIteration:
            raise self._lost("its stream ended before the job did") from None
        except ray.exceptions.RayError as exc:
            log.warning("worker %s lost: %s", self._name, exc)
            raise self._lost("its process ended" if isinstance(exc, ray.exceptions.RayActorError)
                             else type(exc).__name__) from exc

    def _lost(self, why: str) -> WorkerLostError:
        """Its models died with it; what fits its card did not (the dispatcher keeps sending it
        jobs, and the first one starts it again)."""
        self._residency, self._started = Residency(fits=self._residency.fits), False
        self._restart_soon()
        return WorkerLostError(self._name, why)

    def _raise(self, answer: Any) -> Any:
        if isinstance(answer, Raised):
            raise answer.rebuild(self._name)
        return answer
