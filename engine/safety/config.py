"""The ``[safety]`` table of config.toml as one frozen ``SafetyConfig``, validated at start-up.

``parse_safety_config(raw)`` takes the table (a missing table means every default) and raises
``ConfigError`` naming the key, the value and the rule. It imports nothing heavy and nothing
from ``engine.config``, so ``engine.config`` can call it without an import cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from engine.config_fields import boolean, no_unknown_keys, table
from engine.errors import ConfigError

# The classes the NudeNet 3.x ONNX model reports (nudenet/nudenet.py); checked here without
# importing nudenet, which pulls in OpenCV and onnxruntime.
NUDENET_CLASSES = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)
FAMILIES = ("flux", "sdxl", "sd3", "hidream")  # as engine.config.FAMILIES (not imported: no cycle)

DEFAULT_NUDENET_THRESHOLDS: Mapping[str, float] = MappingProxyType({
    "FEMALE_BREAST_EXPOSED": 0.5,
    "FEMALE_GENITALIA_EXPOSED": 0.4,
    "MALE_GENITALIA_EXPOSED": 0.4,
    "BUTTOCKS_EXPOSED": 0.5,
    "ANUS_EXPOSED": 0.4,
})

# A term matches whole words only ("sex" never matches "Essex"); a trailing * matches any ending
# ("porn*" matches "porno", "pornographic"). Words with an everyday meaning ("breast", "sexy",
# "cum") are left to the image check, which sees what was actually drawn.
DEFAULT_BLOCKED_TERMS = (
    "nude", "nudes", "naked", "nudity", "topless", "bottomless", "undressed", "nsfw", "porn*",
    "hentai", "xxx", "erotic*", "sex", "sexual", "intercourse", "genital*", "penis", "vagina",
    "nipples", "boobs", "orgasm*", "masturbat*", "striptease", "stripper", "fetish", "bdsm",
    "gore", "gory", "dismembered", "decapitated", "disembowel*", "mutilated",
)
DEFAULT_DRUG_TERMS = (
    "cocaine", "crack cocaine", "coke", "heroin", "meth", "methamphetamine", "weed", "marijuana", "cannabis",
    "lsd", "mdma", "ecstasy", "molly", "fentanyl", "opium", "snorting",
)
# Never flag alone; together with a blocked term the prompt is refused outright.
DEFAULT_MINOR_TERMS = (
    "child", "children", "kid", "kids", "minor", "minors", "underage", "teen", "teens", "teenager",
    "teenage", "schoolgirl", "schoolboy", "boy", "girl", "baby", "toddler", "loli*", "shota*",
)
# The deterministic sanitiser swaps these for their harmless reading instead of dropping them.
DEFAULT_REPLACEMENTS: Mapping[str, str] = MappingProxyType({
    "coke": "cola", "weed": "garden weeds",
})


@dataclass(frozen=True, slots=True)
class SafetyConfig:
    enabled: bool = True
    max_attempts: int = 3  # generations per job, the fallback included
    fallback_model: str = "flux_dev"
    fallback_families: tuple[str, ...] = ("hidream",)  # still black on these -> fallback_model
    nsfw_allowed_channels: tuple[str, ...] = ()  # "slack:C0123", "discord:1234": image NSFW block skipped
    # [safety.black]
    dark_level: int = 10  # 0-255 luminance at or under which a pixel counts as dark
    dark_fraction: float = 0.98  # this share of dark pixels flags the image
    blank_max_std: float = 0.0  # > 0: also flag near-constant images of any colour (off: plain backgrounds exist)
    # [safety.nudenet]
    nudenet_enabled: bool = True
    nudenet_thresholds: Mapping[str, float] = field(default_factory=lambda: DEFAULT_NUDENET_THRESHOLDS)
    # [safety.prompt]
    prompt_check: bool = True
    blocked_terms: tuple[str, ...] = DEFAULT_BLOCKED_TERMS
    drug_terms: tuple[str, ...] = DEFAULT_DRUG_TERMS
    minor_terms: tuple[str, ...] = DEFAULT_MINOR_TERMS
    replacements: Mapping[str, str] = field(default_factory=lambda: DEFAULT_REPLACEMENTS)
    # [safety.rewrite]
    use_llm: bool = True
    rewrite_max_chars: int = 400
    rewrite_max_new_tokens: int = 96
    rewrite_timeout_s: float = 20.0

    def allows_nsfw(self, platform: str, channel_id: str) -> bool:
        """The config allow-list; a Discord adapter also ORs in the channel's age-restricted flag."""
        return f"{platform}:{channel_id}" in self.nsfw_allowed_channels


# -- parsing ---------------------------------------------------------------------------------

_TOP = {"enabled", "max_attempts", "fallback_model", "fallback_families", "nsfw_allowed_channels",
        "black", "nudenet", "prompt", "rewrite"}
_BLACK = {"dark_level", "dark_fraction", "blank_max_std"}
_NUDENET = {"enabled", "thresholds"}
_PROMPT = {"enabled", "blocked_terms", "drug_terms", "minor_terms", "replacements"}
_REWRITE = {"use_llm", "max_chars", "max_new_tokens", "timeout_s"}


