"""The single GPU thread, the only place where the asyncio loop and torch hand work over.

Shaped like aiosqlite's worker: one long-lived thread drains a queue of ``(future, fn, args)``;
results go back with ``call_soon_threadsafe`` behind ``if not fut.done()`` guards; a sentinel
stops it. ``JobRunner.run_blocking`` is what the thread does for one job, in numbered steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import Config
from engine.errors import EngineClosedError
from engine.images import encode_png
from engine.jobs import GenerationParams
from engine.llm import LLMCache
from engine.pipelines import LoadedPipeline, PreviewCallback, generate_blocking
from engine.residency import ResidencyManager
from engine.safety import Attempt, SafetyPolicy

log = logging.getLogger(__name__)

_STOP = object()


class GpuExecutor:
    """One thread that owns every torch object; ``submit`` returns an awaitable future."""

    def __init__(self, name: str = "promptpics-gpu") -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Queue ``fn(*args)`` for the thread. Refused at once (EngineClosedError) once ``stop``
        was called: nothing may wait on a thread that will never run it."""
        assert self._loop is not None, "GpuExecutor.start() first"
        if self._stopping:
            raise EngineClosedError(getattr(fn, "__name__", "a call"))
        future = self._loop.create_future()
        self._queue.put((future, fn, args))
        return future

    async def stop(self) -> None:
        """Finish the current item, then end the thread (queued items run first)."""
        self._stopping = True
        if not self._thread.is_alive():
            return
        self._queue.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        """From the GPU thread to the loop (events, progress). Dropped if the loop is gone."""
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # the loop closed between the check and the call
                pass

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            future, fn, args = item
            try:
                result = fn(*args)
            except BaseException as exc:  # one failing job never stops the thread
                self.call_soon_threadsafe(_set_exception, future, exc)
            else:
                self.call_soon_threadsafe(_set_result, future, result)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


@dataclass(frozen=True, slots=True)
class RunOutput:
    png: bytes
    width: int
    height: int
    load_s: float  # every attempt together
    generate_s: float
    params: GenerationParams | None = None  # what made the image; the safety loop may have changed it
    attempts: tuple[Attempt, ...] = ()
    notice: str = ""  # a sentence for the user when the prompt or the model was changed


class JobRunner:
    """What the GPU thread does for one job. Holds the residency manager and the safety policy
    (GPU-thread state). Without a policy given, one is built from ``config.safety`` with the
    rewrite LLM taken from ``llms`` (the router's shared cache; none: the sanitiser only)."""

    def __init__(self, config: Config, residency: ResidencyManager, *, safety: SafetyPolicy | None = None,
                 llms: LLMCache | None = None) -> None:
        self._config = config
        self.residency = residency
        self.llms = llms  # the chat LLM cache the router and the safety rewriter share
        self.safety = safety or SafetyPolicy.from_config(config.safety, config.models, llms=llms,
                                                         llm_source=config.rewrite_llm_id)

    def run_blocking(self, job_id: str, params: GenerationParams, on_step: Callable[[int, int], None],
                     cancel: threading.Event, nsfw_allowed: bool = False,
                     on_attempt: Callable[[Attempt], None] | None = None,
                     on_preview: PreviewCallback | None = None) -> RunOutput:
        spent = {"load": 0.0, "generate": 0.0}

        def generate(p: GenerationParams) -> Any:  # one attempt; the policy may call it again
            spec = self._config.model(p.model_id)
            # 1. make the model resident: evicts by the cost rule (what the queue needs soon stays);
            #    a load that runs out of memory evicts the others and retries once
            loaded, load_s = self.residency.acquire_blocking(spec)
            spent["load"] += load_s
            # 2. generate; out of memory is recovered by phase (engine/residency/)
            started = time.perf_counter()
            try:
                return self._generate_blocking(job_id, loaded, p, on_step, cancel, on_preview)
            finally:
                spent["generate"] += time.perf_counter() - started

        def tell(attempt: Attempt) -> None:
            if attempt.outcome is not None:
                log.info("job %s: attempt %d on %s %s (%s)%s", job_id, attempt.n, attempt.model_id, attempt.outcome,
                         attempt.action, f": {attempt.problem}" if attempt.problem else "")
            if on_attempt is not None:
                on_attempt(attempt)

        # 3. check; flagged or black -> rewrite, retry, fall back, or refuse (ImageRefusedError)
        outcome = self.safety.run_blocking(params, generate, nsfw_allowed=nsfw_allowed, on_attempt=tell)
        # 4. encode with the parameters that made it embedded
        final, image = outcome.params, outcome.image
        png = encode_png(image, final, self._config.model(final.model_id).display_name)
        return RunOutput(png, image.width, image.height, spent["load"], spent["generate"], final,
                         outcome.attempts, outcome.notice)

    def _generate_blocking(self, job_id: str, loaded: LoadedPipeline, params: GenerationParams,
                           on_step: Callable[[int, int], None], cancel: threading.Event,
                           on_preview: PreviewCallback | None = None) -> Any:
        """Out of memory in the VAE decode: again with tiled decoding; while denoising: free the
        other models and retry, then CPU offload and retry (ResidencyManager decides)."""
        previews = self._config.previews
        return self.residency.run_with_recovery_blocking(loaded.spec, lambda ready, tiled: generate_blocking(
            ready, params, on_step=on_step, cancel=cancel, tiled_decode=tiled, on_preview=on_preview,
            previews=previews), job_id=job_id)


def default_runner_blocking(config: Config, device: Any, dtype: Any) -> JobRunner:
    """The production runner (GPU thread): residency, the shared chat LLM cache, the safety policy
    with its detectors loaded now, so a missing NudeNet stops start-up instead of the first job."""
    runner = JobRunner(config, ResidencyManager(device, dtype, settings=config.residency), llms=LLMCache(device, dtype))
    runner.safety.preload_blocking()
    return runner
