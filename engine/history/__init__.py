"""The job history: one SQLite file (jobs, attempts, deliveries) plus the PNG files; the only SQL.

    schema.py      the DDL, its forward migrations (``MIGRATIONS``) and the SQL text the store runs
    database.py    the connection: open (checks, pragmas, migrations), close, cancel-safe ``_write``
    store.py       ``HistoryStore``: a job's life (queued, attempts, finished), reads, pruning
    deliveries.py  ``Deliveries``: which chat message shows which job (``engine.deliveries``)
    feedback.py    ``RoutingFeedback``: users' model choices, learned router examples, learns (``engine.feedback``)
    dedup.py       ``SeenKeys``: platform ids already handled, with a TTL (``engine.dedup``)
    records.py     plain data returned (``StoredJob``, ``AttemptRecord``, ``DeliveryRecord``), job ids
    stats.py       ``ModelStats``, ``WorkerStats``: the per-model and per-worker queries
    gallery.py     ``Gallery``: the web gallery's pages, filters and full-text search (FTS5)
    timeline.py    ``HistoryTimeline``: per-day series for charts, all-time totals for metrics
    files.py       image paths, ``write_atomic`` (the engine's one atomic writer), pruning files
    errors.py      ``HistoryError`` and its family, ``StorageError``
    lock.py        ``DataFolderLock``: one process runs the jobs of a data folder
    presets.py     ``PresetStore``: model presets from /sweep, contact sheets and their picks
"""

from engine.history.dedup import SeenKeys
from engine.history.deliveries import Deliveries
from engine.history.feedback import FEEDBACK_KINDS, FeedbackRecord, LearnedExample, LearnRun, RoutingFeedback, SwitchAway
from engine.history.errors import DuplicateJobError, HistoryError, JobFinishedError, StorageError, UnknownJobError
from engine.history.files import IMAGES_DIR, thumbnail_path, write_atomic
from engine.history.gallery import OUTCOMES, Facets, Gallery, GalleryPage, GalleryQuery
from engine.history.lock import LOCK_NAME, DataFolderLock
from engine.history.presets import SHEET_KINDS, Preset, PresetStore, SheetRecord
from engine.history.records import ID_ALPHABET, ID_LENGTH, AttemptRecord, DeliveryRecord, StoredJob, new_job_id
from engine.history.schema import (
    APPLICATION_ID,
    ATTEMPT_OUTCOMES,
    DELIVERY_KINDS,
    MIGRATIONS,
    SCHEMA_VERSION,
)
from engine.history.stats import ModelStats, WorkerStats
from engine.history.store import HistoryStore
from engine.history.timeline import TIME_BUCKETS, DayRow, Histogram, HistoryTimeline, Timeline, Totals

__all__ = [
    "APPLICATION_ID", "ATTEMPT_OUTCOMES", "AttemptRecord", "DELIVERY_KINDS", "DataFolderLock", "Deliveries",
    "DeliveryRecord", "DuplicateJobError", "HistoryError", "HistoryStore", "ID_ALPHABET", "ID_LENGTH", "IMAGES_DIR",
    "JobFinishedError", "LOCK_NAME", "MIGRATIONS", "ModelStats", "SCHEMA_VERSION", "WorkerStats", "SeenKeys", "StorageError", "StoredJob",
    "UnknownJobError", "new_job_id", "write_atomic",
    "Facets", "Gallery", "GalleryPage", "GalleryQuery", "OUTCOMES", "thumbnail_path",
    "Preset", "PresetStore", "SHEET_KINDS", "SheetRecord",
    "FEEDBACK_KINDS", "FeedbackRecord", "LearnRun", "LearnedExample", "RoutingFeedback", "SwitchAway",
    "DayRow", "Histogram", "HistoryTimeline", "TIME_BUCKETS", "Timeline", "Totals",
]
