"""The ``promptpics`` command line: the parser and ``main``, the composition root that reads
config, builds and passes in.

- jobs.py: imagine, history, show, stats, models (one-shot, on their own engine or the history)
- serve.py: chat (the terminal) and run (every chat platform whose token is set), sync-commands
- router.py: route and eval-router (the router on its own)
- profile.py: the tiny profile's models, built once before any of them runs
- webui.py: web (the gallery and dashboard on their own), and the same app inside run
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from bot.cli.jobs import add_job_commands
from bot.cli.router import add_router_commands
from bot.cli.serve import add_bot_commands
from bot.cli.webui import add_web_command
from engine import EngineError, load_config

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

    add_job_commands(commands)
    add_bot_commands(commands)
    add_router_commands(commands)
    add_web_command(commands)
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


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())

