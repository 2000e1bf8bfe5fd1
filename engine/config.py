"""Configuration: config.toml plus environment overrides, read once and frozen.

``load_config`` is called by the composition root (``bot.__main__``) and never at import
time. Every rule broken stops start-up with one ``ConfigError`` naming the key, the value
and the rule.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config_fields import boolean, no_unknown_keys, table
from engine.errors import ConfigError
from engine.pipelines.previews import PreviewSettings, parse_previews_config
from engine.residency import ResidencySettings, parse_residency_config
from engine.router_config import RouterConfig, parse_router_config
from engine.scheduler import SchedulerSettings, parse_scheduler_config
from engine.safety.config import SafetyConfig, check_safety_models, parse_safety_config

FAMILIES = ("flux", "sdxl", "sd3", "hidream")
OFFLOAD_MODES = ("none", "model", "sequential")
PROFILES = ("real", "tiny")
CUDA_DTYPES = ("bfloat16", "float16")
CONFIG_ENV = "PROMPTPICS_CONFIG"
PLATFORM_TABLES = ("bot", "discord", "slack")
# Module-level, not read off Config: on a slots dataclass `Config.router_llm_id` is the slot's
# member descriptor, not this string.
DEFAULT_LLM_ID = "Qwen/Qwen2.5-1.5B-Instruct"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    id: str
    display_name: str
    family: str
    source: str  # a hub id or a local folder
    good_at: str
    emoji: str
    steps: int
    guidance: float
    steps_range: tuple[int, int]
    guidance_range: tuple[float, float]
    offload: str = "none"
    exclusive: bool = False
    text_encoder_source: str | None = None  # HiDream: the Llama text encoder, loaded apart


@dataclass(frozen=True, slots=True)
class Limits:
    max_image_side: int = 768
    min_image_side: int = 256
    min_steps: int = 1
    max_steps: int = 50
    min_guidance: float = 0.0
    max_guidance: float = 15.0
    max_prompt_chars: int = 1000
    max_negative_chars: int = 500
    max_queued_jobs: int = 200


@dataclass(frozen=True, slots=True)
class HistorySettings:
    keep_images_days: int = 0  # 0: keep every image; else prune older ones at start-up
    busy_timeout_s: float = 5.0  # how long to wait for a database another process holds


@dataclass(frozen=True, slots=True)
class Config:
    models: dict[str, ModelSpec]  # in config order
    limits: Limits
    profile: str = "real"
    device: str = "auto"
    cuda_dtype: str = "bfloat16"
    data_dir: Path = Path("data")
    default_model: str = "flux_dev"
    default_steps: int = 24
    default_guidance: float = 4.5
    router_llm_id: str = DEFAULT_LLM_ID
    rewrite_llm_id: str = DEFAULT_LLM_ID
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)  # [router]: engine/router_config.py
    history: HistorySettings = HistorySettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    residency: ResidencySettings = ResidencySettings()
    safety: SafetyConfig = dataclasses.field(default_factory=SafetyConfig)
    previews: PreviewSettings = PreviewSettings()
    # [bot], [discord] and [slack] belong to the bot side: kept raw here, validated by bot/.
    platform_tables: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source_file: Path | None = None

    @property
    def tiny_cache_dir(self) -> Path:
        return self.data_dir / "tiny-models"

    def model(self, model_id: str) -> ModelSpec:
        return self.models[model_id]


# -- reading ---------------------------------------------------------------------------------


def find_config_file(explicit: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path:
    """The file to read: --config, then $PROMPTPICS_CONFIG, then ./config.toml, then the repo's."""
    candidates: list[Path] = []
    if explicit:
        candidates = [Path(explicit)]
    elif env.get(CONFIG_ENV):
        candidates = [Path(env[CONFIG_ENV])]
    else:
        candidates = [Path.cwd() / "config.toml", Path(__file__).resolve().parents[1] / "config.toml"]
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
    return parse_config(raw, env, base_dir=file.parent, profile=profile, source_file=file)


