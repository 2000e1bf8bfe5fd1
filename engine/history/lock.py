"""The data-folder lock: one process that runs jobs owns a data folder at a time.

Two processes running the same queue would run every job twice, so the process that runs jobs
takes ``<data_dir>/promptpics.lock`` first; read-only users (``history``, ``show``, ``stats``)
never take it and work beside the owner::

    with DataFolderLock.acquire(config.data_dir):   # DataFolderBusyError if another process holds it
        ...                                        # run jobs

    lock = DataFolderLock.acquire(config.data_dir)  # or hold it for a lifetime
    ...
    lock.release()                                  # idempotent

The lock is an ``flock`` on the file (``msvcrt.locking`` on Windows), so the kernel drops it when
the owner exits, however it exits (SIGKILL included): there is no stale lock to clean up. The
file itself is never deleted (a process may already hold it open) and is never truncated at open,
so a refused process can read who holds it: the owner writes ``{"pid", "started_at", "hostname"}``
as JSON once it has the lock, and empties the file when it lets go.

flock belongs to an open file description, not to a process: a second ``acquire`` in the same
process is refused too, and a child made by ``fork`` without ``exec`` would share the owner's lock
(the descriptor is not inherited across ``exec``). On a network file system flock may be local
to one host; the hostname in the file is there to tell.

Errors: ``DataFolderBusyError`` (engine.errors) when another holder exists; ``ConfigError`` for
``engine.data_dir`` when the folder cannot be created or its lock file cannot be opened or locked.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from engine.errors import ConfigError, DataFolderBusyError

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

log = logging.getLogger(__name__)

LOCK_NAME = "promptpics.lock"
_INFO_LIMIT = 4096  # the owner's JSON is ~100 bytes; a bigger file is not ours to parse
_WINDOWS_LOCK_OFFSET = 1 << 20  # msvcrt locks a byte range: lock one far past the JSON so it stays readable


class DataFolderLock:
    """Holds ``<data_dir>/promptpics.lock``; build it with ``DataFolderLock.acquire``."""

    def __init__(self, data_dir: Path, fd: int) -> None:
        self._data_dir = data_dir
        self._fd: int | None = fd

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def path(self) -> Path:
        return self._data_dir / LOCK_NAME

    @property
    def held(self) -> bool:
        return self._fd is not None

    @classmethod
    def acquire(cls, data_dir: Path) -> DataFolderLock:
        """Take the folder's lock at once (never waits), creating the folder if it is missing."""
        folder = _make_folder(Path(data_dir))
        fd = _open_lock_file(folder)
        try:
            if not _try_lock(fd):
                owner = _read_owner(fd)
                raise DataFolderBusyError(str(folder), owner.get("pid"), owner.get("started_at"))
            _write_owner(fd)
        except OSError as exc:
            os.close(fd)
            raise ConfigError("engine.data_dir", str(folder),
                              f"its lock file {LOCK_NAME} could not be locked ({exc.strerror or exc})") from exc
        except BaseException:
            os.close(fd)  # closing the descriptor also lets go of a lock taken above
            raise
        log.info("data folder %s: locked by this process (pid %d)", folder, os.getpid())
        return cls(folder, fd)

    def release(self) -> None:
        """Let go of the lock; a second call does nothing."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # a later reader never sees a stopped owner's pid
            _unlock(fd)
        except OSError as exc:  # closing the descriptor below lets go all the same
            log.warning("data folder %s: lock file could not be emptied: %s", self._data_dir, exc)
        finally:
            os.close(fd)
        log.info("data folder %s: lock released", self._data_dir)

    def __enter__(self) -> DataFolderLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DataFolderLock({str(self._data_dir)!r}, held={self.held})"


def _make_folder(data_dir: Path) -> Path:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        return data_dir.resolve()
    except OSError as exc:
        raise ConfigError("engine.data_dir", str(data_dir),
                          f"the folder could not be created ({exc.strerror or exc})") from exc


def _open_lock_file(folder: Path) -> int:
    # No O_TRUNC: the owner's info must stay readable to whoever is refused. Python makes the
    # descriptor non-inheritable (PEP 446), so a program we exec does not keep the lock alive.
    try:
        return os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError("engine.data_dir", str(folder),
                          f"its lock file {LOCK_NAME} could not be opened ({exc.strerror or exc})") from exc


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except PermissionError:  # EACCES: another handle holds the byte
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # EWOULDBLOCK: held through another open file description
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _write_owner(fd: int) -> None:
    info = {"pid": os.getpid(), "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "hostname": socket.gethostname()}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode() + b"\n")
    os.fsync(fd)


def _read_owner(fd: int) -> dict[str, Any]:
    """The holder's pid and start time; an empty or garbled file (the holder is mid-write) gives {}."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, _INFO_LIMIT))
    except (OSError, ValueError):
        return {}
    if not isinstance(info, dict):
        return {}
    pid, started_at = info.get("pid"), info.get("started_at")
    return {"pid": pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            "started_at": started_at if isinstance(started_at, str) else None}
