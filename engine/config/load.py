"""config.toml plus environment overrides -> one validated, frozen ``Config``.

``load_config`` is called by the composition root (``bot.cli``) and never at import time.
Every rule broken stops start-up with one ``ConfigError`` naming the key, the value and the
rule: the schema's own rules through ``validate_table``, the rules that span tables here.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from engine.config.base import validate_table
from engine.config.schema import Config, RouterConfig, is_local_source
from engine.config.schema_safety import SafetyConfig
from engine.errors import ConfigError

CONFIG_ENV = "PROMPTPICS_CONFIG"
PLATFORM_TABLES = ("bot", "discord", "slack", "web")
# Environment variable -> (table, key) it overrides; the error then names the variable.
ENV_OVERRIDES = {
    "PROMPTPICS_PROFILE": ("engine", "profile"),
    "PROMPTPICS_DEVICE": ("engine", "device"),
    "PROMPTPICS_DATA_DIR": ("engine", "data_dir"),
    "ROUTER_LLM_ID": ("llm", "router_llm_id"),
    "REWRITE_LLM_ID": ("llm", "rewrite_llm_id"),
}


def find_config_file(explicit: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path:
    """The file to read: --config, then $PROMPTPICS_CONFIG, then ./config.toml, then the repo's."""
    candidates: list[Path] = []
    if explicit:
        candidates = [Path(explicit)]
    elif env.get(CONFIG_ENV):
        candidates = [Path(env[CONFIG_ENV])]
    else:
        candidates = [Path.cwd() / "config.toml", Path(__file__).resolve().parents[2] / "config.toml"]
    for path in candidates:
        if path.is_file():
            return path
    key = "--config" if explicit else CONFIG_ENV if env.get(CONFIG_ENV) else "config file"
    raise ConfigError(key, str(candidates[0]), "no such file exists")


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    profile: str | None = None,
) -> Config:
    """Read, override from the environment, validate. ``profile`` (the CLI flag) wins over all."""
    env = os.environ if env is None else env
    file = find_config_file(path, env)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(file), "(unreadable)", f"the file must be valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(file), "(unreadable)", f"the file must be UTF-8 text (byte {exc.start} is "
                                                     f"{exc.object[exc.start:exc.start + 1]!r})") from None
    except OSError as exc:
        raise ConfigError(str(file), "(unreadable)", f"the file must be readable ({exc.strerror})") from None
    return parse_config(raw, env, base_dir=file.parent, profile=profile, source_file=file)


def parse_config(
    raw: Mapping[str, Any],
    env: Mapping[str, str],
    *,
    base_dir: Path,
    profile: str | None = None,
    source_file: Path | None = None,
) -> Config:
    """The raw TOML tables, the environment and the file's folder -> a checked ``Config``."""
    tables, sources = _with_environment(raw, env, profile)
    tables["platform_tables"] = {name: tables.pop(name) for name in PLATFORM_TABLES if name in tables}
    for name, table in tables["platform_tables"].items():
        if not isinstance(table, Mapping):
            raise ConfigError(name, table, "it must be a table ([section])")
    tables["source_file"] = source_file
    try:
        config = validate_table(Config, tables, "", sources=sources, context={"base_dir": base_dir})
    except ConfigError as exc:
        if exc.key != "models.logo_sdxl.source" or not env.get("LOGO_SDXL_MODEL_ID"):
            raise
        raise ConfigError("LOGO_SDXL_MODEL_ID", exc.value, exc.rule) from None
    check_config(config)
    return config


