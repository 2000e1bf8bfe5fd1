"""The job history: one SQLite file (jobs, attempts, deliveries) plus the PNG files; the only SQL.

Lifetime — ``HistoryStore.open`` returns an object that is both awaitable and an async
context manager, so either form works::

    async with HistoryStore.open(config.data_dir) as history:   # closed on exit
        job = await history.record_queued(requester=..., origin=..., model_asked=None,
                                          params=params, created_at=time.time())

    history = await HistoryStore.open(config.data_dir)          # the caller closes it
    ...
    await history.close()

Durability: every ``record_*`` call is one ``BEGIN IMMEDIATE ... COMMIT`` transaction in WAL
mode with ``synchronous = FULL``; when it returns, the row survives a crash or a power cut.
Images are written to a temporary file, fsynced and renamed, under
``<data_dir>/images/YYYY/MM/DD/<job_id>.png`` (UTC date of the finish); the database keeps
the path relative to ``data_dir`` and ``StoredJob.image_path`` gives it back absolute.

Cancellation: a write cancelled at any await happened whole or not at all, and the connection is
left outside any transaction (see ``_write``). Once COMMIT is sent the write counts as done: the
call finishes it and the cancellation lands at the caller's next await. A cancelled caller may so
wait for a statement already under way (at most ``busy_timeout_s`` for a BEGIN that waits on
another process).

Errors (all ``EngineError``)::

    HistoryError            the file cannot be opened, migrated or written: locked by another
    │                       process past ``busy_timeout_s``, corrupt, another application's file,
    │                       or a schema newer than this code; the file is never "repaired"
    ├── UnknownJobError     a job id (or attempt) that is not in the history
    ├── DuplicateJobError   a caller-chosen job id that is already taken
    └── JobFinishedError    a final status recorded for a job that already has one
    StorageError            the PNG could not be written (disk full?); the job row is unchanged

Schema versions: ``MIGRATIONS[v]`` takes a file from ``PRAGMA user_version`` v to v + 1; they
run in order at open, each in its own transaction. Never edit a released script: append one.
1: jobs, attempts, deliveries. 2: ``jobs.nsfw_allowed`` (0 for older jobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from engine.errors import EngineError
from engine.jobs import GenerationParams, JobStatus, Origin, Requester, Timings

log = logging.getLogger(__name__)
T = TypeVar("T")

ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no 0/o and 1/l: easy to read out and type
ID_LENGTH = 6  # 32**6 ~ 10**9 ids; a collision is rare and retried on insert
_ID_TRIES = 10
_CALLER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the id becomes a file name: no slashes, no dots
APPLICATION_ID = 0x50504943  # "PPIC" in the file header: tells our file from someone else's
ATTEMPT_OUTCOMES = ("succeeded", "failed", "retried", "interrupted")
DELIVERY_KINDS = ("status", "result")
IMAGES_DIR = "images"

# -- schema ---------------------------------------------------------------------------------

_SCHEMA_V1 = """
CREATE TABLE jobs (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order, never reused
    id                  TEXT    NOT NULL UNIQUE,            -- short and typable: 'k7mq2x'
    status              TEXT    NOT NULL
                        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    created_at          REAL    NOT NULL,                   -- unix seconds
    started_at          REAL,                               -- first attempt
    finished_at         REAL,
    -- who asked, and where the answer goes (plain strings)
    requester_platform  TEXT    NOT NULL,
    requester_user_id   TEXT    NOT NULL,
    requester_name      TEXT    NOT NULL,
    origin_platform     TEXT    NOT NULL,
    origin_channel_id   TEXT    NOT NULL,
    origin_thread_id    TEXT    NOT NULL,
    origin_message_ref  TEXT    NOT NULL,
    -- the normalised request
    prompt              TEXT    NOT NULL,
    negative_prompt     TEXT    NOT NULL,
    model_asked         TEXT,                               -- NULL: the router chose
    model_used          TEXT    NOT NULL,
    route_reason        TEXT    NOT NULL,
    steps               INTEGER NOT NULL,
    guidance            REAL    NOT NULL,
    width               INTEGER NOT NULL,
    height              INTEGER NOT NULL,
    seed                INTEGER NOT NULL,
    -- outcome
    image_path          TEXT,                               -- relative to data_dir
    error_kind          TEXT,
    error_message       TEXT,
    queue_wait_s        REAL    NOT NULL DEFAULT 0,
    load_s              REAL    NOT NULL DEFAULT 0,
    generate_s          REAL    NOT NULL DEFAULT 0,
    total_s             REAL    NOT NULL DEFAULT 0,
    attempt_count       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_unfinished  ON jobs (seq) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_by_user     ON jobs (requester_platform, requester_user_id, seq);
CREATE INDEX jobs_with_image  ON jobs (finished_at) WHERE image_path IS NOT NULL;

CREATE TABLE attempts (
    job_id        TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    n             INTEGER NOT NULL CHECK (n >= 1),
    model_id      TEXT    NOT NULL,
    prompt_used   TEXT    NOT NULL,
    started_at    REAL    NOT NULL,
    finished_at   REAL,
    outcome       TEXT    CHECK (outcome IN ('succeeded', 'failed', 'retried', 'interrupted')),
                                                  -- NULL while the attempt runs
    verdicts      TEXT,                           -- JSON: {"nsfw": {"flagged": true, "score": 0.9}}
    retry_reason  TEXT,
    PRIMARY KEY (job_id, n)
);

CREATE TABLE deliveries (
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    platform    TEXT NOT NULL,
    channel_id  TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('status', 'result')),
    created_at  REAL NOT NULL,
    UNIQUE (platform, channel_id, message_id)         -- a message shows one job
);
CREATE INDEX deliveries_by_job ON deliveries (job_id);

