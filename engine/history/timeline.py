"""The history over time, for the dashboard's charts and the Prometheus metrics: jobs per day per
model, generation times, model loads, safety incidents, and the all-time totals behind the
counters and histograms. Read-only; every number comes from the rows, so it survives a restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.history.store import HistoryStore

# seconds; Prometheus histogram upper bounds (+Inf is added by the exporter)
TIME_BUCKETS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
REFUSED_KINDS = ("UnsafeContentError", "BlankImageError")

PER_DAY = """
SELECT date(created_at, 'unixepoch') AS day, model_used,
       count(*)                                     AS jobs,
       sum(load_s > 0)                              AS loads,
       sum(load_s)                                  AS load_s,
       sum(status = 'failed' AND error_kind IN ('UnsafeContentError', 'BlankImageError')) AS refused,
       sum(status = 'succeeded' AND EXISTS (SELECT 1 FROM attempts a
               WHERE a.job_id = jobs.id AND a.retry_reason IS NOT NULL)) AS fixed
  FROM jobs
 WHERE created_at >= :since
 GROUP BY day, model_used
 ORDER BY day
"""

FLAGS_PER_DAY = """
SELECT date(j.created_at, 'unixepoch') AS day,
       sum(coalesce(json_extract(a.verdicts, '$.nsfw.flagged'), 0) = 1
           OR coalesce(json_extract(a.verdicts, '$.black.flagged'), 0) = 1) AS flagged,
       sum(coalesce(a.retry_reason, '') LIKE '%fell back%')                     AS fell_back
  FROM attempts a JOIN jobs j ON j.id = a.job_id
 WHERE j.created_at >= :since AND a.verdicts IS NOT NULL
 GROUP BY day
"""

GENERATE_TIMES = """
SELECT model_used, generate_s FROM jobs
 WHERE status = 'succeeded' AND created_at >= :since
 ORDER BY generate_s
"""

TOTALS = "SELECT model_used, status, count(*) AS n FROM jobs GROUP BY model_used, status"

LOADS = "SELECT model_used, sum(load_s > 0) AS loads, sum(load_s) AS load_s FROM jobs GROUP BY model_used"


@dataclass(frozen=True, slots=True)
class DayRow:
    day: str  # YYYY-MM-DD (UTC)
    model_id: str
    jobs: int
    loads: int
    load_s: float
    refused: int
    fixed: int


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative counts at each upper bound of ``TIME_BUCKETS``, the count and the sum."""

    model_id: str
    cumulative: tuple[int, ...]
    count: int
    total: float


@dataclass(frozen=True, slots=True)
class Timeline:
    """Since a given day: what the dashboard draws."""

    days: list[DayRow]
    flags: dict[str, tuple[int, int]]  # day -> (attempts flagged, attempts after which it fell back)
    generate_times: dict[str, list[float]]  # model -> sorted seconds, succeeded jobs


@dataclass(frozen=True, slots=True)
class Totals:
    """All time: what the Prometheus counters and histograms report."""

    jobs: dict[tuple[str, str], int]  # (model, status) -> jobs
    loads: dict[str, tuple[int, float]]  # model -> (jobs that loaded their model, seconds loading)
    wait: list[Histogram]  # queue wait per model
    generate: list[Histogram]  # generation time per model, succeeded jobs


def histogram_sql(column: str, buckets: Sequence[float]) -> str:
    """One row per model: count, sum and one cumulative count per bucket (bounds as parameters)."""
    if column not in ("queue_wait_s", "generate_s"):  # a column of ours, never user text
        raise ValueError(f"column {column!r} is not a timing column")
    where = "status IN ('succeeded', 'failed', 'cancelled')" if column == "queue_wait_s" else "status = 'succeeded'"
    counts = ", ".join(f"sum({column} <= ?)" for _ in buckets)
    return f"SELECT model_used, count(*), total({column}), {counts} FROM jobs WHERE {where} GROUP BY model_used"


class HistoryTimeline:
    """The timeline and totals on ``store``'s connection."""

    def __init__(self, store: HistoryStore) -> None:
        self._store = store

    async def timeline(self, since: float) -> Timeline:
        days = [DayRow(r["day"], r["model_used"], r["jobs"], r["loads"] or 0, r["load_s"] or 0.0,
                       r["refused"] or 0, r["fixed"] or 0)
                for r in await self._store._rows(PER_DAY, {"since": since})]
        flags = {r["day"]: (r["flagged"] or 0, r["fell_back"] or 0)
                 for r in await self._store._rows(FLAGS_PER_DAY, {"since": since})}
        times: dict[str, list[float]] = {}
        for r in await self._store._rows(GENERATE_TIMES, {"since": since}):
            times.setdefault(r["model_used"], []).append(r["generate_s"])
        return Timeline(days, flags, times)

    async def totals(self) -> Totals:
        jobs = {(r["model_used"], r["status"]): r["n"] for r in await self._store._rows(TOTALS)}
        loads = {r["model_used"]: (r["loads"] or 0, r["load_s"] or 0.0) for r in await self._store._rows(LOADS)}
        return Totals(jobs, loads, await self._histograms("queue_wait_s"), await self._histograms("generate_s"))

    async def _histograms(self, column: str) -> list[Histogram]:
        rows = await self._store._rows(histogram_sql(column, TIME_BUCKETS), TIME_BUCKETS)
        return [Histogram(r[0], tuple(int(v or 0) for v in tuple(r)[3:]), r[1], float(r[2])) for r in rows]

