"""PromptPics engine: the public surface the bot may use. Importing it loads no torch."""

from engine.config import Config, ModelSpec, load_config, with_tiny_models
from engine.core import Engine, JobHandle, QueueEntry
from engine.errors import (
    ConfigError,
    DataFolderBusyError,
    EngineClosedError,
    EngineError,
    GenerationError,
    JobCancelledError,
    ModelLoadError,
    OutOfMemoryError,
    QueueFullError,
    RequestError,
)
from engine.history import (
    AttemptRecord,
    DataFolderLock,
    Deliveries,
    DeliveryRecord,
    HistoryError,
    HistoryStore,
    ModelStats,
    StorageError,
    StoredJob,
    write_atomic,
)
from engine.jobs import (
    EngineEvent,
    GenerationParams,
    JobCancelled,
    JobEvent,
    JobFailed,
    JobFinished,
    JobPreviewed,
    JobProgressed,
    JobQueued,
    JobRequest,
    JobResult,
    JobStarted,
    JobStatus,
    Origin,
    QueueMoved,
    QueuePlace,
    Requester,
    Timings,
)
from engine.safety import BlankImageError, ImageRefusedError, SafetyConfig, UnsafeContentError

__all__ = [
    "Config", "ConfigError", "Engine", "EngineError", "GenerationError", "GenerationParams", "JobCancelled",
    "JobCancelledError", "JobEvent", "JobFailed", "JobFinished", "JobHandle", "JobPreviewed", "JobProgressed", "JobQueued",
    "JobRequest", "JobResult", "JobStarted", "JobStatus", "ModelLoadError", "ModelSpec", "Origin",
    "OutOfMemoryError", "QueueEntry", "QueueFullError", "RequestError", "Requester", "Timings", "load_config",
    "with_tiny_models", "BlankImageError", "ImageRefusedError", "SafetyConfig", "UnsafeContentError",
    "DataFolderBusyError", "EngineClosedError", "EngineEvent", "QueueMoved", "QueuePlace",
    "AttemptRecord", "DataFolderLock", "Deliveries", "DeliveryRecord", "HistoryError", "HistoryStore", "ModelStats",
    "StorageError", "StoredJob", "write_atomic",
]
