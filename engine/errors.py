"""The engine's exception tree: every error a user can see carries a ready sentence.

    EngineError                      base; ``user_message`` is safe to show in chat
    ├── ConfigError                  config.toml or environment is wrong (start-up only)
    ├── RequestError                 a request field breaks a rule (names field, value, rule)
    ├── QueueFullError               the queue cannot take more jobs
    ├── EngineClosedError            the engine is stopping or stopped: nothing more is taken
    ├── DataFolderBusyError          another process runs jobs on this data folder (start-up only)
    ├── JobCancelledError            the job was cancelled by a user or an admin
    ├── ModelLoadError               a model could not be loaded (missing files, bad folder)
    ├── OutOfMemoryError             the GPU (or RAM) ran out of memory, even after a retry
    ├── GenerationError              the pipeline failed while generating
    ├── ImageRefusedError            (engine.safety.errors) nothing was posted, and why:
    │   ├── UnsafeContentError       the prompt, or every image, was flagged NSFW
    │   └── BlankImageError          every image came out black/NaN, the fallback included
    └── NonFiniteError               (engine.safety.errors) NaN/Inf latents or pixels; retried by the
                                     safety policy, never shown to a user

Foreign errors (torch, diffusers, OSError) are translated at the seam that calls them
(``raise ModelLoadError(...) from exc``) so the original traceback stays in the log.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class. ``user_message`` never contains a path, a traceback or a token."""

    user_message: str = "Sorry, something went wrong."

    def __init__(self, message: str | None = None) -> None:
        if message is not None:
            self.user_message = message
        super().__init__(self.user_message)


class ConfigError(EngineError):
    """A configuration key has a value that breaks a rule."""

    def __init__(self, key: str, value: object, rule: str) -> None:
        self.key, self.value, self.rule = key, value, rule
        super().__init__(f"config: `{key}` is {value!r}, but {rule}")


class RequestError(EngineError):
    """A request field has a value that breaks a rule."""

    def __init__(self, field: str, value: object, rule: str) -> None:
        self.field, self.value, self.rule = field, value, rule
        shown = value if not isinstance(value, str) or len(value) <= 40 else value[:37] + "..."
        super().__init__(f"`{field}` is {shown!r}, but {rule}")


class QueueFullError(EngineError):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"The queue is full ({limit} jobs waiting); please try again in a few minutes.")


class EngineClosedError(EngineError):
    """A submit or an admin call reached an engine that is shutting down or has stopped."""

    def __init__(self, what: str = "") -> None:
        self.what = what
        super().__init__("The bot is shutting down; please try again in a minute.")


class DataFolderBusyError(EngineError):
    """Another process holds the data folder's lock: two processes must never run the same jobs."""

    def __init__(self, data_dir: str, pid: int | None, started_at: str | None) -> None:
        self.data_dir, self.pid, self.started_at = data_dir, pid, started_at
        who = f"pid {pid}, started at {started_at}" if pid is not None else "pid unknown"
        super().__init__(f"another PromptPics process ({who}) is running on this data folder ({data_dir}); "
                         "stop it first or use another data_dir")


class JobCancelledError(EngineError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"Job `{job_id}` was cancelled.")


class ModelLoadError(EngineError):
    def __init__(self, model_id: str, reason: str) -> None:
        self.model_id, self.reason = model_id, reason
        super().__init__(f"Model `{model_id}` could not be loaded: {reason}")


class OutOfMemoryError(EngineError):
    def __init__(self, model_id: str, phase: str) -> None:
        self.model_id, self.phase = model_id, phase
        super().__init__(
            f"The GPU ran out of memory while {phase} `{model_id}`, even after freeing other models; "
            "try a smaller image or fewer jobs at once."
        )


class GenerationError(EngineError):
    def __init__(self, model_id: str, job_id: str) -> None:
        self.model_id, self.job_id = model_id, job_id
        super().__init__(f"Sorry, something went wrong while generating (job `{job_id}`).")
