"""A job runner that a test can hold mid-job, in this process or in a Ray actor's.

Ray pickles a runner factory by reference, so ``held_runner`` lives in an importable module
(the actors find this checkout on their path: engine/cluster/modes.py). A job whose prompt
starts with "hold" stops after its first step until its cancel flag is set (or its process is
killed) -- but only the first time that job id runs anywhere: a marker file under
``$PROMPTPICS_TEST_HOLD_DIR`` (shared by every process on the machine) lets the job run through
when the engine sends it again to another worker. The marker holds the holding process's pid
(``holder``), so a test can kill whichever worker got the job.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config import Config
from engine.cluster.runner import JobRunner, RunOutput
from engine.jobs import GenerationParams
from engine.residency import ResidencyManager

HOLD_DIR = "PROMPTPICS_TEST_HOLD_DIR"
HOLD_LIMIT_S = 120.0  # a test that forgets to cancel or kill still ends


class HeldRunner:
    def __init__(self, real: JobRunner) -> None:
        self.residency, self.safety, self._real = real.residency, real.safety, real

    def run_blocking(self, job_id: str, params: GenerationParams, on_step: Callable[[int, int], None],
                     cancel: threading.Event, *args: Any) -> RunOutput:
        hold = params.prompt.startswith("hold") and _first_time(job_id)

        def step(n: int, total: int) -> None:
            on_step(n, total)
            if hold and n == 1:
                cancel.wait(HOLD_LIMIT_S)

        return self._real.run_blocking(job_id, params, step, cancel, *args)


def held_runner(config: Config, device: Any, dtype: Any) -> HeldRunner:
    return HeldRunner(JobRunner(config, ResidencyManager(device, dtype, settings=config.residency)))


def _first_time(job_id: str) -> bool:
    try:
        fd = os.open(Path(os.environ[HOLD_DIR]) / f"{job_id}.held", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def holder(job_id: str) -> int:
    """The pid of the process holding ``job_id`` (after its first step was seen)."""
    return int((Path(os.environ[HOLD_DIR]) / f"{job_id}.held").read_text())


def llm_home(llm: Any, tag: str) -> tuple[int, str, str, str]:
    """A router-LLM call that says where it ran: (process, thread, the LLM's class, ``tag``).
    Module-level, so that Ray pickles it by reference for a worker's actor."""
    return os.getpid(), threading.current_thread().name, type(llm).__name__, tag