def parse_safety_config(raw: Mapping[str, Any] | None) -> SafetyConfig:
    """``raw`` is the ``[safety]`` table (``None`` or missing keys: the defaults)."""
    raw = table({"safety": raw or {}}, "safety", "")
    no_unknown_keys(raw, "safety.", _TOP)
    d = SafetyConfig()
    black, nudenet = table(raw, "black", "safety."), table(raw, "nudenet", "safety.")
    prompt, rewrite = table(raw, "prompt", "safety."), table(raw, "rewrite", "safety.")
    no_unknown_keys(black, "safety.black.", _BLACK)
    no_unknown_keys(nudenet, "safety.nudenet.", _NUDENET)
    no_unknown_keys(prompt, "safety.prompt.", _PROMPT)
    no_unknown_keys(rewrite, "safety.rewrite.", _REWRITE)
    config = dataclasses.replace(
        d,
        enabled=boolean(raw, "enabled", "safety.", d.enabled),
        max_attempts=_number(raw, "max_attempts", "safety.", d.max_attempts, int, 1, 10),
        fallback_model=_text(raw, "fallback_model", "safety.", d.fallback_model),
        fallback_families=_words(raw, "fallback_families", "safety.", d.fallback_families),
        nsfw_allowed_channels=_channels(raw, d.nsfw_allowed_channels),
        dark_level=_number(black, "dark_level", "safety.black.", d.dark_level, int, 0, 255),
        dark_fraction=_number(black, "dark_fraction", "safety.black.", d.dark_fraction, float, 0.5, 1.0),
        blank_max_std=_number(black, "blank_max_std", "safety.black.", d.blank_max_std, float, 0.0, 64.0),
        nudenet_enabled=boolean(nudenet, "enabled", "safety.nudenet.", d.nudenet_enabled),
        nudenet_thresholds=_thresholds(nudenet, d.nudenet_thresholds),
        prompt_check=boolean(prompt, "enabled", "safety.prompt.", d.prompt_check),
        blocked_terms=_terms(prompt, "blocked_terms", d.blocked_terms),
        drug_terms=_terms(prompt, "drug_terms", d.drug_terms),
        minor_terms=_terms(prompt, "minor_terms", d.minor_terms),
        replacements=_replacements(prompt, d.replacements),
        use_llm=boolean(rewrite, "use_llm", "safety.rewrite.", d.use_llm),
        rewrite_max_chars=_number(rewrite, "max_chars", "safety.rewrite.", d.rewrite_max_chars, int, 20, 2000),
        rewrite_max_new_tokens=_number(rewrite, "max_new_tokens", "safety.rewrite.", d.rewrite_max_new_tokens,
                                       int, 8, 512),
        rewrite_timeout_s=_number(rewrite, "timeout_s", "safety.rewrite.", d.rewrite_timeout_s, float, 0.1, 600.0),
    )
    for family in config.fallback_families:
        if family not in FAMILIES:
            raise ConfigError("safety.fallback_families", list(config.fallback_families),
                              f"each entry must be one of {', '.join(repr(f) for f in FAMILIES)}")
    return config


def check_safety_models(config: SafetyConfig, families: Mapping[str, str]) -> None:
    """Cross-check against ``[models]`` (``families``: model id -> family); call after both parse."""
    if config.fallback_model not in families:
        raise ConfigError("safety.fallback_model", config.fallback_model,
                          f"it must be one of the models: {', '.join(families)}")
    if families[config.fallback_model] in config.fallback_families:
        raise ConfigError("safety.fallback_model", config.fallback_model,
                          "it must not be of a family in safety.fallback_families (it would fall back to itself)")


# -- small readers: each names key, value and rule --------------------------------------------








def _number(raw: Mapping[str, Any], key: str, prefix: str, default: Any, kind: type, low: float, high: float) -> Any:
    value = raw.get(key, default)
    ok = not isinstance(value, bool) and (isinstance(value, int) if kind is int else isinstance(value, int | float))
    if not ok:
        raise ConfigError(prefix + key, value, "it must be a whole number" if kind is int else "it must be a number")
    if not low <= value <= high:
        raise ConfigError(prefix + key, value, f"it must lie within {low:g}..{high:g}")
    return kind(value)


def _text(raw: Mapping[str, Any], key: str, prefix: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(prefix + key, value, "it must be a non-empty string")
    return value


def _words(raw: Mapping[str, Any], key: str, prefix: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = raw.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(prefix + key, value, "it must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _channels(raw: Mapping[str, Any], default: tuple[str, ...]) -> tuple[str, ...]:
    channels = _words(raw, "nsfw_allowed_channels", "safety.", default)
    for channel in channels:
        platform, _, channel_id = channel.partition(":")
        if not platform or not channel_id:
            raise ConfigError("safety.nsfw_allowed_channels", channel,
                              "each entry must be 'platform:channel_id', e.g. 'slack:C0123ABCD'")
    return channels


def _terms(raw: Mapping[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    terms = _words(raw, key, "safety.prompt.", default)
    for term in terms:
        if "*" in term[:-1] or not any(c.isalnum() for c in term):
            raise ConfigError(f"safety.prompt.{key}", term,
                              "a term must hold a letter or digit, and '*' may only end it")
    return tuple(t.casefold() for t in terms)


def _thresholds(raw: Mapping[str, Any], default: Mapping[str, float]) -> Mapping[str, float]:
    value = raw.get("thresholds", default)
    if not isinstance(value, Mapping) or not value:
        raise ConfigError("safety.nudenet.thresholds", value, "it must be a table of CLASS = threshold")
    for name, threshold in value.items():
        if name not in NUDENET_CLASSES:
            raise ConfigError(f"safety.nudenet.thresholds.{name}", threshold,
                              f"the class must be one of NudeNet's: {', '.join(NUDENET_CLASSES)}")
        _number(value, name, "safety.nudenet.thresholds.", None, float, 0.0, 1.0)
    return MappingProxyType({k: float(v) for k, v in value.items()})


def _replacements(raw: Mapping[str, Any], default: Mapping[str, str]) -> Mapping[str, str]:
    value = raw.get("replacements", default)
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError("safety.prompt.replacements", value, "it must be a table of term = \"replacement\"")
    return MappingProxyType({k.casefold(): v for k, v in value.items()})
