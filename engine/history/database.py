"""The history's SQLite connection: open (checks, pragmas, migrations), close, and the
cancel-safe transaction every write goes through. ``HistoryStore`` builds on it.

Durability: every write is one ``BEGIN IMMEDIATE ... COMMIT`` transaction (``_write``) in WAL
mode with ``synchronous = FULL``; when it returns, the row survives a crash or a power cut.

Cancellation: a write cancelled at any await happened whole or not at all, and the connection is
left outside any transaction (see ``_write``). Once COMMIT is sent the write counts as done: the
call finishes it and the cancellation lands at the caller's next await. A cancelled caller may so
wait for a statement already under way (at most ``busy_timeout_s`` for a BEGIN that waits on
another process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable, Mapping
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

import aiosqlite

from engine.history import schema
from engine.history.errors import HistoryError

log = logging.getLogger(__name__)
T = TypeVar("T")
D = TypeVar("D", bound="Database")


class _Opening(Generic[D]):
    """What ``HistoryStore.open`` returns: ``await`` it, or use it with ``async with``."""

    def __init__(self, open_store: Callable[[], Coroutine[Any, Any, D]]) -> None:
        self._open_store = open_store
        self._store: D | None = None

    def __await__(self) -> Generator[Any, None, D]:
        return self._open_store().__await__()

    async def __aenter__(self) -> D:
        self._store = await self._open_store()
        return self._store

    async def __aexit__(self, *exc_info: object) -> None:
        if self._store is not None:
            await self._store.close()


class Database:
    """One SQLite connection to the history file; ``HistoryStore`` adds what is kept in it."""

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
             busy_timeout_s: float = 5.0, read_only: bool = False) -> _Opening[Self]:
        """Open (creating or migrating) ``data_dir/db_name``; refuse files that are not ours.

        ``read_only``: open with SQLite's ``mode=ro``, create and migrate nothing, so a backup
        (a read-only file in a read-only folder) can be read; a write then fails."""
        return _Opening(lambda: cls._open(Path(data_dir), db_name, busy_timeout_s, read_only))

    @classmethod
    async def _open(cls, data_dir: Path, db_name: str, busy_timeout_s: float, read_only: bool = False) -> Self:
        data_dir = data_dir.resolve()
        path = data_dir / db_name
        try:
            if read_only:
                db = await _connect_read_only(path, busy_timeout_s)
            else:
                data_dir.mkdir(parents=True, exist_ok=True)
                db = await aiosqlite.connect(path, timeout=busy_timeout_s, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise HistoryError(f"The history database could not be opened ({exc}).", path=path) from exc
        store = cls(db, data_dir, path, busy_timeout_s)
        try:
            db.row_factory = sqlite3.Row
            await (store._check_readable() if read_only else store._prepare())
        except BaseException:
            await db.close()
            raise
        log.info("history: opened %s (schema version %d)", path, len(schema.MIGRATIONS))
        return store

    async def close(self) -> None:
        async with self._lock:  # let a running transaction finish first
            db, self._db = self._db, None
            if db is not None:
                await to_the_end(db.close())  # cancelled or not, the file is closed when this returns

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _prepare(self) -> None:
        # 1. Look before touching: nothing is written until the file is known to be ours.
        version = await self._check_file()
        # 2. Per-connection settings (WAL is stored in the file, the others are not).
        await self._set_pragmas()
        # 3. Forward migrations, one transaction each.
        if version < len(schema.MIGRATIONS):
            await self._migrate(version)

    async def _check_readable(self) -> None:
        version = await self._check_file()
        if version < len(schema.MIGRATIONS):
            raise HistoryError(f"The history database has schema version {version}, older than the version "
                               f"{len(schema.MIGRATIONS)} this PromptPics reads; a command that writes "
                               "(imagine, chat, run) upgrades it.", path=self._db_path)

    async def _check_file(self) -> int:
        try:
            app_id = await self._scalar("PRAGMA application_id")
            version = int(await self._scalar("PRAGMA user_version"))
            objects = await self._scalar("SELECT count(*) FROM sqlite_master")
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        if app_id not in (0, schema.APPLICATION_ID):
            raise self._refuse(f"belongs to another application (application_id {app_id})")
        if version > len(schema.MIGRATIONS):
            raise self._refuse(f"has schema version {version}, newer than the version "
                               f"{len(schema.MIGRATIONS)} this PromptPics understands; upgrade PromptPics")
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
        for v in range(version, len(schema.MIGRATIONS)):
            log.info("history: migrating %s from schema version %d to %d", self._db_path, v, v + 1)
            # PRAGMA takes no parameters; v is our own loop integer, not outside data.
            script = f"BEGIN IMMEDIATE;\n{schema.MIGRATIONS[v]}\nPRAGMA user_version = {v + 1};\nCOMMIT;"
            try:
                # A cancelled open still lets the script finish (or fail) before the file is closed.
                await to_the_end(db.executescript(script))
            except sqlite3.Error as exc:
                await to_the_end(db.rollback())  # a no-op unless the script stopped half-way
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
                    await to_the_end(db.execute("COMMIT"))
                except BaseException as exc:
                    await to_the_end(db.rollback(), redeliver=not isinstance(exc, asyncio.CancelledError))
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


# -- helpers --------------------------------------------------------------------------------


async def to_the_end(aw: Awaitable[T], *, redeliver: bool = True) -> T:
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


async def _connect_read_only(path: Path, busy_timeout_s: float) -> aiosqlite.Connection:
    """``mode=ro``; where SQLite cannot keep the WAL index beside a read-only file (a backup in a
    read-only folder) the file is read as ``immutable``: nobody can write it there anyway."""
    if not path.is_file():
        raise FileNotFoundError(f"no history database at {path}")
    uri = path.as_uri() + "?mode=ro"
    db = await aiosqlite.connect(uri, uri=True, timeout=busy_timeout_s, isolation_level=None)
    try:
        await (await db.execute("SELECT count(*) FROM sqlite_master")).close()
        return db
    except sqlite3.OperationalError:
        await db.close()
        if os.access(path, os.W_OK) or os.access(path.parent, os.W_OK):
            raise
    return await aiosqlite.connect(uri + "&immutable=1", uri=True, timeout=busy_timeout_s, isolation_level=None)
