"""The per-user cooldown between two submitted jobs, checked and taken in one step."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from cachetools import TTLCache

from bot.commands.data import Actor


class Cooldowns:
    """One job per ``every_s`` per user; only submitted jobs count.

    The last start of each user lives in a ``TTLCache`` on the same clock: a user whose
    cooldown is over is forgotten by the cache itself, and at most ``REMEMBERED`` users are kept.
    """

    REMEMBERED = 10_000

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self._clock = every_s, clock
        self._last: TTLCache[tuple[str, str], float] = TTLCache(maxsize=self.REMEMBERED, ttl=every_s, timer=clock)

    def wait_s(self, actor: Actor) -> float:
        last = self._last.get((actor.platform, actor.user_id))
        return 0.0 if last is None else max(0.0, self.every_s - (self._clock() - last))

    def take(self, actor: Actor) -> tuple[float, float | None]:
        """Check and set in one step (no await between: rule 6): ``(0.0, token)`` when the user
        may go now — the cooldown runs from now — else ``(seconds to wait, None)``. Give the
        token back with ``give_back`` if the job is then not accepted."""
        wait = self.wait_s(actor)
        if wait > 0:
            return wait, None
        key = (actor.platform, actor.user_id)
        previous = self._last.get(key)
        self.note(actor)
        return 0.0, previous if previous is not None else -math.inf

    def give_back(self, actor: Actor, token: float | None) -> None:
        """Undo ``take``: the submit it allowed was refused, so it does not count."""
        if token is None:
            return
        key = (actor.platform, actor.user_id)
        if token == -math.inf:
            self._last.pop(key, None)
        else:
            self._last[key] = token

    def note(self, actor: Actor) -> None:
        self._last[(actor.platform, actor.user_id)] = self._clock()
