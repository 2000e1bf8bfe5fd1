"""``promptpics router learn``: the community's confirmed examples into the router, checked on a frozen set.

What it does is engine.router.learn's (docs/ROUTER.md, "Learning from the community"); this
prints it. The running bot picks an applied learn up at its next start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bot.cli.preflight import hub_sources, settle_offline
from bot.cli.profile import prepare
from engine import (
    CascadeRouter,
    Config,
    HistoryError,
    HistoryStore,
    LearnOptions,
    LearnOutcome,
    RoutingFeedback,
    learn_router,
    learned_for_router,
    read_router_examples,
)

# The frozen check set: the repository's own held-out prompts (never the dev set, whose figures stay honest).
DEFAULT_CHECK = Path(__file__).resolve().parents[2] / "bench" / "router_heldout.jsonl"


def add_learn_command(subparsers: Any) -> None:
    router = subparsers.add_parser("router", help="the router's upkeep: learn from the community's model choices")
    commands = router.add_subparsers(dest="router_command", required=True)
    learn = commands.add_parser(
        "learn", help="add confirmed examples from routing feedback; refused if the check set gets worse",
        description="Model switches by reaction and /compare picks (weight 1) and explicit --model choices "
                    "(weight 0.5) confirm a prompt for a model; confirmed prompts the router sends elsewhere "
                    "become examples of the embedding stage, the thresholds are refitted, and the change is "
                    "kept only if the check set's accuracy does not fall.")
    learn.add_argument("--dry-run", action="store_true", help="show what would change; change nothing")
    learn.add_argument("--json", action="store_true", help="one JSON object")
    learn.add_argument("--check", type=Path, default=DEFAULT_CHECK,
                       help=f"the frozen check set, a labelled JSONL file (default: {DEFAULT_CHECK.name})")
    learn.add_argument("--cap", type=int, default=LearnOptions().cap_per_model, help="learned examples kept per model")
    learn.set_defaults(run=cmd_router_learn)


async def cmd_router_learn(config: Config, args: argparse.Namespace) -> int:
    config = await asyncio.to_thread(prepare, config)
    settle_offline(hub_sources(config, (), llms=False))
    try:
        check = await asyncio.to_thread(read_router_examples, args.check, list(config.models))
    except OSError as exc:
        print(f"promptpics: cannot read the check set {args.check}: {exc.strerror}", file=sys.stderr)
        return 2
    options = LearnOptions(cap_per_model=max(0, args.cap), dry_run=args.dry_run)
    async with HistoryStore.open(config.data_dir, busy_timeout_s=config.history.busy_timeout_s) as store:
        outcome = await learn_router(config, RoutingFeedback(store), check, options=options)
    if args.json:
        print(json.dumps(outcome_json(outcome, args.dry_run), ensure_ascii=False))
    else:
        print("\n".join(outcome_lines(outcome, args.dry_run)))
    return 1 if outcome.refused else 0


async def use_learned(config: Config, router: CascadeRouter) -> int:
    """Give a stand-alone router (`route`, `eval-router`) what `router learn` applied, as the bot's
    router has it; the history is only read. Returns how many learned examples it got."""
    if not (config.data_dir / "promptpics.sqlite3").is_file():
        return 0
    try:
        async with HistoryStore.open(config.data_dir, busy_timeout_s=config.history.busy_timeout_s, read_only=True) as store:
            learned, thresholds = await learned_for_router(RoutingFeedback(store), router.settings)
    except HistoryError:  # an older history (no learn yet) or an unreadable one: the configured router
        return 0
    if learned or thresholds:
        router.use_learned(learned, thresholds)
    return sum(len(texts) for texts in learned.values())


def outcome_json(o: LearnOutcome, dry_run: bool) -> dict[str, Any]:
    return {
        "dry_run": dry_run, "applied": o.applied, "refused": o.refused, "confirmed": o.confirmed,
        "added": [{"prompt": e.prompt, "model": e.model_id, "weight": e.weight} for e in o.added],
        "removed": [{"prompt": e.prompt, "model": e.model_id} for e in o.removed],
        "learned": len(o.examples), "thresholds": {"before": o.thresholds_before, "after": o.thresholds_after},
        "check": {"before": _accuracies(o.check_before), "after": _accuracies(o.check_after)},
    }


def _accuracies(report: dict[str, Any]) -> dict[str, Any]:
    return {k: report[k] for k in ("n", "strict_accuracy", "lenient_accuracy") if k in report}


def outcome_lines(o: LearnOutcome, dry_run: bool) -> list[str]:
    if not o.changed:
        return [f"{o.confirmed} confirmed prompt(s); nothing new to learn (the router already routes them so, "
                "or the rules decide them)."]
    lines = [f"{o.confirmed} confirmed prompt(s): {len(o.added)} example(s) to add, {len(o.removed)} to drop"]
    lines += [f"  + {e.model_id:<11} {e.prompt}" for e in o.added[:20]]
    lines += [f"  - {e.model_id:<11} {e.prompt}" for e in o.removed[:20]]
    b, a = o.check_before, o.check_after
    lines.append(f"check set ({b['n']} prompts): strict {b['strict_accuracy']:.1%} -> {a['strict_accuracy']:.1%}, "
                 f"lenient {b['lenient_accuracy']:.1%} -> {a['lenient_accuracy']:.1%}")
    changed = {m: (o.thresholds_before.get(m), t) for m, t in o.thresholds_after.items() if o.thresholds_before.get(m) != t}
    lines += [f"threshold {m}: {old} -> {new}" for m, (old, new) in changed.items()]
    if o.refused:
        lines.append(f"REFUSED: {o.refused}.")
    elif dry_run:
        lines.append("dry run: nothing changed (run without --dry-run to apply).")
    else:
        lines.append(f"applied: {len(o.examples)} learned example(s) in use from the bot's next start.")
    return lines
