"""PromptPics engine: the public surface the bot may use. Importing it loads no torch."""

from engine.config import (
    HIDDEN,
    STAGES as ROUTER_STAGES,
    Config,
    ModelSpec,
    SafetyConfig,
    SettingsModel,
    Text,
    broken,
    load_config,
    validate_table,
    with_tiny_models,
)
from engine.core import (
    MAX_SEED,
    Engine,
    JobHandle,
    QueueEntry,
    WorkerState,
    check_request,
    describe_models,
    missing_weights,
    source_state,
)
from engine.cluster import WorkerInfo, WorkerLostError
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
    Facets,
    Gallery,
    GalleryPage,
    GalleryQuery,
    HistoryError,
    HistoryStore,
    HistoryTimeline,
    Preset,
    PresetStore,
    SheetRecord,
    Histogram,
    LearnedExample,
    RoutingFeedback,
    SwitchAway,
    ModelStats,
    WorkerStats,
    SeenKeys,
    StorageError,
    StoredJob,
    TIME_BUCKETS,
    Timeline,
    Totals,
    thumbnail_path,
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
from engine.probes import TorchFacts, embedding_model_state, nudenet_state, torch_facts_blocking
from engine.placement import Plan, plan_for_config
from engine.placement.apply import explicit_keys as explicit_placement_keys
from engine.placement.start import measure_card_blocking
from engine.placement.warm import Warmed, warm_quantised_cache_blocking
from engine.placement.traffic import RECENT_JOBS, describe_shares, parse_shares
from engine.router import CascadeRouter
from engine.router import evaluate as evaluate_router
from engine.router import format_report as format_router_report
from engine.router import read_examples as read_router_examples
from engine.router.learn import LearnOptions, LearnOutcome, learned_for_router
from engine.pipelines.quant_cache import cacheable_parts, cached_on_disk
from engine.router.learn import learn as learn_router
from engine.safety import BlankImageError, ImageRefusedError, UnsafeContentError
from engine.tiny import ensure_tiny_models
from engine.weights import (
    DownloadInterruptedError,
    DownloadPlan,
    Hub,
    WeightsError,
    WeightsState,
    WeightsTarget,
    check_disk,
    fetch,
    free_bytes,
    human_bytes,
    llm_targets,
    plan_download,
    weight_targets,
    weights_state,
)

__all__ = [
    "Config", "ConfigError", "Engine", "EngineError", "GenerationError", "GenerationParams", "JobCancelled",
    "JobCancelledError", "JobEvent", "JobFailed", "JobFinished", "JobHandle", "JobPreviewed", "JobProgressed", "JobQueued",
    "JobRequest", "JobResult", "JobStarted", "JobStatus", "ModelLoadError", "ModelSpec", "Origin",
    "OutOfMemoryError", "QueueEntry", "QueueFullError", "RequestError", "Requester", "Timings", "load_config",
    "with_tiny_models", "BlankImageError", "ImageRefusedError", "SafetyConfig", "UnsafeContentError",
    "DataFolderBusyError", "EngineClosedError", "EngineEvent", "QueueMoved", "QueuePlace",
    # config's building blocks (bot/settings.py reads its own tables with them)
    "HIDDEN", "SettingsModel", "Text", "broken", "validate_table",
    # the history: the CLI and the adapters read it; deliveries are the bot's message bookkeeping
    "AttemptRecord", "DataFolderLock", "Deliveries", "DeliveryRecord", "HistoryError", "HistoryStore", "ModelStats", "WorkerStats", "WorkerState", "WorkerInfo", "WorkerLostError",
    "SeenKeys", "StorageError", "StoredJob", "write_atomic",
    # the web gallery and dashboard (web/): pages and search, charts' series, metrics' totals, thumbnails
    "Facets", "Gallery", "GalleryPage", "GalleryQuery", "Histogram", "HistoryTimeline", "TIME_BUCKETS", "Timeline",
    "Totals", "thumbnail_path",
    # /compare and /sweep: contact sheets, their picks, model presets over config.toml
    "Preset", "PresetStore", "SheetRecord",
    # what the bot shows or checks: the model table, the seed bound, the tiny profile's models
    "describe_models", "MAX_SEED", "ensure_tiny_models",
    # what a front end checks before any engine starts: the request, the weights on this machine
    "check_request", "missing_weights", "source_state", "cacheable_parts", "cached_on_disk",
    # the router on its own: `promptpics route` and `promptpics eval-router`
    "CascadeRouter", "ROUTER_STAGES", "evaluate_router", "format_router_report", "read_router_examples",
    # routing feedback and `promptpics router learn` (docs/ROUTER.md, "Learning from the community")
    "LearnOptions", "LearnOutcome", "LearnedExample", "RoutingFeedback", "SwitchAway", "learn_router",
    "learned_for_router",
    # model weights: `promptpics download` and `promptpics doctor`
    "DownloadInterruptedError", "DownloadPlan", "Hub", "WeightsError", "WeightsState", "WeightsTarget", "check_disk", "fetch", "free_bytes",
    "human_bytes", "llm_targets", "plan_download", "weight_targets", "weights_state",
    # what this machine offers: `promptpics doctor`
    "TorchFacts", "embedding_model_state", "nudenet_state", "torch_facts_blocking",
    # `promptpics plan`: the placement planner for a card
    "Plan", "RECENT_JOBS", "describe_shares", "explicit_placement_keys", "measure_card_blocking", "parse_shares",
    "plan_for_config", "Warmed", "warm_quantised_cache_blocking",
]
