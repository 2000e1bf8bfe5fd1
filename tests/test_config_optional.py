"""Every table of config.toml but `[models.<id>]` may be left out: the defaults apply (docs/CONFIG.md)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bot.settings import load_settings
from engine.config import DEFAULT_LLM_ID, load_config
from tests.conftest import REPO

SHIPPED = (REPO / "config.toml").read_text(encoding="utf-8")
HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.]+)\s*\]\]?")
OPTIONAL_TABLES = ("engine", "limits", "history", "llm", "previews", "safety", "bot", "discord", "scheduler",
                   "residency", "slack", "router", "web")
OPTIONAL_SUBTABLES = ("safety.black", "safety.nudenet", "safety.nudenet.thresholds", "safety.prompt",
                      "safety.prompt.replacements", "safety.rewrite", "router.rules", "router.examples",
                      "router.thresholds")
# [router.patterns] goes with the rules that use it: a rule naming a missing pattern is an error.
TOGETHER = {"router.patterns": ("router.patterns", "router.rules")}


def without_table(text: str, name: str) -> str:
    """The TOML text with the table ``name`` (its sub-tables included) cut out, comments and all else kept."""
    kept: list[str] = []
    dropping = False
    for line in text.splitlines(keepends=True):
        header = HEADER.match(line)
        if header:
            dotted = header.group(1)
            dropping = dotted == name or dotted.startswith(name + ".")
        if not dropping:
            kept.append(line)
    return "".join(kept)


def lookup(raw: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(raw, dict) or part not in raw:
            return None
        raw = raw[part]
    return raw


def write_without(tmp_path: Path, name: str) -> Path:
    text = SHIPPED
    for each in TOGETHER.get(name, (name,)):
        text = without_table(text, each)
    raw = tomllib.loads(text)
    assert lookup(raw, name) is None, f"[{name}] is still there"
    assert raw["models"] == tomllib.loads(SHIPPED)["models"]  # only that table went
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_shipped_config_has_every_table_this_file_removes() -> None:
    raw = tomllib.loads(SHIPPED)
    for name in (*OPTIONAL_TABLES, *OPTIONAL_SUBTABLES, *TOGETHER):
        assert lookup(raw, name) is not None, f"config.toml has no [{name}]: update this test"
    assert set(raw) == {*OPTIONAL_TABLES, "models"}  # a new table: decide whether it is optional, and list it


@pytest.mark.parametrize("name", [*OPTIONAL_TABLES, *OPTIONAL_SUBTABLES, *TOGETHER])
def test_a_config_without_an_optional_table_loads_with_the_defaults(tmp_path: Path, name: str) -> None:
    config = load_config(write_without(tmp_path, name), env={}, profile="tiny")
    assert config.profile == "tiny" and list(config.models) == ["flux_dev", "realvis_xl", "sd3_medium", "logo_sdxl"]
    settings = load_settings(config, {})  # the bot side reads [bot], [discord], [slack]
    assert settings.platforms_with_tokens == []


def test_without_llm_both_llms_default_to_qwen_1_5b(tmp_path: Path) -> None:
    config = load_config(write_without(tmp_path, "llm"), env={}, profile="tiny")
    assert DEFAULT_LLM_ID == "Qwen/Qwen2.5-1.5B-Instruct"
    assert config.router_llm_id == config.rewrite_llm_id == "Qwen/Qwen2.5-1.5B-Instruct"


def test_without_llm_the_environment_still_chooses_the_llms(tmp_path: Path) -> None:
    env = {"ROUTER_LLM_ID": "org/router", "REWRITE_LLM_ID": "org/rewriter"}
    config = load_config(write_without(tmp_path, "llm"), env=env, profile="tiny")
    assert (config.router_llm_id, config.rewrite_llm_id) == ("org/router", "org/rewriter")


def test_a_config_with_only_models_loads(tmp_path: Path) -> None:
    text = SHIPPED
    for name in OPTIONAL_TABLES:
        text = without_table(text, name)
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    assert set(tomllib.loads(text)) == {"models"}
    config = load_config(path, env={}, profile="tiny")
    assert config.router_llm_id == DEFAULT_LLM_ID and config.default_model == "flux_dev"
    assert config.data_dir == tmp_path / "data"  # [engine] data_dir's default, next to the file
    load_settings(config, {})
