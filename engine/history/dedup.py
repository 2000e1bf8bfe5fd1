"""Ids a platform may deliver more than once, kept in the history's ``seen_keys`` table so a
redelivery is recognised after a restart as well as before it.

Slack redelivers an event whose acknowledgement it did not see (the same ``event_id``), and a
Socket Mode envelope may arrive again after a reconnect; an id kept only in memory is forgotten
by a restart in between, and the second copy would make a second job. The bot reaches this as
``engine.dedup``; it shares the store's connection and its cancel-safe transactions.
"""

from __future__ import annotations

import time

from engine.history.schema import FORGET_SEEN_KEYS, INSERT_SEEN_KEY
from engine.history.store import HistoryStore


class SeenKeys:
    """Keys handled once, on ``store``'s connection."""

    def __init__(self, store: HistoryStore) -> None:
        self._store = store

    async def seen_before(self, key: str, ttl_s: float, *, now: float | None = None) -> bool:
        """True when ``key`` was seen in the last ``ttl_s`` seconds; otherwise remember it and say False.

        One transaction: keys past their own TTL are forgotten, then ``key`` is inserted unless present
        (``ON CONFLICT DO NOTHING``). Any number of concurrent callers with one key, in this process
        or another on the same file, get False exactly once.
        """
        if not key:
            raise ValueError("key must not be empty")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s {ttl_s!r} must be more than 0")
        now = time.time() if now is None else now
        async with self._store._write() as db:
            await db.execute(FORGET_SEEN_KEYS, {"now": now})
            cursor = await db.execute(INSERT_SEEN_KEY, {"key": key, "expires_at": now + ttl_s})
            return cursor.rowcount == 0
