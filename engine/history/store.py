"""The job history: jobs, attempts and their images, on one SQLite file plus PNG files.

Lifetime — ``HistoryStore.open`` returns an object that is both awaitable and an async
context manager, so either form works::

    async with HistoryStore.open(config.data_dir) as history:   # closed on exit
        job = await history.record_queued(requester=..., origin=..., model_asked=None,
                                          params=params, created_at=time.time())

    history = await HistoryStore.open(config.data_dir)          # the caller closes it
    ...
    await history.close()

Durability and cancellation are the connection's (``engine.history.database``): every
``record_*`` call is one transaction that happened whole or not at all. Images are written with
``files.write_atomic`` under ``<data_dir>/images/YYYY/MM/DD/<job_id>.png``; the database keeps
the path relative to ``data_dir`` and ``StoredJob.image_path`` gives it back absolute.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiosqlite

from engine.history import stats
from engine.history.database import Database, to_the_end
from engine.history.errors import DuplicateJobError, HistoryError, JobFinishedError, StorageError, UnknownJobError
from engine.history.files import delete_images, image_relpath, write_atomic
from engine.history.records import (
    AttemptRecord,
    StoredJob,
    new_job_id,
    origin_values,
    params_values,
    requester_values,
    verdicts_json,
)
from engine.history.schema import ATTEMPT_OUTCOMES, FINISH_JOB, INSERT_JOB, RECENT_JOBS, UPDATE_PARAMS
from engine.history.stats import ModelStats
from engine.jobs import GenerationParams, JobStatus, Origin, Requester, Timings

log = logging.getLogger(__name__)

_ID_TRIES = 10
_CALLER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the id becomes a file name: no slashes, no dots


class HistoryStore(Database):
    """Jobs and attempts in one SQLite file; build it with ``HistoryStore.open``."""

    # -- rows -> plain data -------------------------------------------------------------

    def _job(self, row: sqlite3.Row) -> StoredJob:
        return StoredJob(
            id=row["id"], seq=row["seq"], status=JobStatus(row["status"]),
            created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
            requester=Requester(row["requester_platform"], row["requester_user_id"], row["requester_name"]),
            origin=Origin(row["origin_platform"], row["origin_channel_id"], row["origin_thread_id"],
                          row["origin_message_ref"], row["origin_server_id"]),
            model_asked=row["model_asked"],
            params=GenerationParams(
                prompt=row["prompt"], negative_prompt=row["negative_prompt"], model_id=row["model_used"],
                steps=row["steps"], guidance=row["guidance"], width=row["width"], height=row["height"],
                seed=row["seed"], route_reason=row["route_reason"]),
            image_path=None if row["image_path"] is None else self._data_dir / row["image_path"],
            error_kind=row["error_kind"], error_message=row["error_message"],
            timings=Timings(row["queue_wait_s"], row["load_s"], row["generate_s"], row["total_s"]),
            attempt_count=row["attempt_count"], nsfw_allowed=bool(row["nsfw_allowed"]),
        )

    async def _jobs(self, sql: str, args: Mapping[str, Any] | Iterable[Any] = ()) -> list[StoredJob]:
        return [self._job(row) for row in await self._rows(sql, args)]

    # -- writes: a job's life -----------------------------------------------------------------

    async def record_queued(self, job_id: str | None = None, *, requester: Requester, origin: Origin,
                            model_asked: str | None, params: GenerationParams,
                            created_at: float, nsfw_allowed: bool = False) -> StoredJob:
        """Persist a new QUEUED job; ``job_id=None`` draws a fresh id. Returns it with its seq."""
        if job_id is not None and not _CALLER_ID.fullmatch(job_id):
            raise ValueError(f"job_id {job_id!r} must be 1-64 letters, digits, '_' or '-'")
        values = {"status": JobStatus.QUEUED.value, "created_at": created_at, "model_asked": model_asked,
                  "nsfw_allowed": bool(nsfw_allowed),
                  **requester_values(requester), **origin_values(origin), **params_values(params)}
        async with self._write() as db:
            job_id = await self._insert_job(db, job_id, values)
        log.debug("history: job %s queued", job_id)
        return await self._require_job(job_id)

    async def _insert_job(self, db: aiosqlite.Connection, job_id: str | None,
                          values: dict[str, Any]) -> str:
        for _ in range(_ID_TRIES):
            candidate = job_id or new_job_id()
            try:
                await db.execute(INSERT_JOB, {**values, "id": candidate})
                return candidate
            except sqlite3.IntegrityError as exc:
                if getattr(exc, "sqlite_errorcode", 0) != sqlite3.SQLITE_CONSTRAINT_UNIQUE:
                    raise
                if job_id is not None:
                    raise DuplicateJobError(job_id) from exc
                log.info("history: job id %s is taken; drawing another", candidate)
        raise HistoryError(f"No free job id was found in {_ID_TRIES} tries.")

    async def record_started(self, job_id: str, *, started_at: float, model_id: str,
                             prompt_used: str, worker: str = "") -> int:
        """Mark the job RUNNING and open its next attempt (on ``worker``); returns the attempt number (1-based)."""
        async with self._write() as db:
            row = await self._status_row(db, job_id, wanted=JobStatus.RUNNING)
            n = int(row["attempt_count"]) + 1
            await db.execute(
                "UPDATE jobs SET status = 'running', started_at = coalesce(started_at, :t),"
                " attempt_count = :n WHERE id = :id", {"t": started_at, "n": n, "id": job_id})
            await db.execute(
                "INSERT INTO attempts (job_id, n, model_id, prompt_used, started_at, worker)"
                " VALUES (?, ?, ?, ?, ?, ?)", (job_id, n, model_id, prompt_used, started_at, worker))
        log.debug("history: job %s attempt %d started on %s", job_id, n, model_id)
        return n

    async def record_attempt_end(self, job_id: str, n: int, *, outcome: str,
                                 verdicts: Mapping[str, Any] | None = None,
                                 retry_reason: str | None = None, finished_at: float) -> None:
        """Close attempt ``n``. A verdict is a mapping or an object with ``flagged`` and ``score``."""
        if outcome not in ATTEMPT_OUTCOMES:
            raise ValueError(f"outcome {outcome!r} must be one of {', '.join(ATTEMPT_OUTCOMES)}")
        async with self._write() as db:
            cur = await db.execute(
                "UPDATE attempts SET outcome = ?, verdicts = ?, retry_reason = ?, finished_at = ?"
                " WHERE job_id = ? AND n = ?",
                (outcome, verdicts_json(verdicts), retry_reason, finished_at, job_id, n))
            if cur.rowcount == 0:
                raise UnknownJobError(job_id, attempt=n)

    async def record_succeeded(self, job_id: str, *, png: bytes, timings: Timings,
                               finished_at: float) -> Path:
        """Write the PNG (temp file + rename), then mark the job SUCCEEDED; returns the absolute path."""
        await self._require_unfinished(job_id, wanted=JobStatus.SUCCEEDED)
        relative = image_relpath(job_id, finished_at)
        path = self._data_dir / relative
        try:
            # To the end even when cancelled: a rename that lands after we stopped waiting would
            # leave an image no row points at. A cancellation then lands in _finish, which undoes it.
            await to_the_end(asyncio.to_thread(write_atomic, path, png))
        except OSError as exc:
            log.error("history: job %s: image could not be written to %s: %s", job_id, path, exc)
            raise StorageError(job_id, f"{path}: {exc}") from exc
        try:
            await self._finish(job_id, JobStatus.SUCCEEDED, finished_at, timings=timings,
                               image_path=relative.as_posix(), open_attempts="succeeded")
        except BaseException as exc:  # the row was not written (_write commits whole or not at all)
            await to_the_end(asyncio.to_thread(path.unlink, missing_ok=True),  # no orphan image
                             redeliver=not isinstance(exc, asyncio.CancelledError))
            raise
        return path

    async def record_failed(self, job_id: str, *, error_kind: str, error_message: str,
                            timings: Timings, finished_at: float) -> None:
        await self._finish(job_id, JobStatus.FAILED, finished_at, timings=timings,
                           error_kind=error_kind, error_message=error_message, open_attempts="failed")

    async def record_cancelled(self, job_id: str, *, finished_at: float,
                               timings: Timings | None = None) -> None:
        await self._finish(job_id, JobStatus.CANCELLED, finished_at, timings=timings,
                           open_attempts="interrupted")

    async def _finish(self, job_id: str, status: JobStatus, finished_at: float, *,
                      timings: Timings | None, open_attempts: str, image_path: str | None = None,
                      error_kind: str | None = None, error_message: str | None = None) -> None:
        """Set a final status (only from QUEUED/RUNNING) and close any attempt left open."""
        t = timings or Timings()
        keep = timings is None  # record_cancelled without timings keeps what is there
        values = {"id": job_id, "status": status.value, "finished_at": finished_at,
                  "image_path": image_path, "error_kind": error_kind, "error_message": error_message,
                  "keep": keep, "queue_wait_s": t.queue_wait_s, "load_s": t.load_s,
                  "generate_s": t.generate_s, "total_s": t.total_s, "outcome": open_attempts}
        async with self._write() as db:
            cur = await db.execute(FINISH_JOB, values)
            if cur.rowcount == 0:
                await self._status_row(db, job_id, wanted=status)  # raises the right error
            await db.execute("UPDATE attempts SET outcome = :outcome, finished_at = :finished_at"
                             " WHERE job_id = :id AND outcome IS NULL", values)
        log.debug("history: job %s %s", job_id, status.value)

    async def update_params(self, job_id: str, params: GenerationParams) -> None:
        """Replace the normalised request, e.g. after a fallback switched the model."""
        async with self._write() as db:
            cur = await db.execute(UPDATE_PARAMS, {"id": job_id, **params_values(params)})
            if cur.rowcount == 0:
                raise UnknownJobError(job_id)

    async def requeue_interrupted(self) -> list[StoredJob]:
        """RUNNING -> QUEUED and open attempts -> 'interrupted'; returns all unfinished jobs in seq order.

        Call it once at start-up, before the executor runs: every open attempt is then a dead one.
        """
        async with self._write() as db:
            attempts = await db.execute(
                "UPDATE attempts SET outcome = 'interrupted' WHERE outcome IS NULL")
            jobs = await db.execute("UPDATE jobs SET status = 'queued' WHERE status = 'running'")
        if jobs.rowcount:
            log.info("history: %d interrupted job(s) queued again (%d attempt(s) marked interrupted)",
                     jobs.rowcount, attempts.rowcount)
        return await self.unfinished_jobs()

    async def requeue_job(self, job_id: str, *, finished_at: float) -> int:
        """One job's worker was lost under it: its open attempts -> 'interrupted' (with the time:
        what tells a loss from a stop, whose attempts are closed at the next start without one),
        RUNNING -> QUEUED. Returns how many workers it has lost so far (``worker_losses``)."""
        async with self._write() as db:
            await self._status_row(db, job_id, wanted=JobStatus.QUEUED)
            await db.execute("UPDATE attempts SET outcome = 'interrupted', finished_at = ?"
                             " WHERE job_id = ? AND outcome IS NULL", (finished_at, job_id))
            await db.execute("UPDATE jobs SET status = 'queued' WHERE id = ? AND status = 'running'", (job_id,))
        return await self.worker_losses(job_id)

    async def worker_losses(self, job_id: str) -> int:
        """How many of an unfinished job's attempts ended with their worker lost under them (the
        crash-loop guard counts them across restarts of the bot)."""
        rows = await self._rows("SELECT count(*) AS n FROM attempts WHERE job_id = ? AND outcome = 'interrupted'"
                                " AND finished_at IS NOT NULL AND worker != ''", (job_id,))
        return int(rows[0]["n"]) if rows else 0

    async def _status_row(self, db: aiosqlite.Connection, job_id: str, *, wanted: JobStatus) -> sqlite3.Row:
        """The job's row if it is unfinished; else UnknownJobError or JobFinishedError."""
        async with db.execute("SELECT status, attempt_count FROM jobs WHERE id = ?", (job_id,)) as cur:
            row = await cur.fetchone()
        if row is None:
            raise UnknownJobError(job_id)
        if JobStatus(row["status"]).is_final:
            raise JobFinishedError(job_id, JobStatus(row["status"]), wanted)
        return row

    async def _require_unfinished(self, job_id: str, *, wanted: JobStatus) -> None:
        job = await self.get_job(job_id)
        if job is None:
            raise UnknownJobError(job_id)
        if job.status.is_final:
            raise JobFinishedError(job_id, job.status, wanted)

    # -- reads ----------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> StoredJob | None:
        jobs = await self._jobs("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return jobs[0] if jobs else None

    async def _require_job(self, job_id: str) -> StoredJob:
        job = await self.get_job(job_id)
        if job is None:
            raise UnknownJobError(job_id)
        return job

    async def unfinished_jobs(self) -> list[StoredJob]:
        """QUEUED and RUNNING jobs in arrival (seq) order."""
        return await self._jobs("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY seq")

    async def queue(self) -> list[StoredJob]:
        """What the /queue command shows: the same rows as ``unfinished_jobs``."""
        return await self.unfinished_jobs()

    async def recent_jobs(self, *, user_id: str | None = None, platform: str | None = None,
                          server_id: str | None = None, limit: int = 20) -> list[StoredJob]:
        """Newest first; ``None`` filters match everyone. ``server_id`` keeps the jobs asked in that
        server and those asked in none (a DM, the terminal, a job from before schema v3)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit {limit!r} must be a whole number of at least 1")
        return await self._jobs(RECENT_JOBS, {"user_id": user_id, "platform": platform, "server": server_id,
                                              "limit": limit})

    async def attempts(self, job_id: str) -> list[AttemptRecord]:
        rows = await self._rows("SELECT * FROM attempts WHERE job_id = ? ORDER BY n", (job_id,))
        return [AttemptRecord(job_id=r["job_id"], n=r["n"], model_id=r["model_id"], prompt_used=r["prompt_used"],
                              started_at=r["started_at"], finished_at=r["finished_at"], outcome=r["outcome"],
                              verdicts=json.loads(r["verdicts"]) if r["verdicts"] else {},
                              retry_reason=r["retry_reason"], worker=r["worker"]) for r in rows]

    # -- statistics and retention ---------------------------------------------------------

    async def model_stats(self) -> list[ModelStats]:
        """Per model, sorted by id: job counts and times from ``jobs``, detector flags from ``attempts``."""
        return stats.aggregate(await self._rows(stats.JOB_COUNTS), await self._rows(stats.ATTEMPT_FLAGS),
                               await self._rows(stats.GENERATE_TIMES))

    async def worker_stats(self) -> list[stats.WorkerStats]:
        """Per GPU worker, by name: its attempts, how many succeeded and how many were interrupted."""
        return stats.workers(await self._rows(stats.WORKER_ATTEMPTS))

    async def model_shares(self, last: int = 500, *, min_jobs: int = 20) -> dict[str, float]:
        """model id -> its share of the newest ``last`` jobs: the traffic the placement planner
        serves first. Empty with fewer than ``min_jobs`` jobs (too few to say anything)."""
        return stats.shares(await self._rows(stats.RECENT_MODEL_COUNTS, {"last": last}), min_jobs)

    async def prune_images(self, older_than_days: int, *, now: float | None = None) -> int:
        """Delete the images of jobs finished more than N days ago; rows stay, image_path becomes NULL."""
        if isinstance(older_than_days, bool) or not isinstance(older_than_days, int) or older_than_days < 0:
            raise ValueError(f"older_than_days {older_than_days!r} must be a whole number of at least 0")
        cutoff = (time.time() if now is None else now) - older_than_days * 86400
        rows = await self._rows(
            "SELECT id, image_path FROM jobs WHERE image_path IS NOT NULL AND finished_at < ?"
            " AND status IN ('succeeded', 'failed', 'cancelled')", (cutoff,))
        found = [(r["id"], r["image_path"]) for r in rows]
        # Files and rows go together even when cancelled: no row may point at a deleted image.
        gone = await to_the_end(self._forget_images(found))
        if gone:
            log.info("history: pruned %d image(s) older than %d day(s)", len(gone), older_than_days)
        return len(gone)

    async def _forget_images(self, found: list[tuple[str, str]]) -> list[tuple[str, str]]:
        gone = await asyncio.to_thread(delete_images, self._data_dir, found)
        async with self._write() as db:
            await db.executemany("UPDATE jobs SET image_path = NULL WHERE id = ? AND image_path = ?", gone)
        return gone

