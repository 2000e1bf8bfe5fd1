"""`promptpics doctor`: a verdict and a reason per check; exit 0 only when the setup can serve."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.cli.doctor import _data_checks
from bot.cli.platform_checks import SLACK_SCOPES, platform_checks
from engine import Config, DataFolderLock
from engine.weights import WeightsTarget, weights_state
from tests import fake_discord, fake_slack
from tests.conftest import REPO, promptpics


def test_the_tiny_profile_can_serve_and_json_has_one_key_per_check(cli_env: dict[str, str]) -> None:
    done = promptpics(cli_env, "--profile", "tiny", "doctor", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    checks = report["checks"]
    assert {"python", "torch", "gpu", "tf32", "weights flux_dev", "weights logo_sdxl text encoder", "router LLM",
            "nudenet", "data folder", "data folder lock", "discord token", "slack token"} <= set(checks)
    assert all(c["status"] in ("ok", "warn") and c["detail"] for c in checks.values())
    assert checks["weights flux_dev"]["detail"].startswith("complete")


def test_missing_weights_fail_and_name_promptpics_download(cli_env: dict[str, str], tmp_path: Path) -> None:
    env = {**cli_env, "HF_HOME": str(tmp_path / "empty-hf"), "HF_HUB_CACHE": ""}
    done = promptpics(env, "doctor")
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    flux = next(line for line in lines if "weights flux_dev" in line)
    assert flux.split()[0] == "fail" and "run `promptpics download flux_dev`" in flux
    assert lines[-1].startswith("cannot serve yet: 5 check(s) failed (weights flux_dev,")
    assert "Traceback" not in done.stderr


def test_a_partial_model_folder_says_what_is_missing(tiny_models: Any, tmp_path: Path) -> None:
    folder = tmp_path / "flux"
    shutil.copytree(tiny_models.flux, folder)
    target = WeightsTarget("flux_dev", str(folder), "pipeline")
    assert weights_state(target, tmp_path).status == "complete"
    shutil.rmtree(folder / "transformer")
    state = weights_state(target, tmp_path)
    assert (state.status, state.detail) == ("partial", "1 file(s) missing, such as transformer")
    assert weights_state(WeightsTarget("x", str(tmp_path / "nowhere"), "pipeline"), tmp_path).status == "missing"


def test_the_data_folder_lock_holder_and_a_file_in_its_place_are_named(tmp_path: Path) -> None:
    with DataFolderLock.acquire(tmp_path / "data"):
        held = _data_checks(tmp_path / "data")["data folder lock"]
    assert held.status == "warn" and f"pid {os.getpid()}" in held.detail
    assert _data_checks(tmp_path / "data")["data folder lock"].status == "ok"
    (tmp_path / "file").write_text("x")
    assert _data_checks(tmp_path / "file")["data folder"].status == "fail"


async def test_tokens_are_checked_with_one_call_each_and_skipped_offline(tiny_config: Config) -> None:
    discord, slack = await fake_discord.FakeDiscord().start(), await fake_slack.FakeSlack().start()
    slack.scopes = ("commands", "chat:write", "files:write", "files:read", "reactions:write")
    env = {"DISCORD_TOKEN": fake_discord.BOT_TOKEN, "DISCORD_API_BASE": discord.api_base,
           "SLACK_BOT_TOKEN": fake_slack.BOT_TOKEN, "SLACK_APP_TOKEN": fake_slack.APP_TOKEN,
           "SLACK_API_URL": slack.api_url}
    try:
        checks = await platform_checks(tiny_config, env, offline=False)
        assert checks["discord token"].status == "ok" and "PromptPics" in checks["discord token"].detail
        assert f"client_id={fake_discord.APP_ID}" in checks["discord invite"].detail
        assert checks["slack token"].status == "ok"
        assert (checks["slack scopes"].status, checks["slack scopes"].detail.split(":")[0]) == (
            "fail", "missing reactions")

        refused = await platform_checks(tiny_config, {**env, "DISCORD_TOKEN": "wrong", "SLACK_BOT_TOKEN": "xoxb-wrong"},
                                        offline=False)
        assert refused["discord token"].status == "fail" and "401" in refused["discord token"].detail
        assert refused["slack token"].status == "fail" and "invalid_auth" in refused["slack token"].detail

        calls = len(slack.calls)
        offline = await platform_checks(tiny_config, env, offline=True)
        assert offline["discord token"].detail == "set; not checked (offline)" and len(slack.calls) == calls
    finally:
        await discord.close()
        await slack.close()


def test_the_scopes_checked_are_the_manifests() -> None:
    manifest = yaml.safe_load((REPO / "slack-manifest.yaml").read_text(encoding="utf-8"))
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == SLACK_SCOPES


def test_the_cluster_check_names_what_a_ray_mode_needs(tiny_config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from bot.cli.doctor import _cluster_check
    from engine.config import ClusterSettings

    def with_cluster(**kw: Any) -> Config:
        return tiny_config.model_copy(update={"cluster": ClusterSettings(**kw)})

    assert _cluster_check(tiny_config).status == "ok" and "embedded" in _cluster_check(tiny_config).detail
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    versions = {"ray": "2.60.0"}

    def version(name: str) -> str:
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert _cluster_check(with_cluster(mode="local", workers=2)).status == "ok"
    joining = _cluster_check(with_cluster(mode="cluster", address="head:6379"))
    assert joining.status == "warn" and "RAY_AUTH_MODE=token" in joining.detail
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert _cluster_check(with_cluster(mode="cluster", address="head:6379")).status == "ok"
    versions["ray"] = "2.59.1"
    other = _cluster_check(with_cluster(mode="local"))
    assert other.status == "warn" and "pins 2.60.0" in other.detail
    del versions["ray"]
    missing = _cluster_check(with_cluster(mode="local"))
    assert missing.status == "fail" and "pip install -e '.[cluster]'" in missing.detail


def test_the_quantised_cache_row_says_what_is_kept(tiny_config: Config, tmp_path: Path) -> None:
    from bot.cli.doctor import _quantised_cache_check
    from engine.config import QuantSettings

    assert "not used" in _quantised_cache_check(tiny_config).detail
    flux = tiny_config.model("flux_dev").model_copy(update={"quant": QuantSettings(denoiser="int8")})
    config = tiny_config.model_copy(update={"models": {**tiny_config.models, "flux_dev": flux}})
    assert _quantised_cache_check(config).detail.endswith(
        "flux_dev at its first load (or now: promptpics download flux_dev --quantise)")
    entry = config.data_dir / "quantised" / "flux_dev" / "transformer-int8-0123456789abcdef"
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"x" * 3000)
    (entry / "promptpics-quantised.json").write_text(json.dumps({"format": 1, "files": {"model.safetensors": 3000}}))
    check = _quantised_cache_check(config)
    assert check.status == "ok" and "flux_dev 1 part(s)" in check.detail
    off = config.model_copy(update={"residency": config.residency.model_copy(update={"quantised_cache": False})})
    assert "off (residency.quantised_cache = false)" in _quantised_cache_check(off).detail
