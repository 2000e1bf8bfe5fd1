"""Each chat platform runs supervised: one platform's failure is not the other's.

``promptpics run`` serves every configured platform from one engine. An unexpected exception
out of a platform's ``serve()`` (a gateway frame its library cannot read, a connection lost
for good) is logged once, with a short reference to quote in a bug report and its traceback;
the platform is reset and reconnects after a backoff (1 s, doubling, at most 60 s; back to 1 s
after a minute of healthy serving). The engine, the queue and the other platforms keep
serving meanwhile. Only a configuration error (a refused token, a privileged intent not
granted) ends the supervision: it is raised, and ``promptpics run`` stops with one line.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

# Raised by the platforms for what only the owner can fix (by class name: neither library is
# imported here). Everything else is retried.
CONFIGURATION_ERRORS = frozenset({"LoginFailure", "SlackLoginFailure", "PrivilegedIntentsRequired"})


def new_ref() -> str:
    """A short reference tying a user-visible line to its logged traceback."""
    return secrets.token_hex(3)


def is_configuration_error(exc: BaseException) -> bool:
    return type(exc).__name__ in CONFIGURATION_ERRORS


@dataclass(frozen=True, slots=True)
class Backoff:
    initial_s: float = 1.0
    max_s: float = 60.0
    healthy_after_s: float = 60.0  # serving this long before a failure starts the backoff over

    def next(self, delay_s: float) -> float:
        return min(delay_s * 2, self.max_s)


class Restartable(Protocol):
    @property
    def platform(self) -> str: ...

    async def serve(self) -> None: ...

    async def reset(self) -> None:
        """Drop the failed connection so that ``serve()`` can connect again."""


async def supervise(app: Restartable, *, backoff: Backoff = Backoff(),
                    clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
    """``app.serve()`` until it returns (closed on purpose) or fails with a configuration
    error (raised); any other failure is logged and served again after a backoff."""
    delay = backoff.initial_s
    while True:
        started = clock()
        try:
            await app.serve()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_configuration_error(exc):
                raise
            if clock() - started >= backoff.healthy_after_s:
                delay = backoff.initial_s
            ref = new_ref()
            log.error("%s stopped (ref %s: %s: %s); reconnecting in %.0f s - the engine and the other platforms "
                      "keep serving", app.platform, ref, type(exc).__name__, exc, delay, exc_info=exc)
        try:
            await app.reset()
        except Exception as exc:  # a half-open connection that fails to close is still dropped
            log.debug("%s: reset after a failure: %s: %s", app.platform, type(exc).__name__, exc)
        await sleep(delay)
        delay = backoff.next(delay)