PRAGMA application_id = 1347438915;                  -- APPLICATION_ID, "PPIC"
"""

_V2_NSFW_ALLOWED = """
-- 1 when the channel allowed adult images (JobRequest.nsfw_allowed): a job taken back after a
-- restart runs under the safety rule it was asked under
ALTER TABLE jobs ADD COLUMN nsfw_allowed INTEGER NOT NULL DEFAULT 0 CHECK (nsfw_allowed IN (0, 1));
"""

MIGRATIONS: list[str] = [_SCHEMA_V1, _V2_NSFW_ALLOWED]
"""``MIGRATIONS[v]`` upgrades a file from ``user_version`` v to v + 1."""
SCHEMA_VERSION = len(MIGRATIONS)


# -- errors ---------------------------------------------------------------------------------


class HistoryError(EngineError):
    """The history database cannot be used; ``path`` is for the admin log, never the user."""

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        self.path = path
        super().__init__(message)

    def __str__(self) -> str:
        return self.user_message if self.path is None else f"{self.user_message} [{self.path}]"


class UnknownJobError(HistoryError):
    def __init__(self, job_id: str, attempt: int | None = None) -> None:
        self.job_id, self.attempt = job_id, attempt
        what = f"Job `{job_id}`" if attempt is None else f"Attempt {attempt} of job `{job_id}`"
        super().__init__(f"{what} is not in the history.")


class DuplicateJobError(HistoryError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"Job id `{job_id}` is already taken; each job needs its own id.")


class JobFinishedError(HistoryError):
    def __init__(self, job_id: str, status: JobStatus, wanted: JobStatus) -> None:
        self.job_id, self.status, self.wanted = job_id, status, wanted
        super().__init__(f"Job `{job_id}` already finished as {status.value}; "
                         f"it cannot be recorded as {wanted.value}.")


class StorageError(EngineError):
    """The image file could not be written; ``reason`` (with the path) goes to the log only."""

    def __init__(self, job_id: str, reason: str) -> None:
        self.job_id, self.reason = job_id, reason
        super().__init__(f"The image could not be saved (disk full?) for job `{job_id}`; "
                         "please ask an admin to free some space.")


# -- plain data returned --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredJob:
    id: str
    seq: int
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    requester: Requester
    origin: Origin
    model_asked: str | None  # None: the router chose
    params: GenerationParams  # params.model_id is the model used
    image_path: Path | None  # absolute; None until succeeded, or after pruning
    error_kind: str | None
    error_message: str | None
    timings: Timings
    attempt_count: int
    nsfw_allowed: bool = False  # the channel allowed adult images when the job was asked


@dataclass(frozen=True, slots=True)
class Attempt:
    job_id: str
    n: int  # 1-based
    model_id: str
    prompt_used: str
    started_at: float
    finished_at: float | None
    outcome: str | None  # one of ATTEMPT_OUTCOMES; None while running
    verdicts: dict[str, dict[str, Any]]  # detector -> {"flagged": bool, "score": float | None}
    retry_reason: str | None


@dataclass(frozen=True, slots=True)
class Delivery:
    job_id: str
    platform: str
    channel_id: str
    message_id: str
    kind: str  # 'status' | 'result'
    created_at: float


@dataclass(frozen=True, slots=True)
class ModelStats:
    model_id: str
    count: int  # jobs whose final model is this one, any status
    succeeded: int
    failed: int
    mean_generate_s: float | None  # over succeeded jobs; None when there are none
    p95_generate_s: float | None  # linear interpolation between closest ranks
    nsfw_flagged: int  # attempts on this model whose 'nsfw' verdict was flagged
    black_flagged: int  # attempts on this model whose 'black' verdict was flagged
    fixed_by_rewrite: int  # succeeded jobs with >= 1 attempt that carried a retry_reason
    fell_back: int = 0  # attempts on this model after which the safety loop moved to the fallback model
    refused: int = 0  # jobs refused by the safety loop (unsafe prompt or image, or black every time)


def new_job_id() -> str:
    """A fresh random id such as ``k7mq2x``; uniqueness is checked on insert."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


