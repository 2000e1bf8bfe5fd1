"""Delivery bookkeeping: which chat message shows which job, kept in the history's ``deliveries``
table so a reaction on any message ever posted finds its job after any number of restarts.

The bot reaches it as ``engine.deliveries``; it shares the store's connection and transactions
(a write is one cancel-safe transaction, like every history write).
"""

from __future__ import annotations

import sqlite3
import time

from engine.history.errors import UnknownJobError
from engine.history.records import DeliveryRecord, StoredJob
from engine.history.schema import DELIVERY_KINDS, UPSERT_DELIVERY
from engine.history.store import HistoryStore


class Deliveries:
    """The messages that show each job, on ``store``'s connection."""

    def __init__(self, store: HistoryStore) -> None:
        self._store = store

    async def record(self, job_id: str, *, platform: str, channel_id: str, message_id: str,
                     kind: str, created_at: float | None = None) -> None:
        """Remember that a message shows ``job_id``; the same message again re-points it (last wins)."""
        if kind not in DELIVERY_KINDS:
            raise ValueError(f"kind {kind!r} must be one of {', '.join(DELIVERY_KINDS)}")
        values = {"job_id": job_id, "platform": str(platform), "channel_id": str(channel_id),
                  "message_id": str(message_id), "kind": kind,
                  "created_at": time.time() if created_at is None else created_at}
        async with self._store._write() as db:
            try:
                await db.execute(UPSERT_DELIVERY, values)
            except sqlite3.IntegrityError as exc:
                if getattr(exc, "sqlite_errorcode", 0) != sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY:
                    raise
                raise UnknownJobError(job_id) from exc

    async def job_by_message(self, *, platform: str, channel_id: str, message_id: str) -> StoredJob | None:
        """The job a message shows, or None when the message is not one of ours."""
        jobs = await self._store._jobs(
            "SELECT jobs.* FROM deliveries JOIN jobs ON jobs.id = deliveries.job_id"
            " WHERE deliveries.platform = ? AND deliveries.channel_id = ? AND deliveries.message_id = ?",
            (str(platform), str(channel_id), str(message_id)))
        return jobs[0] if jobs else None

    async def of_job(self, job_id: str) -> list[DeliveryRecord]:
        """The job's messages, oldest first."""
        rows = await self._store._rows("SELECT * FROM deliveries WHERE job_id = ? ORDER BY created_at, rowid",
                                       (job_id,))
        return [DeliveryRecord(r["job_id"], r["platform"], r["channel_id"], r["message_id"], r["kind"],
                               r["created_at"]) for r in rows]
