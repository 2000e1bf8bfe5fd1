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
from engine.errors import OutOfMemoryError
from engine.images import encode_png
from engine.jobs import GenerationParams
from engine.pipelines import free_memory_blocking, generate_blocking
from engine.residency import ResidencyManager

log = logging.getLogger(__name__)

_STOP = object()


class GpuExecutor:
    """One thread that owns every torch object; ``submit`` returns an awaitable future."""

    def __init__(self, name: str = "promptpics-gpu") -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        assert self._loop is not None, "GpuExecutor.start() first"
        future = self._loop.create_future()
        self._queue.put((future, fn, args))
        return future

    async def stop(self) -> None:
        """Finish the current item, then end the thread (queued items run first)."""
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
    load_s: float
    generate_s: float


class JobRunner:
    """What the GPU thread does for one job. Holds the residency manager (GPU-thread state)."""

    def __init__(self, config: Config, residency: ResidencyManager) -> None:
        self._config = config
        self.residency = residency

    def run_blocking(self, job_id: str, params: GenerationParams, on_step: Callable[[int, int], None],
                     cancel: threading.Event) -> RunOutput:
        spec = self._config.model(params.model_id)
        # 1. make the model resident (the residency rule may unload others, or retry on OOM)
        loaded, load_s = self.residency.acquire_blocking(spec)
        # 2. generate; out of memory -> free every other pipeline and try once more
        started = time.perf_counter()
        try:
            image = generate_blocking(loaded, params, on_step=on_step, cancel=cancel)
        except OutOfMemoryError:
            free_memory_blocking(loaded.device)
            if not self.residency.free_others_blocking(keep=spec.id):
                raise
            log.warning("job %s: out of memory on %s; unloaded the others, retrying once", job_id, spec.id)
            image = generate_blocking(loaded, params, on_step=on_step, cancel=cancel)
        generate_s = time.perf_counter() - started
        # 3. encode with the parameters embedded
        png = encode_png(image, params, spec.display_name)
        return RunOutput(png, image.width, image.height, load_s, generate_s)