# -- the store ------------------------------------------------------------------------------


class _Opening:
    """What ``HistoryStore.open`` returns: ``await`` it, or use it with ``async with``."""

    def __init__(self, open_store: Callable[[], Coroutine[Any, Any, HistoryStore]]) -> None:
        self._open_store = open_store
        self._store: HistoryStore | None = None

    def __await__(self) -> Generator[Any, None, HistoryStore]:
        return self._open_store().__await__()

    async def __aenter__(self) -> HistoryStore:
        self._store = await self._open_store()
        return self._store

    async def __aexit__(self, *exc_info: object) -> None:
        if self._store is not None:
            await self._store.close()


class HistoryStore:
    """Jobs, attempts and deliveries in one SQLite file; build it with ``HistoryStore.open``."""

    def __init__(self, db: aiosqlite.Connection, data_dir: Path, db_path: Path,
                 busy_timeout_s: float) -> None:
        self._db: aiosqlite.Connection | None = db
        self._data_dir = data_dir
        self._db_path = db_path
        self._busy_timeout_s = busy_timeout_s
        # One connection serves every coroutine: a transaction must not interleave with another.
        self._lock = asyncio.Lock()

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def db_path(self) -> Path:
        return self._db_path

    # -- lifetime ---------------------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: Path, *, db_name: str = "promptpics.sqlite3",
             busy_timeout_s: float = 5.0) -> _Opening:
        """Open (creating or migrating) ``data_dir/db_name``; refuse files that are not ours."""
        return _Opening(lambda: cls._open(Path(data_dir), db_name, busy_timeout_s))

    @classmethod
    async def _open(cls, data_dir: Path, db_name: str, busy_timeout_s: float) -> HistoryStore:
        data_dir = data_dir.resolve()
        path = data_dir / db_name
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(path, timeout=busy_timeout_s, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise HistoryError(f"The history database could not be opened ({exc}).", path=path) from exc
        store = cls(db, data_dir, path, busy_timeout_s)
        try:
            db.row_factory = sqlite3.Row
            await store._prepare()
        except BaseException:
            await db.close()
            raise
        log.info("history: opened %s (schema version %d)", path, len(MIGRATIONS))
        return store

    async def close(self) -> None:
        async with self._lock:  # let a running transaction finish first
            db, self._db = self._db, None
            if db is not None:
                await _to_the_end(db.close())  # cancelled or not, the file is closed when this returns

    async def __aenter__(self) -> HistoryStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _prepare(self) -> None:
        # 1. Look before touching: nothing is written until the file is known to be ours.
        version = await self._check_file()
        # 2. Per-connection settings (WAL is stored in the file, the others are not).
        await self._set_pragmas()
        # 3. Forward migrations, one transaction each.
        if version < len(MIGRATIONS):
            await self._migrate(version)

    async def _check_file(self) -> int:
        try:
            app_id = await self._scalar("PRAGMA application_id")
            version = int(await self._scalar("PRAGMA user_version"))
            objects = await self._scalar("SELECT count(*) FROM sqlite_master")
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        if app_id not in (0, APPLICATION_ID):
            raise self._refuse(f"belongs to another application (application_id {app_id})")
        if version > len(MIGRATIONS):
            raise self._refuse(f"has schema version {version}, newer than the version "
                               f"{len(MIGRATIONS)} this PromptPics understands; upgrade PromptPics")
        if version == 0 and objects:
            raise self._refuse("has tables but no PromptPics schema version")
        return version

    def _refuse(self, why: str) -> HistoryError:
        return HistoryError(f"The history database {why}. It was left untouched; "
                            "point data_dir elsewhere or move the file aside.", path=self._db_path)

    async def _set_pragmas(self) -> None:
        try:
            mode = await self._scalar("PRAGMA journal_mode = WAL")
            await self._conn().execute("PRAGMA synchronous = FULL")  # survive a power cut too
            await self._conn().execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        if str(mode).lower() != "wal":
            log.warning("history: %s stays in %s journal mode (WAL unavailable here)", self._db_path, mode)

    async def _migrate(self, version: int) -> None:
        db = self._conn()
        for v in range(version, len(MIGRATIONS)):
            log.info("history: migrating %s from schema version %d to %d", self._db_path, v, v + 1)
            # PRAGMA takes no parameters; v is our own loop integer, not outside data.
            script = f"BEGIN IMMEDIATE;\n{MIGRATIONS[v]}\nPRAGMA user_version = {v + 1};\nCOMMIT;"
            try:
                # A cancelled open still lets the script finish (or fail) before the file is closed.
                await _to_the_end(db.executescript(script))
            except sqlite3.Error as exc:
                await _to_the_end(db.rollback())  # a no-op unless the script stopped half-way
                if _is_busy(exc):
                    raise self._translate(exc) from exc
                if await self._scalar("PRAGMA user_version") > v:
                    continue  # another process migrated it meanwhile
                raise HistoryError(f"Upgrading the history database from schema version {v} to "
                                   f"{v + 1} failed ({exc}); it was left at version {v}.",
                                   path=self._db_path) from exc

    # -- plumbing ---------------------------------------------------------------------------

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise HistoryError("The history store is closed.")
        return self._db

    async def _scalar(self, sql: str, args: Iterable[Any] = ()) -> Any:
        async with self._conn().execute(sql, tuple(args)) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One transaction: the write lock is taken at once (bounded by busy_timeout), committed on exit.

        Cancel-safe. A cancelled await does not stop the statement: aiosqlite's thread still runs
        it (a BEGIN, say, that then opens a transaction nobody closes). So on any exception, a
        cancellation at any await included, a ROLLBACK is queued behind whatever is in flight (the
        thread runs calls in order; outside a transaction it does nothing) and awaited to its end
        before the lock is let go. Once COMMIT is sent the write counts as done: COMMIT is awaited
        to its end and a cancellation meanwhile lands at the caller's next await instead.
        """
        async with self._lock:
            db = self._conn()
            try:
                try:
                    await db.execute("BEGIN IMMEDIATE")
                    yield db
                    await _to_the_end(db.execute("COMMIT"))
                except BaseException as exc:
                    await _to_the_end(db.rollback(), redeliver=not isinstance(exc, asyncio.CancelledError))
                    raise
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc

    async def _rows(self, sql: str, args: Mapping[str, Any] | Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            try:
                return list(await self._conn().execute_fetchall(sql, args))
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error) -> HistoryError:
        code = _primary_code(exc)
        if _is_busy(exc):
            why = (f"stayed locked by another process for more than {self._busy_timeout_s:g} s; "
                   "is a second PromptPics using the same data folder?")
        elif code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
            why = (f"is not a readable SQLite database ({exc}); it was left untouched. "
                   "Move it aside to start a fresh history")
        elif code == sqlite3.SQLITE_FULL:
            why = "could not be written: the disk is full"
        else:
            why = f"failed ({exc})"
        return HistoryError(f"The history database {why}.", path=self._db_path)

    def _job(self, row: sqlite3.Row) -> StoredJob:
        return StoredJob(
            id=row["id"], seq=row["seq"], status=JobStatus(row["status"]),
            created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
            requester=Requester(row["requester_platform"], row["requester_user_id"], row["requester_name"]),
            origin=Origin(row["origin_platform"], row["origin_channel_id"], row["origin_thread_id"],
                          row["origin_message_ref"]),
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
                  **_requester_values(requester), **_origin_values(origin), **_params_values(params)}
        async with self._write() as db:
            job_id = await self._insert_job(db, job_id, values)
        log.debug("history: job %s queued", job_id)
        return await self._require_job(job_id)

    async def _insert_job(self, db: aiosqlite.Connection, job_id: str | None,
                          values: dict[str, Any]) -> str:
        for _ in range(_ID_TRIES):
            candidate = job_id or new_job_id()
            try:
                await db.execute(_INSERT_JOB, {**values, "id": candidate})
                return candidate
            except sqlite3.IntegrityError as exc:
                if getattr(exc, "sqlite_errorcode", 0) != sqlite3.SQLITE_CONSTRAINT_UNIQUE:
                    raise
                if job_id is not None:
                    raise DuplicateJobError(job_id) from exc
                log.info("history: job id %s is taken; drawing another", candidate)
        raise HistoryError(f"No free job id was found in {_ID_TRIES} tries.")

    async def record_started(self, job_id: str, *, started_at: float, model_id: str,
                             prompt_used: str) -> int:
        """Mark the job RUNNING and open its next attempt; returns the attempt number (1-based)."""
        async with self._write() as db:
            row = await self._status_row(db, job_id, wanted=JobStatus.RUNNING)
            n = int(row["attempt_count"]) + 1
            await db.execute(
                "UPDATE jobs SET status = 'running', started_at = coalesce(started_at, :t),"
                " attempt_count = :n WHERE id = :id", {"t": started_at, "n": n, "id": job_id})
            await db.execute(
                "INSERT INTO attempts (job_id, n, model_id, prompt_used, started_at)"
                " VALUES (?, ?, ?, ?, ?)", (job_id, n, model_id, prompt_used, started_at))
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
                (outcome, _verdicts_json(verdicts), retry_reason, finished_at, job_id, n))
            if cur.rowcount == 0:
                raise UnknownJobError(job_id, attempt=n)

    async def record_succeeded(self, job_id: str, *, png: bytes, timings: Timings,
                               finished_at: float) -> Path:
        """Write the PNG (temp file + rename), then mark the job SUCCEEDED; returns the absolute path."""
        await self._require_unfinished(job_id, wanted=JobStatus.SUCCEEDED)
        relative = _image_relpath(job_id, finished_at)
        path = self._data_dir / relative
        try:
            # To the end even when cancelled: a rename that lands after we stopped waiting would
            # leave an image no row points at. A cancellation then lands in _finish, which undoes it.
            await _to_the_end(asyncio.to_thread(_save_atomically, path, png))
        except OSError as exc:
            log.error("history: job %s: image could not be written to %s: %s", job_id, path, exc)
            raise StorageError(job_id, f"{path}: {exc}") from exc
        try:
            await self._finish(job_id, JobStatus.SUCCEEDED, finished_at, timings=timings,
                               image_path=relative.as_posix(), open_attempts="succeeded")
        except BaseException as exc:  # the row was not written (_write commits whole or not at all)
            await _to_the_end(asyncio.to_thread(path.unlink, missing_ok=True),  # no orphan image
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
            cur = await db.execute(_FINISH_JOB, values)
            if cur.rowcount == 0:
                await self._status_row(db, job_id, wanted=status)  # raises the right error
            await db.execute("UPDATE attempts SET outcome = :outcome, finished_at = :finished_at"
                             " WHERE job_id = :id AND outcome IS NULL", values)
        log.debug("history: job %s %s", job_id, status.value)

    async def update_params(self, job_id: str, params: GenerationParams) -> None:
        """Replace the normalised request, e.g. after a fallback switched the model."""
        async with self._write() as db:
            cur = await db.execute(_UPDATE_PARAMS, {"id": job_id, **_params_values(params)})
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
                          limit: int = 20) -> list[StoredJob]:
        """Newest first; ``None`` filters match everyone."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit {limit!r} must be a whole number of at least 1")
        return await self._jobs(_RECENT_JOBS, {"user_id": user_id, "platform": platform, "limit": limit})

    async def attempts(self, job_id: str) -> list[Attempt]:
        rows = await self._rows("SELECT * FROM attempts WHERE job_id = ? ORDER BY n", (job_id,))
        return [Attempt(job_id=r["job_id"], n=r["n"], model_id=r["model_id"], prompt_used=r["prompt_used"],
                        started_at=r["started_at"], finished_at=r["finished_at"], outcome=r["outcome"],
                        verdicts=json.loads(r["verdicts"]) if r["verdicts"] else {},
                        retry_reason=r["retry_reason"]) for r in rows]

    # -- deliveries -----------------------------------------------------------------------

    async def record_delivery(self, job_id: str, *, platform: str, channel_id: str, message_id: str,
                              kind: str, created_at: float | None = None) -> None:
        """Remember that a message shows ``job_id``; the same message again re-points it (last wins)."""
        if kind not in DELIVERY_KINDS:
            raise ValueError(f"kind {kind!r} must be one of {', '.join(DELIVERY_KINDS)}")
        values = {"job_id": job_id, "platform": str(platform), "channel_id": str(channel_id),
                  "message_id": str(message_id), "kind": kind,
                  "created_at": time.time() if created_at is None else created_at}
        async with self._write() as db:
            try:
                await db.execute(_UPSERT_DELIVERY, values)
            except sqlite3.IntegrityError as exc:
                if getattr(exc, "sqlite_errorcode", 0) != sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY:
                    raise
                raise UnknownJobError(job_id) from exc

    async def job_by_message(self, *, platform: str, channel_id: str, message_id: str) -> StoredJob | None:
        jobs = await self._jobs(
            "SELECT jobs.* FROM deliveries JOIN jobs ON jobs.id = deliveries.job_id"
            " WHERE deliveries.platform = ? AND deliveries.channel_id = ? AND deliveries.message_id = ?",
            (str(platform), str(channel_id), str(message_id)))
        return jobs[0] if jobs else None

    async def deliveries(self, job_id: str) -> list[Delivery]:
        rows = await self._rows("SELECT * FROM deliveries WHERE job_id = ? ORDER BY created_at, rowid",
                                (job_id,))
        return [Delivery(r["job_id"], r["platform"], r["channel_id"], r["message_id"], r["kind"],
                         r["created_at"]) for r in rows]

    # -- statistics and retention ---------------------------------------------------------

    async def model_stats(self) -> list[ModelStats]:
        """Per model, sorted by id: job counts and times from ``jobs``, detector flags from ``attempts``."""
        counts = {r["model_id"]: r for r in await self._rows(_JOB_COUNTS)}
        flags = {r["model_id"]: r for r in await self._rows(_ATTEMPT_FLAGS)}
        times: dict[str, list[float]] = {}
        for r in await self._rows("SELECT model_used, generate_s FROM jobs"
                                  " WHERE status = 'succeeded' ORDER BY generate_s"):
            times.setdefault(r["model_used"], []).append(r["generate_s"])
        stats = []
        for model_id in sorted(counts.keys() | flags.keys()):
            c, f, t = counts.get(model_id), flags.get(model_id), times.get(model_id, [])
            stats.append(ModelStats(
                model_id=model_id, count=c["count"] if c else 0, succeeded=c["succeeded"] if c else 0,
                failed=c["failed"] if c else 0, mean_generate_s=sum(t) / len(t) if t else None,
                p95_generate_s=_percentile(t, 0.95), nsfw_flagged=f["nsfw"] if f else 0,
                black_flagged=f["black"] if f else 0, fixed_by_rewrite=c["fixed"] if c else 0,
                fell_back=f["fell_back"] if f else 0, refused=c["refused"] if c else 0))
        return stats

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
        gone = await _to_the_end(self._forget_images(found))
        if gone:
            log.info("history: pruned %d image(s) older than %d day(s)", len(gone), older_than_days)
        return len(gone)

    async def _forget_images(self, found: list[tuple[str, str]]) -> list[tuple[str, str]]:
        gone = await asyncio.to_thread(_delete_images, self._data_dir, found)
        async with self._write() as db:
            await db.executemany("UPDATE jobs SET image_path = NULL WHERE id = ? AND image_path = ?", gone)
        return gone


