"""`promptpics`'s global options (--config, --profile, -v) before or after any subcommand, and the
one-line exit 2 when another process holds the data folder."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bot.cli import build_parser
from tests.conftest import REPO, promptpics

# The smallest valid arguments of each subcommand.
SUBCOMMANDS: dict[str, list[str]] = {
    "imagine": ["imagine", "a fox"],
    "history": ["history"],
    "show": ["show", "ab12cd"],
    "models": ["models"],
    "stats": ["stats"],
    "route": ["route", "a fox"],
    "eval-router": ["eval-router", "prompts.jsonl"],
    "router": ["router", "learn"],
    "chat": ["chat"],
    "run": ["run"],
    "sync-commands": ["sync-commands"],
    "download": ["download", "flux_dev"],
    "doctor": ["doctor"],
    "plan": ["plan", "--gpu-gb", "24"],
    "web": ["web", "--port", "0"],
}
GLOBAL = ["--config", "other.toml", "--profile", "tiny", "-v"]


def parse(argv: list[str]) -> dict[str, Any]:
    return vars(build_parser().parse_args(argv))


def test_every_subcommand_is_covered_here() -> None:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_global_options_read_the_same_before_or_after_the_subcommand(name: str) -> None:
    args = SUBCOMMANDS[name]
    before, after = parse([*GLOBAL, *args]), parse([*args, *GLOBAL])
    assert before == after
    assert (after["config"], after["profile"], after["verbose"]) == ("other.toml", "tiny", True)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_without_global_options_every_subcommand_gets_the_defaults(name: str) -> None:
    parsed = parse(SUBCOMMANDS[name])
    assert (parsed["config"], parsed["profile"], parsed["verbose"]) == (None, None, False)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_options_split_around_the_subcommand_are_all_kept(name: str) -> None:
    parsed = parse(["--config", "other.toml", *SUBCOMMANDS[name], "--profile", "tiny", "--verbose"])
    assert (parsed["config"], parsed["profile"], parsed["verbose"]) == ("other.toml", "tiny", True)
    parsed = parse(["--profile", "tiny", "-v", *SUBCOMMANDS[name]])  # nothing after: the earlier values stay
    assert (parsed["config"], parsed["profile"], parsed["verbose"]) == (None, "tiny", True)


def test_the_value_after_the_subcommand_wins_over_the_one_before() -> None:
    assert parse(["--profile", "real", "imagine", "a fox", "--profile", "tiny"])["profile"] == "tiny"


def test_a_bad_profile_after_the_subcommand_is_refused_like_one_before(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--profile", "huge", "stats"], ["stats", "--profile", "huge"]):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(argv)
        assert exit_.value.code == 2
        assert "argument --profile: invalid choice: 'huge'" in capsys.readouterr().err


@pytest.mark.slow
def test_imagine_gives_the_same_png_with_the_profile_before_or_after(cli_env: dict[str, str],
                                                                     tmp_path: Path) -> None:
    small = ["--steps", "2", "--width", "256", "--height", "256"]  # what is compared is the profile's placement
    runs = {
        "after": ["imagine", "a lighthouse at dusk", "--profile", "tiny", "--seed", "7", "--out", str(tmp_path / "after.png")],
        "before": ["--profile", "tiny", "imagine", "a lighthouse at dusk", "--seed", "7", "--out", str(tmp_path / "before.png")],
    }
    for name, argv in runs.items():
        done = promptpics(cli_env, *argv, *small)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(tmp_path / f"{name}.png")
    after, before = (tmp_path / "after.png").read_bytes(), (tmp_path / "before.png").read_bytes()
    assert hashlib.sha256(after).hexdigest() == hashlib.sha256(before).hexdigest()


# -- a data folder another process holds -------------------------------------------------------

# Engine.__aenter__ refuses as it does when another process holds the data folder's lock; the
# two-process test of the lock itself is the engine's (tests/test_datalock.py).
BUSY_ENGINE = """
import sys
from engine import Engine
from engine.errors import DataFolderBusyError

async def busy(self):
    raise DataFolderBusyError(str(self.config.data_dir), 4242, "2026-12-01 10:00:00")

Engine.__aenter__ = busy
from bot.cli import main
sys.exit(main(sys.argv[1:]))
"""


def promptpics_beside_a_busy_engine(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BUSY_ENGINE, *args], cwd=REPO, env=env, capture_output=True,
                          stdin=subprocess.DEVNULL, text=True, timeout=240)


@pytest.mark.parametrize("argv", [["imagine", "a fox", "--steps", "1"], ["chat"], ["run"]], ids=lambda a: a[0])
def test_a_command_that_runs_jobs_says_the_folder_is_busy_in_one_line_and_exits_2(
        cli_env: dict[str, str], argv: list[str]) -> None:
    env = {**cli_env, "DISCORD_TOKEN": "not-a-real-token"}  # `run` needs a platform before it starts the engine
    done = promptpics_beside_a_busy_engine(env, *argv, "--profile", "tiny")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"promptpics: another PromptPics process (pid 4242, started at 2026-12-01 10:00:00) is running on this data "
        f"folder ({cli_env['PROMPTPICS_DATA_DIR']}); stop it first or use another data_dir"]
    assert done.stdout == ""


@pytest.mark.parametrize("argv", [["history"], ["show", "ab12cd"], ["stats"], ["models"],
                                  ["route", "a watercolor fox", "--profile", "tiny"]], ids=lambda a: a[0])
def test_read_only_commands_start_no_engine_and_work_beside_a_busy_one(cli_env: dict[str, str],
                                                                        argv: list[str]) -> None:
    done = promptpics_beside_a_busy_engine(cli_env, *argv)
    assert "another PromptPics process" not in done.stderr and "Traceback" not in done.stderr
    assert done.returncode == (2 if argv[0] == "show" else 0), done.stderr  # show: no such job, said in one line

