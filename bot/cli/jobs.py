"""The one-shot subcommands of ``promptpics``: ``imagine`` (one image, written as a PNG),
``history``, ``show``, ``stats`` (read from the history) and ``models`` (the model table).
Each handler is ``async def cmd_x(config, args) -> int``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bot.cli.preflight import cancelled_when_stdout_closes, check_out, check_weights, hub_sources, settle_offline
from bot.cli.profile import prepare
from bot.progress import ProgressBar
from engine import (
    AttemptRecord,
    Config,
    Engine,
    HistoryStore,
    JobCancelled,
    JobFailed,
    JobFinished,
    JobHandle,
    JobProgressed,
    JobQueued,
    JobRequest,
    JobStarted,
    RequestError,
    RoutingFeedback,
    SwitchAway,
    StoredJob,
    check_request,
    describe_models,
)

MAX_HISTORY_LIMIT = 1000  # rows per `history`; more is a database dump, not a listing
STDOUT_CLOSED = 141  # what a shell reports for a process ended by SIGPIPE (128 + 13)


def add_job_commands(subparsers: Any) -> None:
    imagine = subparsers.add_parser("imagine", help="make one image and write it as a PNG")
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

    history = subparsers.add_parser("history", help="recent jobs, newest first")
    history.add_argument("--user", help="only this user id")
    history.add_argument("--limit", type=int, default=20, help=f"at most this many rows (1 to {MAX_HISTORY_LIMIT})")
    history.add_argument("--json", action="store_true")
    history.set_defaults(run=cmd_history)

    show = subparsers.add_parser("show", help="one job: parameters, outcome, image path")
    show.add_argument("job_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=cmd_show)

    models = subparsers.add_parser("models", help="list the models and their settings")
    models.add_argument("--json", action="store_true")
    models.set_defaults(run=cmd_models)
    stats = subparsers.add_parser("stats", help="per-model timings and safety incidence from the history")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(run=cmd_stats)


async def cmd_imagine(config: Config, args: argparse.Namespace) -> int:
    request = JobRequest(prompt=args.prompt, model=args.model, negative_prompt=args.negative, steps=args.steps,
                         guidance=args.guidance, width=args.width, height=args.height, seed=args.seed)
    # 1. Everything that can be refused without an engine: the request, --out, the weights.
    models = check_request(request, config)
    if args.out is not None:
        check_out(args.out)
    offline = settle_offline(hub_sources(config, models) if config.profile == "real" else ())
    check_weights(config, models, offline=offline)
    # 2. The job; a closed stdout drops it as Ctrl-C does.
    with cancelled_when_stdout_closes() as stdout_closed:
        try:
            return await imagine(await asyncio.to_thread(prepare, config), request, args.out)
        except asyncio.CancelledError:
            if not stdout_closed():
                raise
            print("promptpics: stdout was closed; the job was cancelled", file=sys.stderr)
            return STDOUT_CLOSED


async def imagine(config: Config, request: JobRequest, out: Path | None) -> int:
    async with Engine(config) as engine:
        if engine.resumed:
            print(f"{len(engine.resumed)} job(s) left by an earlier run go first", file=sys.stderr)
        handle = await engine.submit(request)
        try:
            return await follow(config, handle, out)
        except asyncio.CancelledError:  # Ctrl-C or a closed stdout: this job is the user's to drop, not to keep
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
                    try:
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(result.png)
                    except OSError as exc:
                        print(f"promptpics: `--out` {str(out)!r} could not be written ({exc.strerror}); "
                              f"the image is kept at {path}", file=sys.stderr)
                        return 2
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


def read_history(config: Config) -> Any:
    """The history opened read-only (``mode=ro``): a backup in a read-only folder can be read."""
    return HistoryStore.open(config.data_dir, busy_timeout_s=config.history.busy_timeout_s, read_only=True)


def has_history(config: Config) -> bool:
    return (config.data_dir / "promptpics.sqlite3").is_file()


async def cmd_history(config: Config, args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= MAX_HISTORY_LIMIT:
        raise RequestError("--limit", args.limit, f"it must be a whole number from 1 to {MAX_HISTORY_LIMIT}")
    jobs: list[StoredJob] = []
    if has_history(config):
        async with read_history(config) as store:
            jobs = await store.recent_jobs(user_id=args.user, limit=args.limit)
    if args.json:
        print(safe_json([job_summary(j) for j in jobs]))
        return 0
    if not jobs:
        print("no jobs yet")
    for job in jobs:
        when = datetime.fromtimestamp(job.created_at).strftime("%Y-%m-%d %H:%M")
        prompt = job.params.prompt if len(job.params.prompt) <= 50 else job.params.prompt[:47] + "..."
        print(shown(f"{job.id}  {when}  {job.status.value:<9}  {job.params.model_id:<10}  "
                    f"{job.requester.display_name or job.requester.user_id:<12}  {prompt}"))
    return 0


async def cmd_show(config: Config, args: argparse.Namespace) -> int:
    job: StoredJob | None = None
    attempts: list[AttemptRecord] = []
    if has_history(config):
        async with read_history(config) as store:
            job = await store.get_job(args.job_id.strip().lower())
            attempts = await store.attempts(job.id) if job else []
    if job is None:
        print(f"promptpics: no job `{shown(args.job_id)}` in the history", file=sys.stderr)
        return 2
    summary = job_summary(job) | {"attempts": [
        {"n": a.n, "model": a.model_id, "prompt_used": a.prompt_used, "outcome": a.outcome,
         "retry_reason": a.retry_reason, "verdicts": a.verdicts} for a in attempts]}
    if args.json:
        print(safe_json(summary))
        return 0
    for key, value in summary.items():
        if key != "attempts" and value not in (None, ""):
            print(shown(f"{key + ':':<16}{value}"))
    for a in summary["attempts"]:
        print(shown(f"attempt {a['n']}:       {a['model']} -> {a['outcome']}"
                    + (f" ({a['retry_reason']})" if a["retry_reason"] else "")))
    return 0


async def cmd_stats(config: Config, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    away: dict[str, SwitchAway] = {}
    if has_history(config):
        async with read_history(config) as store:
            rows = [dataclasses.asdict(s) for s in await store.model_stats()]
            away = {a.model_id: a for a in await RoutingFeedback(store).switch_away()}
    for r in rows:  # the switch-away rate: a routing-miss signal, before/after the last `router learn`
        a = away.get(r["model_id"])
        r["switch_away"] = {"results": a.results, "switched": a.switched, "rate": a.rate, "before_learn": a.rate_before,
                            "after_learn": a.rate_after} if a else None
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
    print_switch_away([r for r in rows if r["switch_away"]])
    return 0


def print_switch_away(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print("\nswitch-away rate: results someone switched to another model from (before -> after the last router learn)")
    for r in rows:
        a = r["switch_away"]
        change = "" if a["before_learn"] is None and a["after_learn"] is None else \
            f"   {_pct(a['before_learn'])} -> {_pct(a['after_learn'])}"
        print(f"{r['model_id']:<11} {a['switched']:>4} of {a['results']:<5} {_pct(a['rate']):>6}{change}")


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


# C0 and C1 controls and DEL: a chat user's prompt with ESC [2J or an OSC title sequence must not
# drive the admin's terminal. Shown as visible escapes (\x1b) instead.
_TERMINAL_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(text: str) -> str:
    """``text`` safe to print to a terminal: every control character as a visible ``\\xNN``."""
    return _TERMINAL_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def safe_json(value: Any) -> str:
    """JSON escapes C0 itself; DEL and C1 (ensure_ascii=False keeps them raw) become \\u00NN too."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return re.sub(r"[\x7f-\x9f]", lambda m: f"\\u{ord(m.group()):04x}", text)


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
