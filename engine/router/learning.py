"""The rule that turns routing feedback into confirmed examples, and the capped example set (pure).

The rule (docs/ROUTER.md, "Learning from the community"):
1. One voice per user and prompt: of a user's rows for a prompt (compared lower-cased, spaces
   collapsed), only the latest counts, so A -> B -> C by one user is one vote for C. A user whose
   latest row is an explicit --model but who named several models for the prompt (trying them
   out, a /compare's renders) has no voice until they switch or pick.
2. Weights: a model switch by reaction and a /compare pick count 1.0; an explicit --model 0.5
   (the user may just want that model, not think the router wrong).
3. A prompt is confirmed for model M when M's weight is at least ``min_weight`` (1.0: one switch
   or pick, or two explicit choices) and more than half the prompt's weight (no split verdicts).
4. The example set keeps at most ``cap_per_model`` learned examples per model, oldest out first;
   a prompt appears once (a newer verdict relabels it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from engine.history.feedback import FeedbackRecord, LearnedExample

KIND_WEIGHTS: Mapping[str, float] = {"switch": 1.0, "compare_pick": 1.0, "explicit": 0.5}
MIN_WEIGHT = 1.0
CAP_PER_MODEL = 100


def prompt_key(prompt: str) -> str:
    return " ".join(prompt.lower().split())


@dataclass(frozen=True, slots=True)
class Confirmed:
    prompt: str  # prompt_key
    model_id: str
    weight: float


def confirmed_examples(rows: Iterable[FeedbackRecord], model_ids: Iterable[str], *,
                       weights: Mapping[str, float] = KIND_WEIGHTS, min_weight: float = MIN_WEIGHT) -> list[Confirmed]:
    """The prompts the feedback confirms, in order of their last row."""
    known = set(model_ids)
    latest: dict[tuple[str, str], FeedbackRecord] = {}
    asked: dict[tuple[str, str], set[str]] = {}  # the models a user named with --model for a prompt
    for row in sorted(rows, key=lambda r: r.created_at):  # 1. a user's latest row per prompt
        if row.chosen_model in known:
            voice = (prompt_key(row.prompt), row.user_key or f"job:{row.job_id}")
            latest[voice] = row
            if row.kind == "explicit":
                asked.setdefault(voice, set()).add(row.chosen_model)
    totals: dict[str, dict[str, float]] = {}
    for voice, row in latest.items():  # 2. weights per prompt and model
        if row.kind == "explicit" and len(asked[voice]) > 1:  # trying several models (a /compare's renders) is no choice
            continue
        key = voice[0]
        per_model = totals.setdefault(key, {})
        per_model[row.chosen_model] = per_model.get(row.chosen_model, 0.0) + weights.get(row.kind, 0.0)
    confirmed = []
    for key, per_model in totals.items():  # 3. a clear verdict
        model = max(per_model, key=per_model.__getitem__)
        if per_model[model] >= min_weight and per_model[model] > sum(per_model.values()) / 2:
            confirmed.append(Confirmed(key, model, per_model[model]))
    return confirmed


def merge_examples(existing: Sequence[LearnedExample], new: Iterable[Confirmed], *, now: float,
                   cap_per_model: int = CAP_PER_MODEL) -> list[LearnedExample]:
    """``existing`` with ``new`` added or relabelled, at most ``cap_per_model`` per model (newest kept)."""
    by_prompt = {e.prompt: e for e in existing}
    for c in new:
        old = by_prompt.get(c.prompt)
        added_at = old.added_at if old is not None and old.model_id == c.model_id else now
        by_prompt[c.prompt] = LearnedExample(c.prompt, c.model_id, c.weight, added_at)
    kept: list[LearnedExample] = []
    for model in dict.fromkeys(e.model_id for e in by_prompt.values()):
        mine = sorted((e for e in by_prompt.values() if e.model_id == model), key=lambda e: (e.added_at, e.prompt))
        kept += mine[-cap_per_model:] if cap_per_model > 0 else []
    return sorted(kept, key=lambda e: (e.added_at, e.prompt))


def learned_by_model(configured: Mapping[str, Sequence[str]], learned: Iterable[LearnedExample]) -> dict[str, tuple[str, ...]]:
    """The learned examples per configured model, those equal to a configured example left out."""
    seen = {prompt_key(t) for texts in configured.values() for t in texts}
    by_model: dict[str, list[str]] = {}
    for e in learned:
        if e.model_id in configured and e.prompt not in seen:
            by_model.setdefault(e.model_id, []).append(e.prompt)
    return {m: tuple(texts) for m, texts in by_model.items()}
