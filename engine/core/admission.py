"""Seats in the queue: who may enter, decided and reserved in one synchronous step.

Rule 6 of DESIGN.md, "decide, then await": ``Engine.submit`` awaits the router and the history
insert before a job is in the queue. A cap checked before those awaits and counted after them
lets eight concurrent submits through a cap of two. Here a seat is *held* from the moment it is
granted — before the first await — until the job leaves the queue (it starts, is cancelled, or
the engine stops), and released at once if admission fails on the way. A submit past its seat
and not yet queued is counted too: closing the engine waits for those (``all_entered``).
"""

from __future__ import annotations

import asyncio
from collections import Counter

from engine.errors import EngineClosedError, QueueFullError
from engine.scheduler import UserQueueFullError


class Admission:
    """Counts seats per user and in all: queued jobs plus submits still on their way in."""

    def __init__(self, max_queued_jobs: int, max_queued_per_user: int) -> None:
        self.max_queued_jobs, self.max_queued_per_user = max_queued_jobs, max_queued_per_user
        self._held: Counter[str] = Counter()
        self._total = 0
        self.closed = False
        self._entering = 0  # submits past their seat, not yet queued (aclose waits for them)
        self._all_in = asyncio.Event()  # set while _entering is 0
        self._all_in.set()

    def reserve(self, user: str) -> None:
        """Take a seat for ``user`` or raise (closing, queue full, user at the cap). No await
        may come between a caller's decision and this call: it is the decision."""
        if self.closed:
            raise EngineClosedError("submit")
        if self._total >= self.max_queued_jobs:
            raise QueueFullError(self.max_queued_jobs)
        if self._held[user] >= self.max_queued_per_user:
            raise UserQueueFullError(self.max_queued_per_user)
        self.hold(user)

    def reserve_many(self, user: str, n: int) -> None:
        """``n`` seats for ``user`` at once, or none (a /compare counts as four jobs)."""
        if self.closed:
            raise EngineClosedError("submit")
        if self._total + n > self.max_queued_jobs:
            raise QueueFullError(self.max_queued_jobs)
        if self._held[user] + n > self.max_queued_per_user:
            error = UserQueueFullError(self.max_queued_per_user)
            if n > 1:  # the sentence names the group's size, what is held and the cap
                error.user_message = (f"This asks for {n} jobs at once and you have {self._held[user]} waiting; "
                                      f"one person may queue at most {self.max_queued_per_user}, so none of "
                                      "them was queued. Please wait for some to finish.")
                error.args = (error.user_message,)
            raise error
        for _ in range(n):
            self.hold(user)

    def hold(self, user: str) -> None:
        """A seat without the checks: a job accepted by an earlier run, taken back at start."""
        self._held[user] += 1
        self._total += 1

    def release(self, user: str) -> None:
        """The job left the queue, or never made it in."""
        if self._held[user] <= 1:
            self._held.pop(user, None)
        else:
            self._held[user] -= 1
        self._total = max(0, self._total - 1)

    def held(self, user: str | None = None) -> int:
        return self._total if user is None else self._held[user]

    def entering(self) -> None:
        """A submit holds its seat and is on its way into the queue (routing, recording)."""
        self._entering += 1
        self._all_in.clear()

    def entered(self) -> None:
        """That submit is queued now, or failed on the way."""
        self._entering -= 1
        if not self._entering:
            self._all_in.set()

    async def all_entered(self) -> None:
        """Until no submit is on its way in (the engine's close waits for them)."""
        await self._all_in.wait()
