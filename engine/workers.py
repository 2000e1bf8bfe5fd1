"""The single-thread worker: where the asyncio loop hands blocking work (torch) to a thread of its own.

One class for every such thread: the GPU thread (the engine's, which owns every torch object on
the GPU), the router's embedding thread (CPU) and, stand-alone, the router's LLM thread.
Shaped like aiosqlite's worker: one long-lived thread drains a queue of ``(future, fn, args)``;
results go back with ``call_soon_threadsafe`` behind ``if not fut.done()`` guards; a sentinel
stops it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from engine.errors import EngineClosedError

log = logging.getLogger(__name__)

T = TypeVar("T")

_STOP = object()

# Loading a model is not thread-safe: transformers, diffusers and accelerate change process-wide
# state while they build one (meta-device construction, accelerate's init_empty_weights patching
# nn.Module.register_parameter), so two threads loading at once break each other's models (seen:
# the embedding thread loading MiniLM while the GPU thread loads a pipeline -> NotImplementedError
# on meta tensors, "the weights could not be read"). Every from_pretrained in the engine holds
# this lock; running a loaded model does not need it.
MODEL_LOADING = threading.RLock()


class WorkerThread:
    """One daemon thread running blocking calls in order; ``submit`` returns an awaitable future.

    ``start`` binds the thread to the running loop (``submit`` starts it if nobody did);
    ``on_start`` runs first on the thread (a tuning step such as ``limit_torch_threads``: a
    failure is logged and the work runs without it). A call whose future was cancelled before it
    started (its caller timed out) is skipped; one that raises hands the exception to its future
    and the thread goes on. ``stop`` lets the call in progress finish: a thread still inside torch
    when the interpreter exits aborts the process ("terminate called without an active
    exception"). The thread is a daemon all the same, so a call that never ends (a hub download
    retrying for minutes) cannot keep the process alive past ``stop``'s timeout.
    """

    def __init__(self, name: str, *, on_start: Callable[[], None] | None = None) -> None:
        self._on_start = on_start
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    def start(self) -> None:
        """Start the thread, bound to the running loop (where results and callbacks go)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args)`` for the thread. Refused at once (EngineClosedError) once ``stop``
        was called: nothing may wait on a thread that will never run it."""
        if self._stopping:
            raise EngineClosedError(getattr(fn, "__name__", "a call"))
        self.start()
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((future, fn, args))
        return future

    async def stop(self, timeout_s: float | None = None) -> None:
        """Run what is queued, then end the thread; wait for that at most ``timeout_s`` (None: as
        long as the call in progress takes, e.g. a generation)."""
        self._stopping = True
        if not self._thread.is_alive():
            return
        self._queue.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout_s)

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        """From the thread to the loop (events, progress). Dropped if the loop is gone."""
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # the loop closed between the check and the call
                pass

    def _run(self) -> None:
        if self._on_start is not None:
            try:
                self._on_start()
            except Exception:  # a tuning step: the work still runs without it
                log.warning("setting up thread %s failed", self._thread.name, exc_info=True)
        while (item := self._queue.get()) is not _STOP:
            future, fn, args = item
            if future.cancelled():  # nobody waits for it any more: spend no time on it
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # one failing call never stops the thread
                self.call_soon_threadsafe(_set_exception, future, exc)
            else:
                self.call_soon_threadsafe(_set_result, future, result)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
