"""The composition root and the ``promptpics`` command line: reads config, builds, passes in."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bot.cli_bot import add_bot_commands
from bot.cli_router import add_router_commands
from bot.progress import ProgressBar
from engine import (
    Config,
    Engine,
    EngineError,
    HistoryStore,
    JobCancelled,
    JobFailed,
    JobHandle,
    JobFinished,
    JobProgressed,
    JobQueued,
    JobRequest,
    JobStarted,
    StoredJob,
    load_config,
    with_tiny_models,
)
from engine.models_info import describe_models

log = logging.getLogger("promptpics")


def add_global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    """``--config``, ``--profile`` and ``-v`` read the same before or after the subcommand.

    In a subcommand their default is SUPPRESS: a value given there overrides the one given
    before it, and one not given there leaves the earlier value (or the default) in place.
    """
    kept: dict[str, Any] = {"default": argparse.SUPPRESS} if in_subcommand else {}
    group = parser.add_argument_group("global options (before or after the subcommand)")
    group.add_argument("--config", help="config file (default: $PROMPTPICS_CONFIG, ./config.toml)", **kept)
    group.add_argument("--profile", choices=("real", "tiny"), help="'tiny': locally built test models, no downloads",
                       **kept)
    group.add_argument("-v", "--verbose", action="store_true", help="log what the engine does", **kept)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptpics", description="Self-hosted image generation bot.")
    add_global_options(parser, in_subcommand=False)
    commands = parser.add_subparsers(dest="command", required=True)

    imagine = commands.add_parser("imagine", help="make one image and write it as a PNG")
    imagine.add_argument("prompt")
    imagine.add_argument("--model", help="auto (default) or a model id; see `promptpics models`")
    imagine.add_argument("--negative", help="what the image should not show")
    imagine.add_argument("--steps", type=int)
    imagine.add_argument("--guidance", type=float)
    imagine.add_argument("--width", type=int)
    imagine.add_argument("--height", type=int)
    imagine.add_argument("--seed", type=int)
    imagine.add_argument("--out", type=Path, help="also write the PNG here (it is always kept under <data_dir>/images)")
    imagine.set_defaults(run=cmd_imagine)

    history = commands.add_parser("history", help="recent jobs, newest first")
    history.add_argument("--user", help="only this user id")
    history.add_argument("--limit", type=int, default=20)
    history.add_argument("--json", action="store_true")
    history.set_defaults(run=cmd_history)

    show = commands.add_parser("show", help="one job: parameters, outcome, image path")
    show.add_argument("job_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=cmd_show)

    models = commands.add_parser("models", help="list the models and their settings")
    models.add_argument("--json", action="store_true")
    models.set_defaults(run=cmd_models)
    stats = commands.add_parser("stats", help="per-model timings and safety incidence from the history")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(run=cmd_stats)
    add_bot_commands(commands)
    add_router_commands(commands)
    for subcommand in commands.choices.values():  # every one, those added later included
        add_global_options(subcommand, in_subcommand=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # discord.py warns at every start that voice needs PyNaCl and davey: the bot has no voice.
    logging.getLogger("discord.client").addFilter(lambda record: "voice will NOT be supported" not in record.getMessage())
    if not args.verbose:
        # Read by transformers and diffusers when first imported: their advisory warnings
        # (a missing optional torchvision, ...) mean nothing to someone making an image.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        config = load_config(args.config, profile=args.profile)
        return int(asyncio.run(args.run(config, args)))
    except EngineError as exc:  # bad config or request, a data folder another process holds, ...: one line
        print(f"promptpics: {exc.user_message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("promptpics: interrupted", file=sys.stderr)
        return 130


def prepare(config: Config) -> Config:
    """The tiny profile builds its twins once (seconds), then every id points at them."""
    if config.profile != "tiny":
        return config
    from engine.tiny import ensure_tiny_models

    return with_tiny_models(config, ensure_tiny_models(config.tiny_cache_dir))


async def cmd_imagine(config: Config, args: argparse.Namespace) -> int:
    config = await asyncio.to_thread(prepare, config)
    request = JobRequest(prompt=args.prompt, model=args.model, negative_prompt=args.negative, steps=args.steps,
                         guidance=args.guidance, width=args.width, height=args.height, seed=args.seed)
    async with Engine(config) as engine:
        if engine.resumed:
            print(f"{len(engine.resumed)} job(s) left by an earlier run go first", file=sys.stderr)
        handle = await engine.submit(request)
        try:
            return await follow(config, handle, args.out)
        except asyncio.CancelledError:  # Ctrl-C: this job is the user's to drop, not to keep
            await handle.cancel()
            raise


async def follow(config: Config, handle: JobHandle, out: Path | None) -> int:
    """Print the job's progress; write the PNG where asked. Returns the exit code."""
    p = handle.params
    print(f"job {handle.id}: {config.model(p.model_id).display_name} ({p.route_reason}), "
          f"{p.width}x{p.height}, {p.steps} steps, guidance {p.guidance:g}, seed {p.seed}", file=sys.stderr)
    bar = ProgressBar(sys.stderr)
    async for event in handle.events():
        match event:
            case JobQueued(position=pos) if pos > 1:
                print(f"queued #{pos}", file=sys.stderr)
            case JobStarted():
                bar.start(f"loading {p.model_id}", p.steps)
            case JobProgressed(step=step, total=total):
                bar.update(step, total)
            case JobFinished(result=result):
                bar.close()
                path = Path(result.image_path) if result.image_path else None
                if out is not None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(result.png)
                    path = out
                t = result.timings
                print(f"wrote {path} ({result.width}x{result.height}; load {t.load_s:.2f} s, "
                      f"generate {t.generate_s:.2f} s)", file=sys.stderr)
                print(path)
                return 0
            case JobFailed(message=message):
                bar.close()
                print(f"promptpics: {message}", file=sys.stderr)
                return 1
            case JobCancelled():
                bar.close()
                print(f"promptpics: job {handle.id} was cancelled", file=sys.stderr)
                return 1
    return 1