def parse_config(
    raw: Mapping[str, Any],
    env: Mapping[str, str],
    *,
    base_dir: Path,
    profile: str | None = None,
    source_file: Path | None = None,
) -> Config:
    no_unknown_keys(raw, "", {"engine", "limits", "llm", "models", "router", "history", "scheduler", "residency", "safety", "previews", *PLATFORM_TABLES})
    engine = table(raw, "engine")
    limits_raw = dict(table(raw, "limits"))
    llm = table(raw, "llm")
    no_unknown_keys(engine, "engine.", {f.name for f in dataclasses.fields(Config)} - {"models", "limits", "router_llm_id", "rewrite_llm_id", "router", "history", "scheduler", "residency", "safety", "previews", "platform_tables", "source_file"})
    no_unknown_keys(limits_raw, "limits.", {f.name for f in dataclasses.fields(Limits)})
    no_unknown_keys(llm, "llm.", {"router_llm_id", "rewrite_llm_id"})

    if "MAX_IMAGE_SIDE" in env:
        limits_raw["max_image_side"] = _int_from_env("MAX_IMAGE_SIDE", env["MAX_IMAGE_SIDE"])
    limits = _parse_limits(limits_raw)

    models_raw = table(raw, "models")
    if not models_raw:
        raise ConfigError("models", {}, "at least one [models.<id>] table is required")
    models = {mid: _parse_model(mid, table(models_raw, mid, "models."), base_dir) for mid in models_raw}
    if env.get("LOGO_SDXL_MODEL_ID") and "logo_sdxl" in models:
        models["logo_sdxl"] = dataclasses.replace(models["logo_sdxl"], source=env["LOGO_SDXL_MODEL_ID"])

    data_dir = Path(env.get("PROMPTPICS_DATA_DIR") or _str(engine, "data_dir", "engine.", "data"))
    config = Config(
        models=models,
        limits=limits,
        profile=profile or env.get("PROMPTPICS_PROFILE") or _str(engine, "profile", "engine.", "real"),
        device=env.get("PROMPTPICS_DEVICE") or _str(engine, "device", "engine.", "auto"),
        cuda_dtype=_str(engine, "cuda_dtype", "engine.", "bfloat16"),
        data_dir=data_dir if data_dir.is_absolute() else (base_dir / data_dir).resolve(),
        default_model=_str(engine, "default_model", "engine.", "flux_dev"),
        default_steps=_int(engine, "default_steps", "engine.", 24),
        default_guidance=_float(engine, "default_guidance", "engine.", 4.5),
        router_llm_id=env.get("ROUTER_LLM_ID") or _str(llm, "router_llm_id", "llm.", DEFAULT_LLM_ID),
        rewrite_llm_id=env.get("REWRITE_LLM_ID") or _str(llm, "rewrite_llm_id", "llm.", DEFAULT_LLM_ID),
        history=_parse_history(table(raw, "history")),
        scheduler=parse_scheduler_config(table(raw, "scheduler")),
        residency=parse_residency_config(table(raw, "residency")),
        safety=parse_safety_config(table(raw, "safety")),
        previews=parse_previews_config(table(raw, "previews")),
        platform_tables={name: dict(table(raw, name)) for name in PLATFORM_TABLES if name in raw},
        router=parse_router_config(table(raw, "router"), list(models)),
        source_file=source_file,
    )
    _validate(config)
    return config


def _parse_limits(raw: Mapping[str, Any]) -> Limits:
    defaults = Limits()
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Limits):
        default = getattr(defaults, f.name)
        reader = _float if isinstance(default, float) else _int
        values[f.name] = reader(raw, f.name, "limits.", default)
    limits = Limits(**values)
    _at_least("limits.min_image_side", limits.min_image_side, 64)
    _at_least("limits.max_image_side", limits.max_image_side, 64)
    if limits.max_image_side > 4096:
        raise ConfigError("limits.max_image_side", limits.max_image_side, "it must be at most 4096")
    for key in ("min_steps", "max_prompt_chars", "max_negative_chars", "max_queued_jobs"):
        _at_least(f"limits.{key}", getattr(limits, key), 1)
    _at_least("limits.min_guidance", limits.min_guidance, 0.0)
    for low, high in (("min_image_side", "max_image_side"), ("min_steps", "max_steps"), ("min_guidance", "max_guidance")):
        if getattr(limits, low) > getattr(limits, high):
            raise ConfigError(f"limits.{low}", getattr(limits, low), f"it must not exceed limits.{high} ({getattr(limits, high)})")
    return limits


