"""Benchmark: the real router on a labelled prompt file; accuracy, recall, confusion, latency.

    .venv/bin/python bench/router_eval.py                       # ../shared/eval/routing_dev.jsonl
    .venv/bin/python bench/router_eval.py --data bench/router_heldout.jsonl
    .venv/bin/python bench/router_eval.py --stages rules,embeddings,llm --profile tiny

By default only the offline stages run (rules + embeddings): the LLM needs its real weights
to help (the tiny one has random weights). The dev prompts are read at run time and never
copied into the repository. ``--errors`` lists the misrouted prompts on the terminal.
Figures go in docs/PERFORMANCE.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.config import load_config, with_tiny_models  # noqa: E402
from engine.router import CascadeRouter, RuleBook, evaluate, format_report, percentile, read_examples  # noqa: E402

DEV_SET = REPO.parent / "shared" / "eval" / "routing_dev.jsonl"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, action="append", help=f"JSONL file(s) (default: {DEV_SET})")
    parser.add_argument("--stages", default="rules,embeddings", help="comma-separated stages (default: rules,embeddings)")
    parser.add_argument("--profile", choices=("real", "tiny"), default="real", help="tiny: the random tiny LLM")
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    parser.add_argument("--errors", action="store_true", help="list misrouted prompts")
    return parser.parse_args()


async def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    config = load_config(REPO / "config.toml", profile=args.profile)
    if config.profile == "tiny":
        from engine.tiny import ensure_tiny_models

        config = with_tiny_models(config, ensure_tiny_models(config.tiny_cache_dir))
    stages = tuple(s for s in args.stages.split(",") if s)
    config = config.model_copy(update={"router": config.router.model_copy(update={"stages": stages})})
    model_ids = list(config.models)
    async with CascadeRouter(config) as router:
        started = time.perf_counter()
        await router.warm_up()
        warm_s = time.perf_counter() - started
        for path in args.data or [DEV_SET]:
            examples = read_examples(path, model_ids)
            report = await evaluate(router, examples, model_ids)
            if "embeddings" in stages:
                report["embedding_cpu_ms"] = await _embedding_cpu_ms(router, [e.prompt for e in examples])
            report.update(file=str(path), stages=list(stages), warm_up_s=round(warm_s, 2), machine=_machine(),
                          date=datetime.date.today().isoformat())
            if args.json:
                print(json.dumps(report))
                continue
            print(f"== {path.name}  stages: {', '.join(stages)}  ({_machine()}, {report['date']}; warm-up {warm_s:.2f} s)")
            print(format_report(report, model_ids))
            if "embedding_cpu_ms" in report:
                cpu = report["embedding_cpu_ms"]
                print(f"embedding stage, CPU time of its thread (~ latency on an idle core): "
                      f"p50 {cpu['p50']:.2f} ms, p95 {cpu['p95']:.2f} ms over {cpu['n']} prompts")
            if args.errors:
                await _print_errors(router, examples)
            print()
    return 0


async def _embedding_cpu_ms(router: CascadeRouter, prompts: list[str]) -> dict[str, float]:
    """The embedding stage's work for the prompts no rule decides, timed by the CPU time of the
    embedding thread itself: on a machine shared with other busy processes, wall-clock figures
    measure the neighbours; this measures the router (a bench, so it may use a private hand-off)."""
    rules = RuleBook(router.settings.rules)
    left = [p for p in prompts if rules.match(p) is None]
    index = await router._example_index()
    if index is None or not left:
        return {"p50": 0.0, "p95": 0.0, "n": 0}

    def measure() -> list[float]:
        spent = []
        for prompt in left:
            started = time.thread_time()
            index.scores_blocking(prompt)
            spent.append((time.thread_time() - started) * 1000)
        return spent

    spent = await router._in_embed_thread(measure)
    return {"p50": round(percentile(spent, 50), 3), "p95": round(percentile(spent, 95), 3), "n": len(spent)}


async def _print_errors(router: CascadeRouter, examples: list) -> None:
    print("\nmisrouted (expected -> got [stage]: reason | prompt):")
    for example in examples:
        decision = await router.route(example.prompt)
        if decision.model_id != example.expected:
            mark = "~" if decision.model_id in example.acceptable else "x"
            print(f" {mark} {example.expected} -> {decision.model_id} [{decision.stage}]: {decision.reason} | {example.prompt[:110]}")


def _machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    sys.exit(asyncio.run(run(parse_args())))
