"""The composition root and the ``promptpics`` command line: reads config, builds, passes in."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bot.progress import ProgressBar
from engine import (
    Config,
    Engine,
    EngineError,
    JobFailed,
    JobFinished,
    JobProgressed,
    JobQueued,
    JobRequest,
    JobStarted,
    load_config,
    with_tiny_models,
)
from engine.models_info import describe_models

log = logging.getLogger("promptpics")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptpics", description="Self-hosted image generation bot.")
    parser.add_argument("--config", help="config file (default: $PROMPTPICS_CONFIG, ./config.toml)")
    parser.add_argument("--profile", choices=("real", "tiny"), help="'tiny': locally built test models, no downloads")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
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
    imagine.add_argument("--out", type=Path, help="PNG file to write (default: <data_dir>/outputs/<job id>.png)")
    imagine.set_defaults(run=cmd_imagine)

    models = commands.add_parser("models", help="list the models and their settings")
    models.add_argument("--json", action="store_true")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # Read by transformers and diffusers when first imported: their advisory warnings
        # (a missing optional torchvision, ...) mean nothing to someone making an image.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        config = load_config(args.config, profile=args.profile)
        return int(asyncio.run(args.run(config, args)))
    except EngineError as exc:
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
    bar = ProgressBar(sys.stderr)
    async with Engine(config) as engine:
        handle = await engine.submit(request)
        p = handle.params
        print(f"job {handle.id}: {config.model(p.model_id).display_name} ({p.route_reason}), "
              f"{p.width}x{p.height}, {p.steps} steps, guidance {p.guidance:g}, seed {p.seed}", file=sys.stderr)
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
                    out = args.out or config.data_dir / "outputs" / f"{handle.id}.png"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(result.png)
                    t = result.timings
                    print(f"wrote {out} ({result.width}x{result.height}; load {t.load_s:.2f} s, "
                          f"generate {t.generate_s:.2f} s)", file=sys.stderr)
                    print(out)
                    return 0
                case JobFailed(message=message):
                    bar.close()
                    print(f"promptpics: {message}", file=sys.stderr)
                    return 1
    return 1


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
