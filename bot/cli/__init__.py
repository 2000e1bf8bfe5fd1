"""The ``promptpics`` command line: the parser and ``main``, the composition root that reads
config, builds and passes in.

- jobs.py: imagine, history, show, stats, models (one-shot, on their own engine or the history)
- serve.py: chat (the terminal) and run (every chat platform whose token is set), sync-commands
- router.py: route and eval-router (the router on its own); learn.py: router learn (from routing feedback)
- download.py: download (the models' weights from the hub)
- doctor.py, platform_checks.py: doctor (what will and won't work, and why)
- plan.py: plan (the placement planner for a card)
- profile.py: the tiny profile's models, built once before any of them runs
- preflight.py: what is checked before any engine starts (data folder, --out, hub, weights, stdout)
- webui.py: web (the gallery and dashboard on their own), and the same app inside run
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bot.cli.doctor import add_doctor_command
from bot.cli.download import add_download_command
from bot.cli.jobs import STDOUT_CLOSED, add_job_commands
from bot.cli.plan import add_plan_command
from bot.cli.preflight import Refused, check_data_dir
from bot.cli.router import add_router_commands
from bot.cli.serve import add_bot_commands
from bot.cli.webui import add_web_command
from bot.settings import load_settings
from engine import EngineError, load_config

log = logging.getLogger("promptpics")
HISTORY_ONLY = frozenset({"history", "show", "stats"})  # read the history only: a read-only folder will do
READ_ONLY = HISTORY_ONLY | {"sync-commands", "route", "eval-router", "models"}  # and these, but for the tiny profile
REPORTS_ON_DATA_DIR = frozenset({"doctor", "download", "plan"})  # say what is wrong with the folder themselves, or never use it


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


def version() -> str:
    """The installed package's version; from pyproject.toml when run from a checkout."""
    try:
        return importlib.metadata.version("promptpics")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptpics", description="Self-hosted image generation bot.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    add_global_options(parser, in_subcommand=False)
    commands = parser.add_subparsers(dest="command", required=True)

    add_job_commands(commands)
    add_bot_commands(commands)
    add_router_commands(commands)
    add_download_command(commands)
    add_doctor_command(commands)
    add_plan_command(commands)
    add_web_command(commands)
    for subcommand in commands.choices.values():  # every one, those added later included
        add_global_options(subcommand, in_subcommand=True)
        for nested in (p for a in subcommand._actions if isinstance(a, argparse._SubParsersAction)
                       for p in a.choices.values()):  # `router learn`
            add_global_options(nested, in_subcommand=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    before = set(logging.getLogger().handlers)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # a warning stays one line; its traceback is for -v
        for handler in set(logging.getLogger().handlers) - before:  # ours only, not a host's (pytest's)
            handler.addFilter(_without_traceback)
    # discord.py warns at every start that voice needs PyNaCl and davey: the bot has no voice.
    logging.getLogger("discord.client").addFilter(lambda record: "voice will NOT be supported" not in record.getMessage())
    if not args.verbose:
        # Read by transformers and diffusers when first imported: their advisory warnings
        # (a missing optional torchvision, ...) mean nothing to someone making an image.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        # Before anything starts: the whole config (every table, [bot] [discord] [slack] included)
        # and the data folder; each command then checks its own request.
        config = load_config(args.config, profile=args.profile)
        load_settings(config, os.environ)
        writes = args.command not in READ_ONLY or config.profile == "tiny" and args.command not in HISTORY_ONLY
        if args.command not in REPORTS_ON_DATA_DIR:
            check_data_dir(config, os.environ, writes=writes)
        return int(asyncio.run(args.run(config, args)))
    except EngineError as exc:  # bad config or request, a data folder another process holds, ...: one line
        print(f"promptpics: {exc.user_message}", file=sys.stderr)
        return 2
    except Refused as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("promptpics: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader left after the work was done: nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit must not fail
        return STDOUT_CLOSED


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())