def _parse_history(raw: Mapping[str, Any]) -> HistorySettings:
    no_unknown_keys(raw, "history.", {f.name for f in dataclasses.fields(HistorySettings)})
    settings = HistorySettings(
        keep_images_days=_int(raw, "keep_images_days", "history.", 0),
        busy_timeout_s=_float(raw, "busy_timeout_s", "history.", 5.0),
    )
    _at_least("history.keep_images_days", settings.keep_images_days, 0)
    if settings.busy_timeout_s <= 0:
        raise ConfigError("history.busy_timeout_s", settings.busy_timeout_s, "it must be more than 0 seconds")
    return settings


_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelSpec)} - {"id"}


def _parse_model(model_id: str, raw: Mapping[str, Any], base_dir: Path) -> ModelSpec:
    p = f"models.{model_id}."
    no_unknown_keys(raw, p, _MODEL_KEYS)
    if not model_id.replace("_", "").isalnum() or not model_id.islower():
        raise ConfigError(f"models.{model_id}", model_id, "a model id must be lower-case letters, digits and '_'")
    family = _choice(raw, "family", p, FAMILIES, None)
    spec = ModelSpec(
        id=model_id,
        display_name=_str(raw, "display_name", p, model_id),
        family=family,
        source=_source(_str(raw, "source", p, None), base_dir),
        good_at=_str(raw, "good_at", p, ""),
        emoji=_str(raw, "emoji", p, ""),
        steps=_int(raw, "steps", p, None),
        guidance=_float(raw, "guidance", p, None),
        steps_range=_pair(raw, "steps_range", p, int),
        guidance_range=_pair(raw, "guidance_range", p, float),
        offload=_choice(raw, "offload", p, OFFLOAD_MODES, "none"),
        exclusive=boolean(raw, "exclusive", p, False),
        text_encoder_source=_optional_source(raw, "text_encoder_source", p, base_dir),
    )
    if family == "hidream" and not spec.text_encoder_source:
        raise ConfigError(p + "text_encoder_source", None, "a hidream model needs its Llama text encoder (a hub id or folder)")
    return spec


