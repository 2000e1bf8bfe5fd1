"""The history's errors (all ``EngineError``)::

    HistoryError            the file cannot be opened, migrated or written: locked by another
    │                       process past ``busy_timeout_s``, corrupt, another application's file,
    │                       or a schema newer than this code; the file is never "repaired"
    ├── UnknownJobError     a job id (or attempt) that is not in the history
    ├── DuplicateJobError   a caller-chosen job id that is already taken
    └── JobFinishedError    a final status recorded for a job that already has one
    StorageError            the PNG could not be written (disk full?); the job row is unchanged
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import EngineError
from engine.jobs import JobStatus



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
