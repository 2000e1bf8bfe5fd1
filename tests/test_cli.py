"""The `promptpics` command as a user runs it: a real subprocess on the tiny profile."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from engine.images import read_png_metadata
from tests.conftest import REPO, promptpics


def test_imagine_writes_a_capped_png_with_metadata_and_is_reproducible(cli_env: dict[str, str], tmp_path: Path) -> None:
    outputs = []
    for name in ("x.png", "y.png"):
        out = tmp_path / name
        done = promptpics(cli_env, "--profile", "tiny", "imagine", "a lighthouse at dusk", "--model", "logo_sdxl",
                          "--width", "2000", "--seed", "7", "--steps", "2", "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(out)
        outputs.append(out.read_bytes())
    assert hashlib.sha256(outputs[0]).digest() == hashlib.sha256(outputs[1]).digest()
    image = Image.open(tmp_path / "x.png")
    assert max(image.size) <= 768 and image.size == (768, 768)
    meta = read_png_metadata(outputs[0])
    assert (meta["prompt"], meta["model"], meta["seed"]) == ("a lighthouse at dusk", "logo_sdxl", 7)


def test_imagine_keeps_the_png_in_the_history_and_history_and_show_find_it(cli_env: dict[str, str]) -> None:
    prompt = 'a "quoted" fox 🦊; DROP TABLE jobs;--'
    done = promptpics(cli_env, "--profile", "tiny", "imagine", prompt, "--steps", "1", "--width", "256",
                      "--height", "256", "--seed", "5")
    assert done.returncode == 0, done.stderr
    written = Path(done.stdout.strip())
    assert written.is_relative_to(Path(cli_env["PROMPTPICS_DATA_DIR"]) / "images") and written.is_file()
    assert "1/1 steps" in done.stderr  # progress was shown

    listed = json.loads(promptpics(cli_env, "history", "--json").stdout)
    assert [(j["prompt"], j["status"], j["image"]) for j in listed] == [(prompt, "succeeded", str(written))]
    plain = promptpics(cli_env, "history")
    assert listed[0]["id"] in plain.stdout and "succeeded" in plain.stdout

    shown = promptpics(cli_env, "show", listed[0]["id"])
    assert shown.returncode == 0
    assert f"image:          {written}" in shown.stdout and "seed:           5" in shown.stdout
    as_json = json.loads(promptpics(cli_env, "show", listed[0]["id"], "--json").stdout)
    assert as_json["attempts"][0]["outcome"] == "succeeded" and as_json["steps"] == 1

    missing = promptpics(cli_env, "show", "zzzzzz")
    assert missing.returncode == 2 and "no job `zzzzzz`" in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "500"], "`steps` is 500, but it must be a whole number from 1 to 50"),
        (["--model", "dalle"], "`model` is 'dalle', but it must be 'auto' or one of"),
        (["--width", "10"], "`width` is 10, but it must be at least 256 pixels"),
    ],
)
def test_bad_input_prints_one_clear_line_and_exits_non_zero(cli_env: dict[str, str], args: list[str], message: str) -> None:
    done = promptpics(cli_env, "--profile", "tiny", "imagine", "a fox", *args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"promptpics: {message}")
    assert "Traceback" not in done.stderr


def test_bad_config_stops_with_the_key_value_and_rule(cli_env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((REPO / "config.toml").read_text(encoding="utf-8").replace('device = "auto"', 'device = "tpu"'), encoding="utf-8")
    done = promptpics({**cli_env, "PROMPTPICS_CONFIG": str(bad)}, "models")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "`engine.device` is 'tpu', but it must be one of 'auto', 'cpu', 'cuda' or 'cuda:N'" in done.stderr


def test_models_json_lists_every_model_with_its_settings(cli_env: dict[str, str]) -> None:
    done = promptpics(cli_env, "models", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["id"] for r in rows] == ["flux_dev", "realvis_xl", "sd3_medium", "logo_sdxl"]
    logo = rows[3]
    assert logo["display_name"].startswith("HiDream-I1") and logo["exclusive"] is True and logo["loaded"] is False
    assert logo["weights"] in ("downloaded", "not downloaded")


def test_stats_reports_per_model_counts_from_the_history(cli_env: dict[str, str]) -> None:
    assert "no jobs yet" in promptpics(cli_env, "stats").stdout
    done = promptpics(cli_env, "--profile", "tiny", "imagine", "a fox", "--model", "sd3_medium", "--steps", "1",
                      "--width", "256", "--height", "256")
    assert done.returncode == 0, done.stderr
    rows = json.loads(promptpics(cli_env, "stats", "--json").stdout)
    assert [(r["model_id"], r["count"], r["succeeded"], r["refused"]) for r in rows] == [("sd3_medium", 1, 1, 0)]
    assert rows[0]["mean_generate_s"] > 0
    assert "sd3_medium" in promptpics(cli_env, "stats").stdout