# -- SQL used above -------------------------------------------------------------------------

_INSERT_JOB = """
INSERT INTO jobs (id, status, created_at,
                  requester_platform, requester_user_id, requester_name,
                  origin_platform, origin_channel_id, origin_thread_id, origin_message_ref,
                  prompt, negative_prompt, model_asked, model_used, route_reason,
                  steps, guidance, width, height, seed, nsfw_allowed)
VALUES (:id, :status, :created_at,
        :requester_platform, :requester_user_id, :requester_name,
        :origin_platform, :origin_channel_id, :origin_thread_id, :origin_message_ref,
        :prompt, :negative_prompt, :model_asked, :model_used, :route_reason,
        :steps, :guidance, :width, :height, :seed, :nsfw_allowed)
"""

_FINISH_JOB = """
UPDATE jobs
   SET status        = :status,
       finished_at   = :finished_at,
       image_path    = :image_path,
       error_kind    = :error_kind,
       error_message = :error_message,
       queue_wait_s  = CASE WHEN :keep THEN queue_wait_s ELSE :queue_wait_s END,
       load_s        = CASE WHEN :keep THEN load_s       ELSE :load_s       END,
       generate_s    = CASE WHEN :keep THEN generate_s   ELSE :generate_s   END,
       total_s       = CASE WHEN :keep THEN total_s      ELSE :total_s      END
 WHERE id = :id AND status IN ('queued', 'running')
"""