def _with_environment(raw: Mapping[str, Any], env: Mapping[str, str],
                      profile: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """A copy of ``raw`` with the environment's overrides written in; ``sources``: which came from where."""
    tables = {name: dict(value) if isinstance(value, Mapping) else value for name, value in raw.items()}
    sources: dict[str, str] = {}
    overrides: dict[str, Any] = {variable: env[variable] for variable in ENV_OVERRIDES if env.get(variable)}
    if "MAX_IMAGE_SIDE" in env:
        overrides["MAX_IMAGE_SIDE"] = _whole_pixels("MAX_IMAGE_SIDE", env["MAX_IMAGE_SIDE"])
    for variable, value in overrides.items():
        table, key = ENV_OVERRIDES.get(variable, ("limits", "max_image_side"))
        if isinstance(tables.setdefault(table, {}), dict):
            tables[table][key] = value
            if table in ("engine", "llm"):
                sources[f"{table}.{key}"] = variable
    logo = tables.get("models", {}).get("logo_sdxl") if isinstance(tables.get("models"), Mapping) else None
    if env.get("LOGO_SDXL_MODEL_ID") and isinstance(logo, Mapping):
        # Checked like the file's own source; a folder given here is relative to where the command runs.
        source = env["LOGO_SDXL_MODEL_ID"].strip()
        if is_local_source(source):
            source = str(Path(source).expanduser().resolve())
        tables["models"] = {**tables["models"], "logo_sdxl": {**logo, "source": source}}
    if profile:
        tables.setdefault("engine", {})["profile"] = profile
        sources.pop("engine.profile", None)
    return tables, sources


def _whole_pixels(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(name, text, "it must be a whole number of pixels") from None


# -- rules that span tables ------------------------------------------------------------------


def check_config(config: Config) -> None:
    """Every rule that needs two tables at once; the first broken one is raised."""
    _check_limits(config)
    if config.default_model not in config.models:
        raise ConfigError("engine.default_model", config.default_model, f"it must be one of the models: {', '.join(config.models)}")
    lim = config.limits
    steps, guidance = "limits.min_steps..limits.max_steps", "limits.min_guidance..limits.max_guidance"
    _within("engine.default_steps", config.default_steps, lim.min_steps, lim.max_steps, steps)
    _within("engine.default_guidance", config.default_guidance, lim.min_guidance, lim.max_guidance, guidance)
    for m in config.models.values():
        _within(f"models.{m.id}.steps", m.steps, lim.min_steps, lim.max_steps, steps)
        _within(f"models.{m.id}.guidance", m.guidance, lim.min_guidance, lim.max_guidance, guidance)
    check_safety_models(config.safety, {m.id: m.family for m in config.models.values()})
    check_router_models(config.router, list(config.models))
    emojis = [m.emoji for m in config.models.values() if m.emoji]
    if len(emojis) != len(set(emojis)):
        raise ConfigError("models.*.emoji", emojis, "each model needs its own reaction emoji")


def _check_limits(config: Config) -> None:
    limits = config.limits
    for low, high in (("min_image_side", "max_image_side"), ("min_steps", "max_steps"), ("min_guidance", "max_guidance")):
        if getattr(limits, low) > getattr(limits, high):
            raise ConfigError(f"limits.{low}", getattr(limits, low), f"it must not exceed limits.{high} ({getattr(limits, high)})")


def check_safety_models(config: SafetyConfig, families: Mapping[str, str]) -> None:
    """Cross-check against ``[models]`` (``families``: model id -> family)."""
    if config.fallback_model not in families:
        raise ConfigError("safety.fallback_model", config.fallback_model,
                          f"it must be one of the models: {', '.join(families)}")
    if families[config.fallback_model] in config.fallback_families:
        raise ConfigError("safety.fallback_model", config.fallback_model,
                          "it must not be of a family in safety.fallback_families (it would fall back to itself)")


def check_router_models(router: RouterConfig, model_ids: Collection[str]) -> None:
    """Every model a rule, an example list or a threshold names must be configured."""
    known = f"it must be one of the models: {', '.join(model_ids)}"
    for i, rule in enumerate(router.rules):
        if rule.model not in model_ids:
            raise ConfigError(f"router.rules[{i}].model", rule.model, known)
    for table in ("examples", "thresholds"):
        for model in getattr(router, table):
            if model not in model_ids:
                raise ConfigError(f"router.{table}.{model}", model, known)


def _within(key: str, value: float, low: float, high: float, where: str) -> None:
    if not low <= value <= high:
        raise ConfigError(key, value, f"it must lie within {where} ({low}..{high})")