async def cmd_history(config: Config, args: argparse.Namespace) -> int:
    async with HistoryStore.open(config.data_dir, busy_timeout_s=config.history.busy_timeout_s) as store:
        jobs = await store.recent_jobs(user_id=args.user, limit=args.limit)
    if args.json:
        print(json.dumps([job_summary(j) for j in jobs], indent=2, ensure_ascii=False))
        return 0
    if not jobs:
        print("no jobs yet")
    for job in jobs:
        when = datetime.fromtimestamp(job.created_at).strftime("%Y-%m-%d %H:%M")
        prompt = job.params.prompt if len(job.params.prompt) <= 50 else job.params.prompt[:47] + "..."
        print(f"{job.id}  {when}  {job.status.value:<9}  {job.params.model_id:<10}  "
              f"{job.requester.display_name or job.requester.user_id:<12}  {prompt}")
    return 0


async def cmd_show(config: Config, args: argparse.Namespace) -> int:
    async with HistoryStore.open(config.data_dir, busy_timeout_s=config.history.busy_timeout_s) as store:
        job = await store.get_job(args.job_id.strip().lower())
        attempts = await store.attempts(job.id) if job else []
    if job is None:
        print(f"promptpics: no job `{args.job_id}` in the history", file=sys.stderr)
        return 1
    summary = job_summary(job) | {"attempts": [
        {"n": a.n, "model": a.model_id, "prompt_used": a.prompt_used, "outcome": a.outcome,
         "retry_reason": a.retry_reason, "verdicts": a.verdicts} for a in attempts]}
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    for key, value in summary.items():
        if key != "attempts" and value not in (None, ""):
            print(f"{key + ':':<16}{value}")
    for a in summary["attempts"]:
        print(f"attempt {a['n']}:       {a['model']} -> {a['outcome']}" + (f" ({a['retry_reason']})" if a["retry_reason"] else ""))
    return 0


async def cmd_stats(config: Config, args: argparse.Namespace) -> int:
    async with HistoryStore.open(config.data_dir, busy_timeout_s=config.history.busy_timeout_s) as store:
        rows = [dataclasses.asdict(s) for s in await store.model_stats()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no jobs yet")
    print(f"{'model':<11} {'jobs':>5} {'ok':>5} {'failed':>6} {'mean s':>7} {'p95 s':>7} {'nsfw':>5} {'black':>5} "
          f"{'fixed':>5} {'fell back':>9} {'refused':>7}")
    for r in rows:
        mean = f"{r['mean_generate_s']:.2f}" if r["mean_generate_s"] is not None else "-"
        p95 = f"{r['p95_generate_s']:.2f}" if r["p95_generate_s"] is not None else "-"
        print(f"{r['model_id']:<11} {r['count']:>5} {r['succeeded']:>5} {r['failed']:>6} {mean:>7} {p95:>7} "
              f"{r['nsfw_flagged']:>5} {r['black_flagged']:>5} {r['fixed_by_rewrite']:>5} {r['fell_back']:>9} "
              f"{r['refused']:>7}")
    return 0


def job_summary(job: StoredJob) -> dict[str, Any]:
    p, t = job.params, job.timings
    return {
        "id": job.id, "status": job.status.value,
        "created": datetime.fromtimestamp(job.created_at, tz=timezone.utc).isoformat(timespec="seconds"),
        "user": job.requester.display_name or job.requester.user_id, "platform": job.requester.platform,
        "prompt": p.prompt, "negative_prompt": p.negative_prompt, "model_asked": job.model_asked or "auto",
        "model": p.model_id, "route_reason": p.route_reason, "steps": p.steps, "guidance": p.guidance,
        "width": p.width, "height": p.height, "seed": p.seed,
        "image": str(job.image_path) if job.image_path else None,
        "error": job.error_message, "queue_wait_s": round(t.queue_wait_s, 3), "load_s": round(t.load_s, 3),
        "generate_s": round(t.generate_s, 3), "total_s": round(t.total_s, 3),
    }


async def cmd_models(config: Config, args: argparse.Namespace) -> int:
    # A one-shot command holds no pipelines, so nothing is loaded in this process; the bot's
    # admin `/models` shows the live state through the same describe_models().
    config = await asyncio.to_thread(prepare, config)
    rows = describe_models(config, resident=())
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    for row in rows:
        print(f"{row['emoji']} {row['id']:<11} {row['display_name']:<27} {row['family']:<7} "
              f"steps {row['steps']:>2} guidance {row['guidance']:<4g} offload {row['offload']:<10} "
              f"{'loaded' if row['loaded'] else 'not loaded'}; weights: {row['weights']}")
        print(f"   good at: {row['good_at']}; source: {row['source']}")
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
