"""Benchmark: does `router learn` fix a class of prompts the router gets wrong, without hurting the dev set?

    .venv/bin/python bench/router_learning.py                  # a table
    .venv/bin/python bench/router_learning.py --json           # {"synthetic": {...}, "dev": {...}}
    .venv/bin/python bench/router_learning.py --train 8 --fresh 8

A synthetic stream: simulated users ask for video thumbnails ("thumbnail for my <game> <video>,
<style>"), a template family in no example and decided by no rule. The router sends them to
flux_dev; the users want a designed layout with a title, sd3_medium, and switch to it by
reaction (a few switch to logo_sdxl instead: noise). The phases:
1. Record the switches in a fresh history (a temporary data folder), through RoutingFeedback.
2. Run the learn (engine.router.learn, what `promptpics router learn` runs), with the repo's
   held-out prompts as its frozen check set.
3. Route a fresh sample of the class (no prompt of the stream) and the dev set
   (../shared/eval/routing_dev.jsonl, else the held-out prompts) before and after the learn.
Stages: rules + embeddings (the LLM stage does not read the examples). Accuracies are strict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.config import load_config  # noqa: E402
from engine.history import HistoryStore, RoutingFeedback  # noqa: E402
from engine.router import CascadeRouter, Example, read_examples  # noqa: E402
from engine.router.learn import CHECK_STAGES, LearnOptions, learn, learned_router, learned_state  # noqa: E402

DEV_SET = REPO.parent / "shared" / "eval" / "routing_dev.jsonl"
HELD_OUT = REPO / "bench" / "router_heldout.jsonl"
WANTED, NOISE = "sd3_medium", "logo_sdxl"

GAMES = ["minecraft", "fortnite", "valorant", "apex legends", "roblox", "rust", "overwatch", "terraria", "dota",
         "halo", "destiny", "warframe", "runescape", "among us", "elden ring", "stardew valley", "rocket league",
         "league of legends", "pubg", "hearthstone"]
VIDEOS = ["video", "speedrun", "let's play", "stream highlights", "tutorial", "montage", "challenge video", "review"]
STYLES = ["minimalist", "bold", "vintage", "neon", "gritty", "retro", "sleek", "modern", "fiery", "dramatic",
          "clean", "colorful"]


def class_prompts(n: int, rng: random.Random, avoid: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """``n`` distinct prompts of the family, none in ``avoid``."""
    seen: set[str] = set()
    while len(seen) < n:
        prompt = f"thumbnail for my {rng.choice(GAMES)} {rng.choice(VIDEOS)}, {rng.choice(STYLES)}"
        if prompt not in avoid:
            seen.add(prompt)
    return sorted(seen)


async def accuracy(router: CascadeRouter, examples: list[Example]) -> float:
    async with router:
        await router.warm_up()
        right = [(await router.route(e.prompt)).model_id == e.expected for e in examples]
    return round(sum(right) / len(right), 4) if right else 0.0


async def run(args: argparse.Namespace) -> dict[str, object]:
    config = load_config(REPO / "config.toml")
    rng = random.Random(args.seed)
    train = class_prompts(args.train, rng)
    fresh = [Example(p, WANTED, (WANTED,)) for p in class_prompts(args.fresh, rng, avoid=set(train))]
    dev_path = args.dev or (DEV_SET if DEV_SET.is_file() else HELD_OUT)
    dev = read_examples(dev_path, config.models)
    check = read_examples(args.check, config.models)
    with tempfile.TemporaryDirectory() as folder:
        async with HistoryStore.open(Path(folder)) as store:
            feedback = RoutingFeedback(store)
            base = config.router.model_copy(update={"stages": CHECK_STAGES})
            before = {name: await accuracy(CascadeRouter(config, base), rows) for name, rows in (("synthetic", fresh), ("dev", dev))}
            # 1. the stream: each prompt's asker switches away from flux_dev (one in ten to the noise model)
            for i, prompt in enumerate(train):
                chosen = NOISE if rng.random() < args.noise else WANTED
                await feedback.record("switch", prompt=prompt, chosen_model=chosen, router_pick="flux_dev",
                                      from_model="flux_dev", job_id=f"job{i}", user_key=f"discord:{1000 + i}")
            # 2. learn
            started = time.perf_counter()
            outcome = await learn(config, feedback, check, options=LearnOptions(cap_per_model=args.cap))
            learn_s = time.perf_counter() - started
            # 3. after
            learned, thresholds = await learned_state(feedback)
            after = {name: await accuracy(learned_router(config, base, learned, thresholds), rows)
                     for name, rows in (("synthetic", fresh), ("dev", dev))}
    return {
        "synthetic": {"before": before["synthetic"], "after": after["synthetic"], "n": len(fresh)},
        "dev": {"before": before["dev"], "after": after["dev"], "n": len(dev), "file": dev_path.name},
        "learn": {"applied": outcome.applied, "refused": outcome.refused, "added": len(outcome.added),
                  "check_before": outcome.check_before.get("strict_accuracy"),
                  "check_after": outcome.check_after.get("strict_accuracy"), "seconds": round(learn_s, 2),
                  "thresholds": outcome.thresholds_after},
        "train": len(train), "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=60, help="prompts in the switch stream (default 60)")
    parser.add_argument("--fresh", type=int, default=80, help="fresh prompts of the class to score (default 80)")
    parser.add_argument("--noise", type=float, default=0.1, help="share of users who switch to another model")
    parser.add_argument("--cap", type=int, default=100, help="learned examples kept per model")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--dev", type=Path, help=f"the dev set (default {DEV_SET}, else {HELD_OUT.name})")
    parser.add_argument("--check", type=Path, default=HELD_OUT, help="the learn's frozen check set")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps(report))
        return 0
    s, d, lr = report["synthetic"], report["dev"], report["learn"]
    assert isinstance(s, dict) and isinstance(d, dict) and isinstance(lr, dict)
    print(f"{'set':<12} {'n':>4} {'before':>8} {'after':>8}")
    print(f"{'synthetic':<12} {s['n']:>4} {s['before']:>8.1%} {s['after']:>8.1%}")
    print(f"{d['file'][:12]:<12} {d['n']:>4} {d['before']:>8.1%} {d['after']:>8.1%}")
    print(f"learn: applied {lr['applied']}, {lr['added']} example(s) added from {report['train']} switches, "
          f"check set {lr['check_before']} -> {lr['check_after']}, {lr['seconds']} s" + (f"; {lr['refused']}" if lr["refused"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
