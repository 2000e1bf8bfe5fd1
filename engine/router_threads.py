"""The router's own threads: a one-thread daemon worker, and the torch thread setting it runs with.

The embedding model runs on a ``Worker`` of its own (CPU), and so does the router LLM when no
GPU thread is injected (the CLI, benchmarks). See docs/ROUTER.md, "Threads".
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Worker:
    """One daemon thread running blocking calls in order; results come back as asyncio futures.

    Shaped like the GPU executor. ``stop`` lets the call in progress finish: a thread still inside
    torch when the interpreter exits aborts the process ("terminate called without an active
    exception"). The thread is a daemon all the same, so a call that never ends (a hub download
    retrying for minutes) cannot keep the process alive past ``stop``'s timeout. A call whose
    future was cancelled (the router timed out) before it started is skipped."""

    def __init__(self, name: str, on_start: Callable[[], None] | None = None) -> None:
        self._name = name
        self._on_start = on_start
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, future, fn, args))
        return future

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Run what is queued, then end the thread; wait for that at most ``timeout_s``."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout_s)

    def _run(self) -> None:
        if self._on_start is not None:
            try:
                self._on_start()
            except Exception:  # a tuning step: the work still runs without it
                log.warning("router: setting up thread %s failed", self._name, exc_info=True)
        while (item := self._queue.get()) is not None:
            loop, future, fn, args = item
            if future.cancelled():
                continue
            try:
                outcome, ok = fn(*args), True
            except BaseException as exc:  # handed to the awaiting coroutine, which decides
                outcome, ok = exc, False
            try:
                loop.call_soon_threadsafe(_settle, future, outcome, ok)
            except RuntimeError:  # the loop closed meanwhile: nobody is waiting any more
                pass


def limit_torch_threads(count: int) -> None:
    """Give the calling thread ``count`` torch intra-op threads and leave every other thread's alone.

    Why: a MiniLM call is a few small matmuls. With two OpenMP threads on a 2-core machine that
    is also running the GPU thread and the loop, the threads wait on each other and a 10 ms
    call becomes 100-700 ms (measured, docs/ROUTER.md); one thread does not wait on anyone.
    ``torch.set_num_threads`` sets this thread's OpenMP/MKL setting and torch's default for
    threads started later; a helper thread puts that default back, which leaves this one as set.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    restore = threading.Thread(target=torch.set_num_threads, args=(previous,), name="promptpics-threads-restore")
    restore.start()
    restore.join()


def _settle(future: asyncio.Future[Any], outcome: Any, ok: bool) -> None:
    if future.done():
        return
    if ok:
        future.set_result(outcome)
    else:
        future.set_exception(outcome)
