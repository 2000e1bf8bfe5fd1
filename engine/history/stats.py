"""Per-model statistics over the history: the two queries and their aggregation (``/stats``)."""

from __future__ import annotations

import sqlite3
import statistics
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelStats:
    model_id: str
    count: int  # jobs whose final model is this one, any status
    succeeded: int
    failed: int
    mean_generate_s: float | None  # over succeeded jobs; None when there are none
    p95_generate_s: float | None  # linear interpolation between closest ranks
    nsfw_flagged: int  # attempts on this model whose 'nsfw' verdict was flagged
    black_flagged: int  # attempts on this model whose 'black' verdict was flagged
    fixed_by_rewrite: int  # succeeded jobs with >= 1 attempt that carried a retry_reason
    fell_back: int = 0  # attempts on this model after which the safety loop moved to the fallback model
    refused: int = 0  # jobs refused by the safety loop (unsafe prompt or image, or black every time)


JOB_COUNTS = """
SELECT model_used                  AS model_id,
       count(*)                    AS count,
       sum(status = 'succeeded')   AS succeeded,
       sum(status = 'failed')      AS failed,
       sum(status = 'succeeded' AND EXISTS (
               SELECT 1 FROM attempts
                WHERE attempts.job_id = jobs.id AND attempts.retry_reason IS NOT NULL
           ))                      AS fixed,
       sum(status = 'failed' AND error_kind IN ('UnsafeContentError', 'BlankImageError')) AS refused
  FROM jobs
 GROUP BY model_used
"""

ATTEMPT_FLAGS = """
SELECT model_id,
       sum(coalesce(json_extract(verdicts, '$.nsfw.flagged'),  0) = 1) AS nsfw,
       sum(coalesce(json_extract(verdicts, '$.black.flagged'), 0) = 1) AS black,
       sum(coalesce(retry_reason, '') LIKE '%fell back%')               AS fell_back
  FROM attempts
 WHERE verdicts IS NOT NULL
 GROUP BY model_id
"""

# The share of recent jobs per model, any status (the placement planner's traffic): the model a
# job ran on, newest ``:last`` jobs in arrival order (seq).
RECENT_MODEL_COUNTS = """
SELECT model_used AS model_id, count(*) AS count
  FROM (SELECT model_used FROM jobs ORDER BY seq DESC LIMIT :last)
 GROUP BY model_used
"""

GENERATE_TIMES = "SELECT model_used, generate_s FROM jobs WHERE status = 'succeeded' ORDER BY generate_s"


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """One GPU worker's attempts (``/stats`` with several workers): what it ran and how it ended."""

    worker: str
    attempts: int
    succeeded: int
    interrupted: int  # the worker died or hung under them (or the bot stopped)
    mean_attempt_s: float | None  # start to end of its finished attempts


WORKER_ATTEMPTS = """
SELECT worker, count(*) AS attempts,
       sum(outcome = 'succeeded') AS succeeded, sum(outcome = 'interrupted') AS interrupted,
       avg(CASE WHEN finished_at IS NOT NULL THEN finished_at - started_at END) AS mean_s
FROM attempts WHERE worker != '' GROUP BY worker ORDER BY worker
"""


def workers(rows: Iterable[sqlite3.Row]) -> list[WorkerStats]:
    return [WorkerStats(r["worker"], r["attempts"], r["succeeded"] or 0, r["interrupted"] or 0, r["mean_s"])
            for r in rows]


def aggregate(counts_rows: Iterable[sqlite3.Row], flags_rows: Iterable[sqlite3.Row],
              times_rows: Iterable[sqlite3.Row]) -> list[ModelStats]:
    """Per model, sorted by id, from the rows of ``JOB_COUNTS``, ``ATTEMPT_FLAGS`` and ``GENERATE_TIMES``."""
    counts = {r["model_id"]: r for r in counts_rows}
    flags = {r["model_id"]: r for r in flags_rows}
    times: dict[str, list[float]] = {}
    for r in times_rows:
        times.setdefault(r["model_used"], []).append(r["generate_s"])
    stats = []
    for model_id in sorted(counts.keys() | flags.keys()):
        c, f, t = counts.get(model_id), flags.get(model_id), times.get(model_id, [])
        stats.append(ModelStats(
            model_id=model_id, count=c["count"] if c else 0, succeeded=c["succeeded"] if c else 0,
            failed=c["failed"] if c else 0, mean_generate_s=sum(t) / len(t) if t else None,
            p95_generate_s=_p95(t), nsfw_flagged=f["nsfw"] if f else 0,
            black_flagged=f["black"] if f else 0, fixed_by_rewrite=c["fixed"] if c else 0,
            fell_back=f["fell_back"] if f else 0, refused=c["refused"] if c else 0))
    return stats


def shares(rows: Iterable[sqlite3.Row], min_jobs: int = 1) -> dict[str, float]:
    """model id -> share of the jobs counted by ``RECENT_MODEL_COUNTS`` (empty: under ``min_jobs`` jobs)."""
    counts = {r["model_id"]: r["count"] for r in rows}
    total = sum(counts.values())
    return {mid: n / total for mid, n in sorted(counts.items())} if total and total >= min_jobs else {}


def _p95(values: list[float]) -> float | None:
    """Linear interpolation between closest ranks (``method="inclusive"``); needs two values."""
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=20, method="inclusive")[-1]
