"""DataFolderLock: one process runs a data folder; a second one, in this process or another, is refused by name."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from engine.history import LOCK_NAME, DataFolderLock
from engine.errors import ConfigError, DataFolderBusyError, EngineError

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock semantics; Windows uses msvcrt")

REPO = Path(__file__).resolve().parents[1]

TRY_ACQUIRE = """
import sys
from pathlib import Path
from engine.history import DataFolderLock
from engine.errors import DataFolderBusyError
try:
    lock = DataFolderLock.acquire(Path(sys.argv[1]))
except DataFolderBusyError as exc:
    print(exc.user_message, flush=True)
    sys.exit(3)
print("held", flush=True)
if len(sys.argv) > 2:
    sys.stdin.readline()  # hold it until told (or killed)
lock.release()
"""


def python(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", TRY_ACQUIRE, *args], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def try_from_another_process(data_dir: Path) -> tuple[int, str]:
    child = python(str(data_dir))
    out, err = child.communicate(timeout=60)
    assert child.returncode in (0, 3), err
    return child.returncode, out.strip()


def test_the_holder_writes_who_it_is(tmp_path: Path) -> None:
    with DataFolderLock.acquire(tmp_path) as lock:
        assert lock.held and lock.path == tmp_path.resolve() / LOCK_NAME
        info = json.loads(lock.path.read_text())
    assert info["pid"] == os.getpid() and info["hostname"] == socket.gethostname()
    started = datetime.fromisoformat(info["started_at"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", info["started_at"])  # local, to the second
    assert abs(started.timestamp() - datetime.now().timestamp()) < 60


def test_a_second_acquire_in_the_same_process_is_refused_with_the_owner(tmp_path: Path) -> None:
    with DataFolderLock.acquire(tmp_path) as first:
        owner = json.loads(first.path.read_text())
        with pytest.raises(DataFolderBusyError) as caught:
            DataFolderLock.acquire(tmp_path)
        assert caught.value.pid == os.getpid() and caught.value.started_at == owner["started_at"]
        assert caught.value.data_dir == str(tmp_path.resolve())
        message = caught.value.user_message
        assert f"pid {os.getpid()}" in message and owner["started_at"] in message and str(tmp_path) in message
        assert json.loads(first.path.read_text()) == owner  # the refused one did not clear the owner's info
    with DataFolderLock.acquire(tmp_path):  # released on leaving the with block
        pass


def test_release_is_idempotent_and_lets_the_next_owner_in(tmp_path: Path) -> None:
    lock = DataFolderLock.acquire(tmp_path)
    lock.release()
    lock.release()
    assert not lock.held and lock.path.read_text() == ""  # no stopped owner's pid left behind
    again = DataFolderLock.acquire(tmp_path)
    assert json.loads(again.path.read_text())["pid"] == os.getpid()
    again.release()
    assert lock.path.exists()  # never deleted: another process may hold it open


def test_a_missing_folder_is_created(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b" / "data"
    with DataFolderLock.acquire(folder) as lock:
        assert folder.is_dir() and lock.data_dir == folder.resolve()


def test_a_folder_that_cannot_be_made_names_the_folder_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / "file" / "data"
    with pytest.raises(ConfigError) as caught:
        DataFolderLock.acquire(folder)
    assert isinstance(caught.value, EngineError) and caught.value.key == "engine.data_dir"
    assert str(folder) in caught.value.user_message and "could not be created" in caught.value.user_message


def test_a_lock_file_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).mkdir()  # something else sits where the lock file goes
    with pytest.raises(ConfigError, match=f"lock file {LOCK_NAME} could not be opened"):
        DataFolderLock.acquire(tmp_path)


@pytest.mark.parametrize("content", [b"", b"{\"pid\": 12", b"\xff\xfe garbage", b"[1, 2]",
                                     b'{"pid": "12", "started_at": 5}', b'{"pid": true}'])
def test_an_owner_mid_write_or_garbled_gives_pid_unknown(tmp_path: Path, content: bytes) -> None:
    with DataFolderLock.acquire(tmp_path) as lock:
        lock.path.write_bytes(content)  # as if the owner had not written its info yet
        with pytest.raises(DataFolderBusyError) as caught:
            DataFolderLock.acquire(tmp_path)
    assert caught.value.pid is None and caught.value.started_at is None
    assert "pid unknown" in caught.value.user_message


def test_another_process_is_refused_while_held_and_let_in_after_release(tmp_path: Path) -> None:
    lock = DataFolderLock.acquire(tmp_path)
    code, out = try_from_another_process(tmp_path)
    assert code == 3 and f"pid {os.getpid()}" in out and "another PromptPics process" in out
    lock.release()
    assert try_from_another_process(tmp_path) == (0, "held")


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = python(str(tmp_path), "hold")
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(DataFolderBusyError) as caught:
            DataFolderLock.acquire(tmp_path)
        assert caught.value.pid == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops the flock
        holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    with DataFolderLock.acquire(tmp_path) as lock:  # the dead owner's info is simply overwritten
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
