"""Routing feedback in the history: users' own model choices, the examples learned from them, the learns.

    routing_feedback   one row per (kind, job, user): a model switch by reaction, a /compare pick,
                       an explicit --model (weaker); see docs/ROUTER.md, "Learning from the community"
    learned_examples   the embedding stage's community examples (engine/router/learning.py decides them)
    router_learns      every `promptpics router learn`: check-set accuracy before and after, applied or not

The bot reaches it through ``engine.record_feedback`` / ``engine.record_switch``; it shares the
store's connection and its cancel-safe transactions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engine.history.store import HistoryStore

FEEDBACK_KINDS = ("switch", "compare_pick", "explicit")

INSERT_FEEDBACK = """
INSERT INTO routing_feedback (created_at, kind, prompt, chosen_model, router_pick, from_model, server_id, job_id, user_key)
SELECT :created_at, :kind, :prompt, :chosen_model, :router_pick, :from_model, :server_id, :job_id, :user_key
 WHERE :kind != 'explicit' OR NOT EXISTS (
       -- an explicit --model that repeats the user's own switch or pick (the switch's new job) adds nothing
       SELECT 1 FROM routing_feedback
        WHERE prompt = :prompt AND user_key = :user_key AND chosen_model = :chosen_model AND kind != 'explicit')
    ON CONFLICT (kind, job_id, user_key) DO NOTHING
"""

RESULTS_BY_MODEL = """
SELECT model_used AS model_id, count(*) AS results, coalesce(sum(created_at >= :since), 0) AS results_after
  FROM jobs WHERE status = 'succeeded' GROUP BY model_used
"""

SWITCHED_AWAY = """
SELECT jobs.model_used AS model_id, count(DISTINCT jobs.id) AS switched,
       count(DISTINCT CASE WHEN jobs.created_at >= :since THEN jobs.id END) AS switched_after
  FROM routing_feedback JOIN jobs ON jobs.id = routing_feedback.job_id
 WHERE routing_feedback.kind = 'switch' AND jobs.status = 'succeeded'
 GROUP BY jobs.model_used
"""


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    created_at: float
    kind: str  # one of FEEDBACK_KINDS
    prompt: str
    chosen_model: str
    router_pick: str | None = None  # None: the router was not asked
    from_model: str | None = None  # switch: the model of the result reacted to
    server_id: str = ""
    job_id: str = ""
    user_key: str = ""


@dataclass(frozen=True, slots=True)
class LearnedExample:
    prompt: str  # normalised (learning.prompt_key)
    model_id: str
    weight: float
    added_at: float


@dataclass(frozen=True, slots=True)
class LearnRun:
    at: float
    applied: bool
    check_before: float
    check_after: float
    added: int
    removed: int
    thresholds: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class SwitchAway:
    """Per model: the share of its results someone switched away from (a routing-miss signal),
    overall and before/after the last applied learn (``None`` when there was none)."""

    model_id: str
    results: int
    switched: int
    rate: float
    rate_before: float | None = None
    rate_after: float | None = None


class RoutingFeedback:
    """Feedback, learned examples and learns, on ``store``'s connection."""

    def __init__(self, store: HistoryStore) -> None:
        self._store = store

    async def record(self, kind: str, *, prompt: str, chosen_model: str, router_pick: str | None = None,
                     from_model: str | None = None, server_id: str = "", job_id: str = "", user_key: str = "",
                     created_at: float | None = None) -> bool:
        """Record one choice; False when it was already there (the same kind, job and user) or adds nothing."""
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"kind {kind!r} must be one of {', '.join(FEEDBACK_KINDS)}")
        values = {"created_at": time.time() if created_at is None else created_at, "kind": kind, "prompt": prompt,
                  "chosen_model": chosen_model, "router_pick": router_pick, "from_model": from_model,
                  "server_id": server_id, "job_id": job_id, "user_key": user_key}
        async with self._store._write() as db:
            cursor = await db.execute(INSERT_FEEDBACK, values)
            return cursor.rowcount == 1

    async def rows(self) -> list[FeedbackRecord]:
        """Every feedback row, oldest first."""
        rows = await self._store._rows("SELECT * FROM routing_feedback ORDER BY created_at, id")
        return [FeedbackRecord(r["created_at"], r["kind"], r["prompt"], r["chosen_model"], r["router_pick"],
                               r["from_model"], r["server_id"], r["job_id"], r["user_key"]) for r in rows]

    async def learned(self) -> list[LearnedExample]:
        """The learned examples, oldest first."""
        rows = await self._store._rows("SELECT * FROM learned_examples ORDER BY added_at, prompt")
        return [LearnedExample(r["prompt"], r["model_id"], r["weight"], r["added_at"]) for r in rows]

    async def last_learn(self, *, applied_only: bool = True) -> LearnRun | None:
        rows = await self._store._rows("SELECT * FROM router_learns WHERE applied >= ? ORDER BY id DESC LIMIT 1",
                                       (1 if applied_only else 0,))
        if not rows:
            return None
        r = rows[0]
        return LearnRun(r["at"], bool(r["applied"]), r["check_before"], r["check_after"], r["added"], r["removed"],
                        json.loads(r["thresholds"]))

    async def save_learn(self, run: LearnRun, examples: Sequence[LearnedExample]) -> None:
        """Log the learn; when applied, the learned examples become ``examples`` in the same transaction."""
        async with self._store._write() as db:
            await db.execute(
                "INSERT INTO router_learns (at, applied, check_before, check_after, added, removed, thresholds)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run.at, int(run.applied), run.check_before, run.check_after, run.added, run.removed,
                 json.dumps(dict(run.thresholds), sort_keys=True)))
            if run.applied:
                await db.execute("DELETE FROM learned_examples")
                await db.executemany("INSERT INTO learned_examples (prompt, model_id, weight, added_at) VALUES (?, ?, ?, ?)",
                                     [(e.prompt, e.model_id, e.weight, e.added_at) for e in examples])

    async def switch_away(self) -> list[SwitchAway]:
        """Per model with results, sorted by id; before/after split at the last applied learn."""
        last = await self.last_learn()
        since = last.at if last is not None else float("inf")
        results = {r["model_id"]: r for r in await self._store._rows(RESULTS_BY_MODEL, {"since": since})}
        switched = {r["model_id"]: r for r in await self._store._rows(SWITCHED_AWAY, {"since": since})}
        rates = []
        for model_id in sorted(results):
            n, n_after = results[model_id]["results"], results[model_id]["results_after"]
            s = switched.get(model_id)
            k, k_after = (s["switched"], s["switched_after"]) if s else (0, 0)
            rates.append(SwitchAway(model_id, n, k, round(k / n, 4),
                                    _rate(k - k_after, n - n_after) if last else None,
                                    _rate(k_after, n_after) if last else None))
        return rates


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
