"""The single GPU thread, the only place where the asyncio loop and torch hand work over.

Shaped like aiosqlite's worker: one long-lived thread drains a queue of ``(future, fn, args)``;
results go back with ``call_soon_threadsafe`` behind ``if not fut.done()`` guards; a sentinel
stops it. What the thread does for one job is ``engine.core.runner.JobRunner``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

from engine.errors import EngineClosedError

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