_UPDATE_PARAMS = """
UPDATE jobs
   SET prompt = :prompt, negative_prompt = :negative_prompt, model_used = :model_used,
       route_reason = :route_reason, steps = :steps, guidance = :guidance,
       width = :width, height = :height, seed = :seed
 WHERE id = :id
"""

_RECENT_JOBS = """
SELECT * FROM jobs
 WHERE (:user_id  IS NULL OR requester_user_id  = :user_id)
   AND (:platform IS NULL OR requester_platform = :platform)
 ORDER BY seq DESC
 LIMIT :limit
"""

_UPSERT_DELIVERY = """
INSERT INTO deliveries (job_id, platform, channel_id, message_id, kind, created_at)
VALUES (:job_id, :platform, :channel_id, :message_id, :kind, :created_at)
    ON CONFLICT (platform, channel_id, message_id)
    DO UPDATE SET job_id = excluded.job_id, kind = excluded.kind
"""

_JOB_COUNTS = """
SELECT model_used                  AS model_id,
       count(*)                    AS count,
       sum(status = 'succeeded')   AS succeeded,
       sum(status = 'failed')      AS failed,
       sum(status = 'succeeded' AND EXISTS (
               SELECT 1 FROM attempts
                WHERE attempts.job_id = jobs.id AND attempts.retry_reason IS NOT NULL
           ))                      AS fixed,
       sum(status = 'failed' AND error_kind IN ('UnsafeContentError', 'BlankImageError')) AS refused
  FROM jobs
 GROUP BY model_used
"""

