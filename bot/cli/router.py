"""The router's subcommands of ``promptpics``: ``route`` (one prompt: which model, and why),
``eval-router`` (a labelled JSONL file: accuracy, recall, confusion, latency) and ``router learn`` (learn.py).

Each handler is ``async def cmd_x(config, args) -> int``. The engine's router modules load
torch and transformers lazily, inside the router's own threads; nothing here imports them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from bot.cli.learn import add_learn_command, use_learned
from bot.cli.preflight import hub_sources, settle_offline
from bot.cli.profile import prepare
from engine import (
    ROUTER_STAGES,
    CascadeRouter,
    Config,
    ConfigError,
    evaluate_router,
    format_router_report,
    read_router_examples,
)

# `route` is one-shot: its first LLM call includes loading the LLM (seconds to minutes), which
# the bot does once at start-up. Allow for that instead of the bot's per-prompt timeout.
ONE_SHOT_LLM_TIMEOUT_S = 300.0
STAGE_HELP = "comma-separated stages to run, in order, from rules,embeddings,llm (default: config.toml [router] stages)"


def add_router_commands(subparsers: Any) -> None:
    route = subparsers.add_parser("route", help="which model the router picks for a prompt, and why")
    route.add_argument("prompt")
    route.add_argument("--json", action="store_true", help="one JSON object")
    route.add_argument("--stages", help=STAGE_HELP)
    route.set_defaults(run=cmd_route)

    evaluate = subparsers.add_parser("eval-router", help="measure the router on a labelled JSONL file",
                                     description="Each line: {\"prompt\", \"expected\", \"acceptable\"} "
                                                 "(see ../shared/eval/README.md). Prints strict and lenient "
                                                 "accuracy, per-model precision and recall, a confusion matrix "
                                                 "and latency p50/p95 per stage.")
    evaluate.add_argument("file", type=Path)
    evaluate.add_argument("--json", action="store_true", help="one JSON object")
    evaluate.add_argument("--stages", help=STAGE_HELP)
    evaluate.set_defaults(run=cmd_eval_router)
    add_learn_command(subparsers)  # `router learn`


def _with_stages(config: Config, stages: str | None) -> Config:
    if not stages:
        return config
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    if not chosen or any(s not in ROUTER_STAGES for s in chosen):
        raise ConfigError("--stages", stages, f"it must list stages from {', '.join(ROUTER_STAGES)}, comma-separated")
    ordered = tuple(s for s in ROUTER_STAGES if s in chosen)  # they always run in this order
    return config.model_copy(update={"router": config.router.model_copy(update={"stages": ordered})})


def router_sources(config: Config) -> list[str]:
    """What the router's stages load: the embedding model, the router LLM."""
    return hub_sources(config, (), llms=False) + ([config.router_llm_id] if "llm" in config.router.stages else [])


async def cmd_route(config: Config, args: argparse.Namespace) -> int:
    config = _with_stages(await asyncio.to_thread(prepare, config), args.stages)
    settle_offline(router_sources(config))  # offline: the LLM stage says so at once, no hub retries
    timeout = max(config.router.llm_timeout_s, ONE_SHOT_LLM_TIMEOUT_S)
    config = config.model_copy(update={"router": config.router.model_copy(update={"llm_timeout_s": timeout})})
    async with CascadeRouter(config) as router:
        await use_learned(config, router)  # as the bot routes: with what `router learn` applied
        started = time.perf_counter()
        decision = await router.route(args.prompt)
        total_ms = (time.perf_counter() - started) * 1000
        off = router.stages_off
    model = config.model(decision.model_id)
    if args.json:
        print(json.dumps({
            "model": decision.model_id, "display_name": model.display_name, "reason": decision.reason,
            "confidence": decision.confidence, "stage": decision.stage, "scores": dict(decision.scores),
            "timings_ms": {k: round(v, 3) for k, v in decision.timings_ms.items()}, "total_ms": round(total_ms, 3),
            "stages_off": off,
        }, ensure_ascii=False))
        return 0
    print(f"{model.emoji} {decision.model_id} ({model.display_name})")
    print(f"   reason: {decision.reason}")
    print(f"   decided by: {decision.stage}, confidence {decision.confidence:.2f}")
    if decision.scores:
        print("   scores: " + ", ".join(f"{m} {p:.2f}" for m, p in sorted(decision.scores.items(), key=lambda kv: -kv[1])))
    # The first call includes loading the models; `eval-router` shows warm latency.
    timings = ", ".join(f"{stage} {ms:.1f} ms" for stage, ms in decision.timings_ms.items())
    print(f"   time: {timings or 'none'} (first call: includes loading)")
    for stage, why in off.items():
        print(f"   {stage} stage off: {why}", file=sys.stderr)
    return 0


async def cmd_eval_router(config: Config, args: argparse.Namespace) -> int:
    config = _with_stages(await asyncio.to_thread(prepare, config), args.stages)
    settle_offline(router_sources(config))
    model_ids = list(config.models)
    try:
        examples = await asyncio.to_thread(read_router_examples, args.file, model_ids)
    except OSError as exc:
        print(f"promptpics: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    if not examples:
        print(f"promptpics: {args.file} holds no prompts", file=sys.stderr)
        return 2
    async with CascadeRouter(config) as router:
        await use_learned(config, router)
        await router.warm_up()  # loading is not routing: keep it out of the latency figures
        report = await evaluate_router(router, examples, model_ids)
        report["stages"] = list(config.router.stages)
        report["stages_off"] = router.stages_off
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print(f"{args.file.name}, stages: {', '.join(config.router.stages)}")
    print(format_router_report(report, model_ids))
    for stage, why in report["stages_off"].items():
        print(f"{stage} stage off: {why}", file=sys.stderr)
    return 0
