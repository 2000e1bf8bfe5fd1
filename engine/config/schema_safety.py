"""The ``[safety]`` table and its parts ([safety.black], .nudenet, .prompt, .rewrite) as one frozen
``SafetyConfig``, with the default term lists. Cross-checks against [models] are in ``load``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from engine.config.base import FAMILIES, SettingsModel, Text, broken

# The classes the NudeNet 3.x ONNX model reports (nudenet/nudenet.py); checked here without
# importing nudenet, which pulls in OpenCV and onnxruntime.
NUDENET_CLASSES = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)

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


def _words(value: Any) -> Any:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v.strip() for v in value):
        raise broken("it must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _families(value: tuple[str, ...]) -> tuple[str, ...]:
    if any(family not in FAMILIES for family in value):
        raise broken(f"each entry must be one of {', '.join(repr(f) for f in FAMILIES)}", list(value))
    return value


def _channels(value: tuple[str, ...]) -> tuple[str, ...]:
    for channel in value:
        platform, _, channel_id = channel.partition(":")
        if not platform or not channel_id:
            raise broken("each entry must be 'platform:channel_id', e.g. 'slack:C0123ABCD'", channel)
    return value


def _terms(value: tuple[str, ...]) -> tuple[str, ...]:
    for term in value:
        if "*" in term[:-1] or not any(c.isalnum() for c in term):
            raise broken("a term must hold a letter or digit, and '*' may only end it", term)
    return tuple(t.casefold() for t in value)


def _thresholds(value: Mapping[str, float]) -> Mapping[str, float]:
    if not value:
        raise broken("it must be a table of CLASS = threshold", {})
    for name, threshold in value.items():
        if name not in NUDENET_CLASSES:
            raise broken(f"the class must be one of NudeNet's: {', '.join(NUDENET_CLASSES)}", threshold, at=f".{name}")
        if not 0.0 <= threshold <= 1.0:
            raise broken("it must be from 0 to 1", threshold, at=f".{name}")
    return MappingProxyType(dict(value))


def _replacements(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType({k.casefold(): v for k, v in value.items()})


Words = Annotated[tuple[str, ...], BeforeValidator(_words)]
Terms = Annotated[tuple[str, ...], BeforeValidator(_words), AfterValidator(_terms)]


class SafetyConfig(SettingsModel):
    enabled: StrictBool = True
    max_attempts: StrictInt = Field(3, ge=1, le=10)  # generations per job, the fallback included
    fallback_model: Text = "flux_dev"
    fallback_families: Annotated[Words, AfterValidator(_families)] = ("hidream",)  # still black -> fallback_model
    # "slack:C0123", "discord:1234": the image NSFW block is skipped there
    nsfw_allowed_channels: Annotated[Words, AfterValidator(_channels)] = ()
    # [safety.black]
    dark_level: StrictInt = Field(10, ge=0, le=255, alias="black.dark_level")  # luminance at or under which a pixel is dark
    dark_fraction: StrictFloat = Field(0.98, ge=0.5, le=1.0, alias="black.dark_fraction")  # this share flags the image
    # > 0: also flag near-constant images of any colour (off: plain backgrounds exist)
    blank_max_std: StrictFloat = Field(0.0, ge=0.0, le=64.0, alias="black.blank_max_std")
    # [safety.nudenet]
    nudenet_enabled: StrictBool = Field(True, alias="nudenet.enabled")
    nudenet_thresholds: Annotated[Mapping[str, StrictFloat], AfterValidator(_thresholds)] = Field(
        default_factory=lambda: DEFAULT_NUDENET_THRESHOLDS, alias="nudenet.thresholds")
    # [safety.prompt]
    prompt_check: StrictBool = Field(True, alias="prompt.enabled")
    blocked_terms: Terms = Field(DEFAULT_BLOCKED_TERMS, alias="prompt.blocked_terms")
    drug_terms: Terms = Field(DEFAULT_DRUG_TERMS, alias="prompt.drug_terms")
    minor_terms: Terms = Field(DEFAULT_MINOR_TERMS, alias="prompt.minor_terms")
    replacements: Annotated[Mapping[str, StrictStr], AfterValidator(_replacements)] = Field(
        default_factory=lambda: DEFAULT_REPLACEMENTS, alias="prompt.replacements")
    # [safety.rewrite]
    use_llm: StrictBool = Field(True, alias="rewrite.use_llm")
    rewrite_max_chars: StrictInt = Field(400, ge=20, le=2000, alias="rewrite.max_chars")
    rewrite_max_new_tokens: StrictInt = Field(96, ge=8, le=512, alias="rewrite.max_new_tokens")
    rewrite_timeout_s: StrictFloat = Field(20.0, ge=0.1, le=600.0, alias="rewrite.timeout_s",
                                           json_schema_extra={"unit": "seconds"})

    def allows_nsfw(self, platform: str, channel_id: str) -> bool:
        """The config allow-list; a Discord adapter also ORs in the channel's age-restricted flag."""
        return f"{platform}:{channel_id}" in self.nsfw_allowed_channels