def _validate(config: Config) -> None:
    _choice({"profile": config.profile}, "profile", "engine.", PROFILES, None)
    _choice({"cuda_dtype": config.cuda_dtype}, "cuda_dtype", "engine.", CUDA_DTYPES, None)
    if not (config.device in ("auto", "cpu", "cuda") or config.device.startswith("cuda:") and config.device[5:].isdigit()):
        raise ConfigError("engine.device", config.device, "it must be one of 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if config.default_model not in config.models:
        raise ConfigError("engine.default_model", config.default_model, f"it must be one of the models: {', '.join(config.models)}")
    lim = config.limits
    _within("engine.default_steps", config.default_steps, lim.min_steps, lim.max_steps, "limits.min_steps..limits.max_steps")
    _within("engine.default_guidance", config.default_guidance, lim.min_guidance, lim.max_guidance, "limits.min_guidance..limits.max_guidance")
    for m in config.models.values():
        p = f"models.{m.id}."
        _within(p + "steps", m.steps, lim.min_steps, lim.max_steps, "limits.min_steps..limits.max_steps")
        _within(p + "guidance", m.guidance, lim.min_guidance, lim.max_guidance, "limits.min_guidance..limits.max_guidance")
        if m.steps_range[0] > m.steps_range[1] or m.guidance_range[0] > m.guidance_range[1]:
            bad = "steps_range" if m.steps_range[0] > m.steps_range[1] else "guidance_range"
            raise ConfigError(p + bad, list(getattr(m, bad)), "it must be [low, high] with low <= high")
    check_safety_models(config.safety, {m.id: m.family for m in config.models.values()})
    emojis = [m.emoji for m in config.models.values() if m.emoji]
    if len(emojis) != len(set(emojis)):
        raise ConfigError("models.*.emoji", emojis, "each model needs its own reaction emoji")


# -- small typed readers: each names key, value and rule ------------------------------------

_MISSING = object()


def _get(raw: Mapping[str, Any], key: str, prefix: str, default: Any) -> Any:
    value = raw.get(key, _MISSING)
    if value is _MISSING:
        if default is None:
            raise ConfigError(prefix + key, None, "this key is required")
        return default
    return value


def _str(raw: Mapping[str, Any], key: str, prefix: str, default: str | None) -> str:
    value = _get(raw, key, prefix, default)
    if not isinstance(value, str) or (default is None and not value.strip()):
        raise ConfigError(prefix + key, value, "it must be a non-empty string")
    return value


def _int(raw: Mapping[str, Any], key: str, prefix: str, default: int | None) -> int:
    value = _get(raw, key, prefix, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(prefix + key, value, "it must be a whole number")
    return value


def _float(raw: Mapping[str, Any], key: str, prefix: str, default: float | None) -> float:
    value = _get(raw, key, prefix, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(prefix + key, value, "it must be a number")
    return float(value)




def _choice(raw: Mapping[str, Any], key: str, prefix: str, allowed: tuple[str, ...], default: str | None) -> str:
    value = _get(raw, key, prefix, default)
    if value not in allowed:
        raise ConfigError(prefix + key, value, f"it must be one of {', '.join(repr(a) for a in allowed)}")
    return str(value)


def _pair(raw: Mapping[str, Any], key: str, prefix: str, kind: type) -> tuple[Any, Any]:
    value = _get(raw, key, prefix, None)
    ok = isinstance(value, list) and len(value) == 2 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and (kind is float or isinstance(v, int)) for v in value
    )
    if not ok:
        rule = "it must be a list of two whole numbers [low, high]" if kind is int else "it must be a list of two numbers [low, high]"
        raise ConfigError(prefix + key, value, rule)
    return kind(value[0]), kind(value[1])


def _source(value: str, base_dir: Path) -> str:
    """A local folder (absolute, or starting with . / ~) is resolved; anything else is a hub id."""
    if value.startswith(("./", "../", "~")) or os.path.isabs(value):
        return str((base_dir / Path(value).expanduser()).resolve())
    return value


def _optional_source(raw: Mapping[str, Any], key: str, prefix: str, base_dir: Path) -> str | None:
    if key not in raw:
        return None
    return _source(_str(raw, key, prefix, None), base_dir)






def _int_from_env(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(name, text, "it must be a whole number of pixels") from None


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(key, value, f"it must be at least {low}")


def _within(key: str, value: float, low: float, high: float, where: str) -> None:
    if not low <= value <= high:
        raise ConfigError(key, value, f"it must lie within {where} ({low}..{high})")


def with_tiny_models(config: Config, tiny: Any) -> Config:
    """The ``tiny`` profile: every model id and LLM id points at its locally built twin.

    ``tiny`` is an ``engine.tiny.TinyModels``; the loaders are the production ones.
    """
    by_family = {"flux": tiny.flux, "sdxl": tiny.sdxl, "sd3": tiny.sd3, "hidream": tiny.hidream}
    models = {
        mid: dataclasses.replace(
            m,
            source=str(by_family[m.family]),
            text_encoder_source=str(tiny.hidream_llama) if m.family == "hidream" else None,
        )
        for mid, m in config.models.items()
    }
    return dataclasses.replace(config, models=models, router_llm_id=str(tiny.chat_llm), rewrite_llm_id=str(tiny.chat_llm))
