"""``router learn``: the community's confirmed examples into the embedding stage, checked before it is kept.

The procedure, as numbered phases (docs/ROUTER.md, "Learning from the community"):
1. Read the feedback, the examples learned so far and the last applied thresholds.
2. Confirm prompts (learning.py's rule); keep those an example can change: not decided by the
   rules stage, and routed elsewhere today (or already learned: refreshed).
3. Merge them into the learned set: de-duplicated, capped per model, oldest out first.
4. Refit the thresholds by leave-one-out over configured + learned examples (bench/router_fit.py's procedure).
5. Score the frozen check set with the rules and embedding stages, before and after.
6. Apply (store the examples, the thresholds and the run) only when neither strict nor lenient
   accuracy drops; otherwise log the run as refused and keep everything as it was.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.config import Config, RouterConfig
from engine.history.feedback import LearnedExample, LearnRun, RoutingFeedback
from engine.router.cascade import CascadeRouter, EncoderLoader
from engine.router.evaluate import Example, evaluate
from engine.router.learning import CAP_PER_MODEL, KIND_WEIGHTS, MIN_WEIGHT, confirmed_examples, learned_by_model, merge_examples
from engine.router.rules import RuleBook

CHECK_STAGES = ("rules", "embeddings")  # the LLM stage does not read the examples, and is slow off the GPU


@dataclass(frozen=True, slots=True)
class LearnOptions:
    cap_per_model: int = CAP_PER_MODEL
    weights: Mapping[str, float] = field(default_factory=lambda: dict(KIND_WEIGHTS))
    min_weight: float = MIN_WEIGHT
    precision: float = 0.9  # of the refitted thresholds
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class LearnOutcome:
    confirmed: int  # prompts the feedback confirms
    added: list[LearnedExample]  # new or relabelled examples
    removed: list[LearnedExample]  # pushed out by the cap, or relabelled
    examples: list[LearnedExample]  # the learned set after this learn
    thresholds_before: dict[str, float]
    thresholds_after: dict[str, float]
    check_before: dict[str, Any]  # evaluate()'s report
    check_after: dict[str, Any]
    applied: bool
    refused: str | None  # why not applied; None when applied, a dry run, or nothing to learn

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def learned_router(config: Config, settings: RouterConfig, learned: Sequence[LearnedExample],
                   thresholds: Mapping[str, float], encoder_loader: EncoderLoader | None = None) -> CascadeRouter:
    """A router on ``settings`` with the learned examples and thresholds (what the engine's router starts with)."""
    with_thresholds = settings.model_copy(update={"thresholds": {**settings.thresholds, **thresholds}})
    return CascadeRouter(config, with_thresholds, encoder_loader=encoder_loader,
                         learned=learned_by_model(settings.examples, learned))


async def learned_state(feedback: RoutingFeedback) -> tuple[list[LearnedExample], dict[str, float]]:
    """The learned examples and the last applied learn's thresholds (what the engine's router starts with)."""
    last = await feedback.last_learn()
    return await feedback.learned(), dict(last.thresholds) if last else {}


async def learned_for_router(feedback: RoutingFeedback, settings: RouterConfig) -> tuple[dict[str, tuple[str, ...]], dict[str, float]]:
    """``CascadeRouter.use_learned``'s arguments: the learned examples per model, the applied thresholds."""
    learned, thresholds = await learned_state(feedback)
    return learned_by_model(settings.examples, learned), thresholds


async def learn(config: Config, feedback: RoutingFeedback, check: Sequence[Example], *,
                options: LearnOptions = LearnOptions(), encoder_loader: EncoderLoader | None = None,
                now: float | None = None) -> LearnOutcome:
    now = time.time() if now is None else now
    base = config.router.model_copy(update={"stages": CHECK_STAGES})
    # 1. what is there
    rows = await feedback.rows()
    learned, thresholds = await learned_state(feedback)
    async with learned_router(config, base, learned, thresholds, encoder_loader) as router:
        # 2. confirmed prompts an example can change
        confirmed = confirmed_examples(rows, config.models, weights=options.weights, min_weight=options.min_weight)
        known = {e.prompt for e in learned}
        rules = RuleBook(base.rules)
        fresh = [c for c in confirmed if rules.match(c.prompt) is None
                 and (c.prompt in known or (await router.route(c.prompt)).model_id != c.model_id)]
        # 3. the new learned set
        merged = merge_examples(learned, fresh, now=now, cap_per_model=options.cap_per_model)
        added = [e for e in merged if e not in learned]
        removed = [e for e in learned if e not in merged]
        check_before = await evaluate(router, check, list(config.models)) if added or removed else {}
        fitted_before = dict(router.settings.thresholds)
    if not (added or removed):
        return LearnOutcome(len(confirmed), [], [], learned, fitted_before, fitted_before, {}, {}, False, None)
    # 4. refit, 5. check after
    async with learned_router(config, base, merged, {}, encoder_loader) as after:
        fitted = await after.refit_thresholds(options.precision)
        check_after = await evaluate(after, check, list(config.models))
    # 6. keep it only if the check set did not get worse
    refused = _worse(check_before, check_after)
    applied = refused is None and not options.dry_run
    if not options.dry_run:
        await feedback.save_learn(LearnRun(now, applied, check_before["strict_accuracy"], check_after["strict_accuracy"],
                                           len(added), len(removed), fitted), merged)
    return LearnOutcome(len(confirmed), added, removed, merged if applied or options.dry_run else learned,
                        fitted_before, fitted, check_before, check_after, applied, refused)


def _worse(before: Mapping[str, Any], after: Mapping[str, Any]) -> str | None:
    for key in ("strict_accuracy", "lenient_accuracy"):
        if after[key] < before[key]:
            return (f"the check set's {key.replace('_', ' ')} would fall from {before[key]:.1%} to {after[key]:.1%}; "
                    "the change was not applied")
    return None