_ATTEMPT_FLAGS = """
SELECT model_id,
       sum(coalesce(json_extract(verdicts, '$.nsfw.flagged'),  0) = 1) AS nsfw,
       sum(coalesce(json_extract(verdicts, '$.black.flagged'), 0) = 1) AS black,
       sum(coalesce(retry_reason, '') LIKE '%fell back%')               AS fell_back
  FROM attempts
 WHERE verdicts IS NOT NULL
 GROUP BY model_id
"""


# -- helpers --------------------------------------------------------------------------------


async def _to_the_end(aw: Awaitable[T], *, redeliver: bool = True) -> T:
    """Await ``aw`` to its end even if the caller is cancelled meanwhile (trio's shielded scope).

    ``asyncio.shield`` alone lets the caller go on while ``aw`` still runs; here the caller waits.
    A cancellation that arrives meanwhile is held back and asked for again once ``aw`` is done, so
    it lands at the caller's next await; ``redeliver=False`` when a CancelledError is already on
    its way up (a second one would hit the caller's own clean-up).
    """
    inner = asyncio.ensure_future(aw)
    task = asyncio.current_task()
    held = False
    try:
        while True:
            try:
                return await asyncio.shield(inner)
            except asyncio.CancelledError:
                if inner.cancelled() or task is None:  # aw itself was cancelled: nothing to hold back
                    raise
                held = True
                task.uncancel()  # keeps asyncio.timeout's count right: one cancel, asked again below
    finally:
        if held and redeliver and task is not None:
            task.cancel()


