"""``promptpics download``: fetch the weights the configured models need, from the model hub.

Plans every model first (its file list and sizes, what is already cached), checks the disk
once for the total, then lets huggingface_hub transfer the missing files (parallel, resumed
after a dropped connection, complete files skipped), so running it again is always safe.
Models whose ``source`` is a local folder are reported and skipped. ``--quantise`` then fills
the quantised cache for the models' int8/fp8 parts (engine/pipelines/quant_cache.py), so that
their first job does not wait for the CPU to quantise them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from engine import (
    Config,
    DownloadInterruptedError,
    DownloadPlan,
    Hub,
    RequestError,
    check_disk,
    fetch,
    free_bytes,
    human_bytes,
    plan_download,
    warm_quantised_cache_blocking,
    weight_targets,
)


def add_download_command(subparsers: Any) -> None:
    download = subparsers.add_parser(
        "download", help="fetch the models' weights from the hub (safe to re-run: resumes, skips complete files)")
    download.add_argument("models", nargs="*", metavar="MODEL", help="model ids (see `promptpics models`)")
    download.add_argument("--all", action="store_true", help="every model, and the router's and rewrite's LLMs")
    download.add_argument("--dry-run", action="store_true", help="list the files and their sizes; download nothing")
    download.add_argument("--quantise", action="store_true",
                          help="then quantise the models' int8/fp8 parts into the quantised cache now (minutes of "
                               "CPU for the large ones), so that their first job does not wait for it")
    download.set_defaults(run=cmd_download)


async def cmd_download(config: Config, args: argparse.Namespace) -> int:
    if config.profile == "tiny" and not args.quantise:
        print("the tiny profile builds its models on this machine: nothing to download")
        return 0
    if not args.models and not args.all:
        print(f"promptpics: name the models to download ({', '.join(config.models)}) or use --all", file=sys.stderr)
        return 2
    if config.profile == "tiny":
        print("the tiny profile builds its models on this machine: nothing to download")
        done = 0
    else:
        hub = Hub.from_environment(os.environ)  # read here, once: HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_TOKEN
        done = await asyncio.to_thread(download_blocking, config, args, hub)
    if done != 0 or not args.quantise or args.dry_run:
        return done
    return await quantise(config, list(args.models) or list(config.models))


async def quantise(config: Config, model_ids: list[str]) -> int:
    """``--quantise``: the parts the engine would quantise at each model's first load, done now."""
    from bot.cli.plan import traffic
    from bot.cli.profile import prepare

    if not config.residency.quantised_cache:
        print("promptpics: residency.quantised_cache is false: nothing would be kept, so nothing is quantised now",
              file=sys.stderr)
        return 2
    config = await asyncio.to_thread(prepare, config)  # the tiny profile: its twins
    shares, _ = await traffic(config, None)  # the placements engine.placement = "auto" would choose
    if unknown := [m for m in model_ids if m not in config.models]:  # refused before anything loads
        raise RequestError("model", unknown[0], f"it must be one of {', '.join(config.models)}")
    print(f"quantising into {config.data_dir / 'quantised'} ...", file=sys.stderr)
    for warmed in await asyncio.to_thread(warm_quantised_cache_blocking, config, model_ids, shares):
        if not warmed.parts:
            print(f"{warmed.model_id}: no int8/fp8 part, nothing to quantise")
        elif not warmed.written:
            print(f"{warmed.model_id}: {', '.join(warmed.parts)} already in the quantised cache")
        else:
            print(f"{warmed.model_id}: {', '.join(warmed.written)} quantised and kept in {warmed.seconds:.1f} s")
    return 0


def download_blocking(config: Config, args: argparse.Namespace, hub: Hub) -> int:
    targets = weight_targets(config, args.models, everything=args.all)
    for target in targets:
        if target.local:
            print(f"{target.name}: local folder {target.source}: nothing to download")
    plans = []
    for target in (t for t in targets if not t.local):
        print(f"{target.name}: reading {target.source} ...", file=sys.stderr)
        plans.append(plan_download(target, hub))
    for plan in plans:
        print(_summary(plan))
    missing = sum(plan.missing_bytes for plan in plans)
    print(f"to fetch: {human_bytes(missing)} into {hub.cache_dir} ({human_bytes(free_bytes(hub.cache_dir))} free)")
    if args.dry_run:
        for plan in plans:
            _list_files(plan)
        return 0
    check_disk(plans, hub)
    for plan in plans:
        if not plan.missing:
            continue
        print(f"{plan.target.name}: fetching {len(plan.missing)} file(s), {human_bytes(plan.missing_bytes)}",
              file=sys.stderr)
        try:
            fetch(plan, hub)
        except DownloadInterruptedError as exc:  # worth a plain re-run, unlike a refusal (exit 2)
            print(f"promptpics: {exc.user_message}", file=sys.stderr)
            return 1
        print(f"{plan.target.name}: complete")
    print("done: `promptpics doctor` checks the rest of the setup")
    return 0


def _summary(plan: DownloadPlan) -> str:
    state = "complete" if not plan.missing else f"{human_bytes(plan.missing_bytes)} to fetch"
    return (f"{plan.target.name:<22} {plan.target.source}: {len(plan.files)} files, "
            f"{human_bytes(plan.total_bytes)}; {state}")


def _list_files(plan: DownloadPlan) -> None:
    print(f"\n{plan.target.source} @ {plan.commit[:12]}")
    for path, size in sorted(plan.files.items()):
        print(f"  {human_bytes(size):>10}  {path}{'  (cached)' if path in plan.cached else ''}")
