"""A job's result posted exactly once: look for an earlier post before posting again, try again
within a bound when the platform refuses for a while, and record what shows the result.

Where a post can be doubled, and what stops it:

- The process dies after the platform took the post and before ``deliveries.record``: at the
  next start the catch-up (bot/delivery.py) asks the outlet's ``find_result`` first; the post
  carries the job id in a machine-readable place (each outlet's module says where), so the
  earlier message is recorded instead of posting the image again.
- The platform took the post but its answer was lost (a 5xx or a dropped connection after the
  work was done): before each retry ``find_result`` is asked again; Discord also drops a resent
  message with the same ``nonce`` by itself (``enforce_nonce``).

``post_result`` raising ``PlatformUnavailable`` (5xx, 429, no connection) is tried again
``RetryPolicy.attempts`` times in all, with doubling waits; then ``ResultNotPosted`` is raised and
``tell_not_posted`` leaves the requester a note. The image stays in the history, its delivery
unrecorded, so the catch-up at the next start posts it (within its window). Other errors (no
permission, a channel gone) are not retried: they propagate to the caller's catch-all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bot import messages
from bot.outlet import MessageGone, MessageRef, Outlet, Picture, PlatformUnavailable
from engine import Engine, StoredJob

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a refused result post is tried, in all, and the waits between the tries."""

    attempts: int = 4
    backoff_s: float = 2.0  # the wait after the first refusal; doubled after each one
    max_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts {self.attempts!r} must be at least 1")
        if self.backoff_s < 0:
            raise ValueError(f"backoff_s {self.backoff_s!r} must be 0 or more")

    def wait_s(self, refusals: int) -> float:
        """The wait after the ``refusals``-th refusal (1-based)."""
        return min(self.backoff_s * 2 ** (refusals - 1), self.max_wait_s)


DEFAULT_RETRY = RetryPolicy()


class ResultNotPosted(Exception):
    """Every try to post a result was refused; ``last`` is the last refusal."""

    def __init__(self, job_id: str, platform: str, tries: int, last: PlatformUnavailable) -> None:
        self.job_id, self.platform, self.tries, self.last = job_id, platform, tries, last
        super().__init__(f"job {job_id}: {platform} refused the result {tries} times; the last time: {last}")


@dataclass(frozen=True, slots=True)
class Posted:
    ref: MessageRef
    found: bool  # an earlier post was found and recorded; nothing was posted this time


class ResultPoster:
    """Posts results on outlets and records them through ``engine.deliveries``."""

    def __init__(self, engine: Engine, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._engine = engine
        self._sleep = sleep

    async def post(self, outlet: Outlet, job: StoredJob, picture: Picture, caption: str, status: MessageRef | None,
                   *, look_first: bool) -> Posted:
        """Post ``job``'s result once and record it; ``look_first`` at a restart's catch-up."""
        retry: RetryPolicy = getattr(outlet, "result_retry", None) or DEFAULT_RETRY
        # 1. A restart: the last process may have posted it and died before recording it.
        if look_first and (found := await self._find(outlet, job, status)) is not None:
            return await self._recorded(outlet, job, found, found=True)
        for attempt in range(1, retry.attempts + 1):
            # 2. Post; a refusal a retry may cure is tried again after a wait.
            try:
                ref = await outlet.post_result(job, picture, caption, status)
            except PlatformUnavailable as exc:
                if attempt == retry.attempts:
                    raise ResultNotPosted(job.id, outlet.platform, attempt, exc) from exc
                wait = retry.wait_s(attempt)
                log.warning("job %s: %s; posting the result again in %.1f s (try %d of %d)", job.id, exc, wait,
                            attempt + 1, retry.attempts)
                await self._sleep(wait)
                # 3. The refused try may have landed all the same (its answer was lost): look first.
                if (found := await self._find(outlet, job, status)) is not None:
                    return await self._recorded(outlet, job, found, found=True)
                continue
            return await self._recorded(outlet, job, ref, found=False)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def tell_not_posted(self, outlet: Outlet, job: StoredJob, status: MessageRef | None, error: ResultNotPosted,
                              catch_up_h: float) -> None:
        """Say so where the status message is (or in a new one); a platform still down gets a log line."""
        mention = outlet.mention(job.requester.user_id) if job.requester.platform == outlet.platform else ""
        text = messages.result_not_posted(job_id=job.id, mention=mention, why=str(error.last), tries=error.tries,
                                          catch_up_h=catch_up_h)
        try:
            if status is not None:
                try:
                    await outlet.edit_status(job, status, text)
                    return
                except MessageGone:
                    pass
            ref = await outlet.post_status(job, text)
            await self._engine.deliveries.record(job.id, platform=outlet.platform, channel_id=ref.channel_id,
                                                 message_id=ref.message_id, kind="status")
        except Exception as exc:
            log.warning("job %s: could not tell the requester that the result was not posted either: %s", job.id, exc)

    async def _recorded(self, outlet: Outlet, job: StoredJob, ref: MessageRef, *, found: bool) -> Posted:
        # Recorded before anything else can fail: from now on reactions on it work, restarts included.
        await self._engine.deliveries.record(job.id, platform=outlet.platform, channel_id=ref.channel_id,
                                             message_id=ref.message_id, kind="result")
        return Posted(ref, found)

    @staticmethod
    async def _find(outlet: Outlet, job: StoredJob, status: MessageRef | None) -> MessageRef | None:
        """The outlet's ``find_result``, if it has one. Looking is best effort: a failure to look
        counts as nothing found, and the result is posted (a platform that cannot be read is
        most likely one that refuses the post too)."""
        finder: Callable[[StoredJob, MessageRef | None], Awaitable[MessageRef | None]] | None = getattr(
            outlet, "find_result", None)
        if not callable(finder):
            return None
        try:
            found = await finder(job, status)
        except Exception as exc:
            log.warning("job %s: could not look for an earlier result on %s: %s", job.id, outlet.platform, exc)
            return None
        if found is not None:
            log.info("job %s: its result was posted already (message %s); recording it instead of posting again",
                     job.id, found.message_id)
        return found