def _primary_code(exc: sqlite3.Error) -> int:
    return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF  # extended codes keep it in the low byte


def _is_busy(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _requester_values(r: Requester) -> dict[str, Any]:
    return {"requester_platform": r.platform, "requester_user_id": r.user_id,
            "requester_name": r.display_name}


def _origin_values(o: Origin) -> dict[str, Any]:
    return {"origin_platform": o.platform, "origin_channel_id": o.channel_id,
            "origin_thread_id": o.thread_id, "origin_message_ref": o.message_ref}


def _params_values(p: GenerationParams) -> dict[str, Any]:
    return {"prompt": p.prompt, "negative_prompt": p.negative_prompt, "model_used": p.model_id,
            "route_reason": p.route_reason, "steps": p.steps, "guidance": p.guidance,
            "width": p.width, "height": p.height, "seed": p.seed}


def _verdicts_json(verdicts: Mapping[str, Any] | None) -> str | None:
    """Detector name -> {"flagged": bool, "score": float | None}, as JSON text SQLite can query."""
    if verdicts is None:
        return None
    return json.dumps({str(name): _verdict(v) for name, v in verdicts.items()}, sort_keys=True)


def _verdict(v: Any) -> dict[str, Any]:
    flagged, score = (v.get("flagged"), v.get("score")) if isinstance(v, Mapping) else (
        getattr(v, "flagged"), getattr(v, "score", None))
    score = None if score is None or not math.isfinite(float(score)) else float(score)
    return {"flagged": bool(flagged), "score": score}


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _image_relpath(job_id: str, finished_at: float) -> Path:
    day = datetime.fromtimestamp(finished_at, tz=timezone.utc)
    return Path(IMAGES_DIR, f"{day:%Y}", f"{day:%m}", f"{day:%d}", f"{job_id}.png")


def _save_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: a reader never sees half an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_and_sync(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_and_sync(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _delete_images(data_dir: Path, found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Delete each file (a missing one counts as gone); returns the (job id, path) pairs now gone."""
    root = (data_dir / IMAGES_DIR).resolve()
    gone = []
    for job_id, relative in found:
        path = (data_dir / relative).resolve()
        if not path.is_relative_to(root):
            log.warning("history: job %s: image path %s is outside %s; left alone", job_id, relative, root)
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("history: job %s: image %s could not be deleted: %s", job_id, path, exc)
            continue
        gone.append((job_id, relative))
        _remove_empty_parents(path.parent, root)
    return gone


def _remove_empty_parents(folder: Path, root: Path) -> None:
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            return
        folder = folder.parent
