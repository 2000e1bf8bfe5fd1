"""Plain data that crosses the bot/engine boundary: requests, jobs, events and results."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class JobStatus(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asked: plain strings, never a platform object."""

    platform: str = "cli"
    user_id: str = "local"
    display_name: str = ""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the answer goes: plain references the delivery side can resolve again, and the
    server it was asked in (who may look at the job later, bot/commands/scope.py)."""

    platform: str = "cli"
    channel_id: str = ""
    thread_id: str = ""
    message_ref: str = ""
    server_id: str = ""  # Discord guild id, Slack team id; "" for a DM, the terminal or a job from before schema v3


@dataclass(frozen=True, slots=True)
class JobRequest:
    """What a user asked for, before validation. ``None`` means "use the default"."""

    prompt: str
    model: str | None = None  # None or "auto": the engine chooses
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    requester: Requester = field(default_factory=Requester)
    origin: Origin = field(default_factory=Origin)
    nsfw_allowed: bool = False  # the channel allows adult images (Discord age-restricted, [safety] allow-list)


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """A validated, normalised request: exactly what the pipeline will be asked to do."""

    prompt: str
    negative_prompt: str
    model_id: str
    steps: int
    guidance: float
    width: int
    height: int
    seed: int
    route_reason: str = ""


@dataclass(frozen=True, slots=True)
class Timings:
    queue_wait_s: float = 0.0
    load_s: float = 0.0
    generate_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True, slots=True)
class JobResult:
    """A finished image: PNG bytes with the parameters embedded, plus what produced it."""

    job_id: str
    png: bytes
    params: GenerationParams
    width: int
    height: int
    timings: Timings
    image_path: str | None = None  # where the history keeps the PNG (None without one)
    notice: str = ""  # the safety loop changed the prompt or the model: say so beside the image


# Events: past tense, one job each, delivered in order on the asyncio loop.


@dataclass(frozen=True, slots=True)
class JobQueued:
    job_id: str
    position: int  # 1 = next to run
    params: GenerationParams
    resumed: bool = False  # taken back from the history after a restart
    eta_s: float | None = None  # seconds until the image is expected; None until timings are recorded


@dataclass(frozen=True, slots=True)
class JobStarted:
    job_id: str
    model_id: str


@dataclass(frozen=True, slots=True)
class JobProgressed:
    job_id: str
    step: int  # 1-based
    total: int


@dataclass(frozen=True, slots=True)
class JobPreviewed:
    """A small picture of the image so far (engine/pipelines/previews.py), throttled by ``[previews]``.
    An empty ``image`` withdraws the preview shown: the safety loop rejected that attempt."""

    job_id: str
    step: int  # 1-based; 0 with an empty image
    total: int
    image: bytes  # JPEG or WebP, at most ``[previews] max_side`` pixels on the long side
    mime: str  # "image/jpeg" or "image/webp"; "" with an empty image
    width: int = 0
    height: int = 0

    @property
    def withdrawn(self) -> bool:
        return not self.image


@dataclass(frozen=True, slots=True)
class JobFinished:
    job_id: str
    result: JobResult


@dataclass(frozen=True, slots=True)
class JobFailed:
    job_id: str
    error_kind: str  # the EngineError class name; "EngineStopped": kept, runs after a restart
    message: str  # safe to show a user


@dataclass(frozen=True, slots=True)
class JobCancelled:
    job_id: str
    while_running: bool


JobEvent = JobQueued | JobStarted | JobProgressed | JobPreviewed | JobFinished | JobFailed | JobCancelled
FINAL_EVENTS = (JobFinished, JobFailed, JobCancelled)


@dataclass(frozen=True, slots=True)
class QueuePlace:
    job_id: str
    position: int  # 1 = next to run
    eta_s: float | None  # seconds until the image is expected; None where nothing recorded is like it


@dataclass(frozen=True, slots=True)
class QueueMoved:
    """The queue or what is loaded changed: every waiting job's place and ETA, from one plan.

    Not a job's event: subscribers (``Engine.subscribe``) get it, job handles do not. One is
    published per change (several changes in one loop iteration make one event), so a listener
    never has to ask the engine again for each job it shows."""

    places: tuple[QueuePlace, ...]  # in planned order
    running_id: str | None = None


EngineEvent = JobEvent | QueueMoved
