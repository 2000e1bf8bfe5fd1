"""A restart loses nothing: SIGKILL in the middle of a job, then a new process finishes every job once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import REPO

WORKER = """
import asyncio, sys
from pathlib import Path
from engine import Engine, JobProgressed, JobRequest
from engine.tiny import ensure_tiny_models
from tests.conftest import make_tiny_config

data_dir, tiny_cache, submit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
config = make_tiny_config(ensure_tiny_models(tiny_cache), data_dir)

async def main():
    async with Engine(config) as engine:
        handles = list(engine.resumed)
        for i in range(submit):
            handles.append(await engine.submit(JobRequest(f"job {i}: a lighthouse", model="flux_dev", steps=40,
                                                          width=320, height=320, seed=i)))
        print("submitted", flush=True)
        if submit:
            async for event in handles[1].events():  # the second job has 39 of its 40 steps ahead
                if isinstance(event, JobProgressed):
                    print("second job running", flush=True)
                    break
        for handle in handles:
            await handle.result()
        print("done", len(handles), flush=True)

asyncio.run(main())
"""


def run_worker(data_dir: Path, tiny_models: Any, submit: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(data_dir), str(tiny_models.root.parent), str(submit)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return conn.execute(sql).fetchall()


def count(db: Path, status: str) -> int:
    """Jobs in ``status``; 0 while the worker has not created the file or its schema yet."""
    try:
        return rows(db, f"SELECT count(*) FROM jobs WHERE status = '{status}'")[0][0] if db.exists() else 0
    except sqlite3.OperationalError:
        return 0


def test_sigkill_mid_job_then_a_new_process_finishes_every_job_exactly_once(tiny_models: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    db = data_dir / "promptpics.sqlite3"
    first = run_worker(data_dir, tiny_models, submit=4)
    # Kill while the second job is running (the worker says when its first step is done): one
    # finished, one interrupted, two never started.
    assert first.stdout is not None
    said = [first.stdout.readline() for _ in range(2)]
    assert said == ["submitted\n", "second job running\n"], f"the worker ended early: {said}, {first.communicate()}"
    while count(db, "running") != 1:  # its row says so too (written beside the steps, on the loop)
        assert first.poll() is None, f"the worker ended early: {first.communicate()}"
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    before = dict(rows(db, "SELECT id, status FROM jobs"))
    assert sorted(before.values()) == ["queued", "queued", "running", "succeeded"]

    second = run_worker(data_dir, tiny_models, submit=0)
    out, err = second.communicate(timeout=180)
    assert second.returncode == 0, err
    assert "done 3" in out  # the three unfinished jobs were taken back

    jobs = rows(db, "SELECT id, status, image_path, seq, finished_at FROM jobs ORDER BY seq")
    assert [status for _, status, *_ in jobs] == ["succeeded"] * 4
    assert all((data_dir / image).is_file() for _, _, image, *_ in jobs)
    finished = [f for *_, f in jobs]
    assert finished == sorted(finished), "jobs must finish in their original order"
    outcomes = {job_id: [o for (o,) in rows(db, f"SELECT outcome FROM attempts WHERE job_id = '{job_id}' ORDER BY n")]
                for job_id, *_ in jobs}
    interrupted = [job_id for job_id, status in before.items() if status == "running"][0]
    assert outcomes.pop(interrupted) == ["interrupted", "succeeded"]
    assert all(o == ["succeeded"] for o in outcomes.values())  # each job ran to the end exactly once
