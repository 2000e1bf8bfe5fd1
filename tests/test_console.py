"""The terminal adapter: `promptpics chat` as a piped subprocess, and in-process for the details."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bot.cli.serve import chat
from bot.settings import BotSettings, DiscordSettings, Settings
from engine import Config, JobStatus
from engine.history import HistoryStore
from tests.conftest import REPO, make_tiny_config

JOB_LINE = re.compile(r"^job ([a-z0-9]{6}): ", re.M)


@pytest.fixture
def cli_env(tiny_models: Any, tmp_path: Path) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "tiny-models").symlink_to(tiny_models.root.parent)  # reuse the session's twins
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "SLACK_"))}
    return {**env, "PROMPTPICS_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}


def promptpics(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bot", *args], cwd=REPO, env=env, input=stdin, capture_output=True,
                          text=True, timeout=240)


async def run_chat(config: Config, text: str, **bot: Any) -> tuple[int, str]:
    out = io.StringIO()
    settings = Settings(bot=BotSettings(**bot), discord=DiscordSettings())
    code = await chat(config, settings, stdin=io.StringIO(text), stdout=out, user="tester")
    return code, out.getvalue()


async def stored_jobs(config: Config) -> list[Any]:
    async with HistoryStore.open(config.data_dir) as history:
        return await history.recent_jobs(limit=50)


@pytest.fixture
def config(tiny_models: Any, tmp_path: Path) -> Config:
    return make_tiny_config(tiny_models, tmp_path / "data")


def test_piped_chat_prints_routing_progress_and_the_png_path_then_exits(cli_env: dict[str, str]) -> None:
    done = promptpics(cli_env, "chat", "--profile", "tiny", stdin="/imagine a red fox --steps 2 --size 256x256\n/queue\n")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    job_id = JOB_LINE.search(out)[1]  # type: ignore[index]
    assert f"job {job_id}: 🕒 next in line" in out and "routed: a single subject -> FLUX.1-dev" in out
    assert "step 1/2" in out and "step 2/2" in out
    assert re.search(rf"^#1 {job_id} flux_dev for |^running {job_id} flux_dev for ", out, re.M)  # /queue saw it
    png = Path(out.strip().splitlines()[-1])
    assert png.name == f"{job_id}.png" and png.is_relative_to(Path(cli_env["PROMPTPICS_DATA_DIR"]) / "images")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Traceback" not in done.stderr


async def test_bad_text_options_list_the_valid_ones_create_no_job_and_fail_the_exit_status(config: Config) -> None:
    code, out = await run_chat(config, "/imagine a fox --stepz 3\n/imagine a fox --steps many\n"
                                       "/imagine a fox --size big\n/imagine --steps 2\n/dance\n")
    assert code == 1
    assert "--stepz is not an option I know." in out and "Options: --model ID (auto or a model id); --steps N" in out
    assert "--steps is 'many', but it must be a whole number." in out
    assert "--size is 'big', but it must look like 512x768." in out
    assert "prompt is '', but it must not be empty" in out
    assert "/dance is not a command." in out
    assert await stored_jobs(config) == []


async def test_react_history_and_show_work_across_restarts(config: Config) -> None:
    code, out = await run_chat(config, "a lighthouse --steps 1 --size 64x64 --seed 5 --no fog\n")
    assert code == 0, out
    first = JOB_LINE.search(out)[1]  # type: ignore[index]

    code, out = await run_chat(config, f"/react {first} 🔁\n/react {first} 🧩\n/react {first} 👍\n")
    assert code == 1  # 👍 does nothing here, and says so
    assert "👍 does nothing here; try one of 🔁 ❌ 🎨 📷 🧩 🔤" in out
    jobs = {j.id: j for j in await stored_jobs(config)}
    assert len(jobs) == 3
    made = [j for j in jobs.values() if j.id != first]
    assert all(j.origin.message_ref == first and j.status is JobStatus.SUCCEEDED for j in made)
    assert sorted(j.params.model_id for j in made) == ["flux_dev", "sd3_medium"]
    assert all(j.params.negative_prompt == "fog" and (j.params.width, j.params.height) == (64, 64) for j in made)

    code, out = await run_chat(config, f"/show {first}\n/history\n/react {first} ❌\n/help\n")
    assert code == 0, out
    assert f"Job {first}: succeeded" in out and "seed 5" in out and str(jobs[first].image_path) in out
    assert out.count("succeeded on") == 3  # /history: the three jobs
    assert f"Job {first} is finished; its image stays in the history." in out
    assert "/preload MODEL [on WORKER]: load a model ahead of demand (on one GPU worker) (admins)" in out  # an admin
