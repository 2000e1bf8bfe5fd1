"""Configuration: config.toml plus environment overrides, read once and frozen.

    base.py           SettingsModel (frozen, no unknown keys), validate_table and the one
                      translation from pydantic's errors to ConfigError(key, value, rule)
    schema.py         Config, ModelSpec, Limits and every *Settings class, with the defaults
    schema_placement.py  QuantSettings ([models.<id>.quant]), each family's component names
    schema_safety.py  SafetyConfig ([safety] and its sub-tables) and the default term lists
    load.py           find_config_file, load_config, parse_config: toml + env -> Config, and
                      the rules that span tables
    profile.py        the tiny profile (with_tiny_models)
"""

from engine.config.base import FAMILIES, HIDDEN, SettingsModel, Text, broken, validate_table
from engine.config.load import (
    CONFIG_ENV,
    check_config,
    check_router_models,
    check_safety_models,
    find_config_file,
    load_config,
    parse_config,
)
from engine.config.profile import PROFILES, with_tiny_models
from engine.config.schema import (
    DEFAULT_EMBEDDING_MODEL,
    DEFAULT_LLM_ID,
    POLICIES,
    STAGES,
    Config,
    HistorySettings,
    Limits,
    ModelSpec,
    PreviewSettings,
    ResidencySettings,
    RouterConfig,
    RuleSpec,
    SchedulerSettings,
)
from engine.config.schema_cluster import CLUSTER_MODES, ClusterSettings
from engine.config.schema_placement import DENOISER, PLACEMENTS, QUANTS, TEXT_ENCODERS, QuantSettings
from engine.config.schema_safety import (
    DEFAULT_BLOCKED_TERMS,
    DEFAULT_DRUG_TERMS,
    DEFAULT_MINOR_TERMS,
    DEFAULT_NUDENET_THRESHOLDS,
    DEFAULT_REPLACEMENTS,
    NUDENET_CLASSES,
    SafetyConfig,
)

__all__ = [
    "CLUSTER_MODES", "ClusterSettings",
    "DENOISER", "PLACEMENTS", "QUANTS", "TEXT_ENCODERS", "QuantSettings",
    "CONFIG_ENV", "DEFAULT_BLOCKED_TERMS", "DEFAULT_DRUG_TERMS", "DEFAULT_EMBEDDING_MODEL", "DEFAULT_LLM_ID",
    "DEFAULT_MINOR_TERMS", "DEFAULT_NUDENET_THRESHOLDS", "DEFAULT_REPLACEMENTS", "FAMILIES", "HIDDEN",
    "NUDENET_CLASSES", "POLICIES", "PROFILES", "STAGES", "Config", "HistorySettings", "Limits", "ModelSpec",
    "PreviewSettings", "ResidencySettings", "RouterConfig", "RuleSpec", "SafetyConfig", "SchedulerSettings",
    "SettingsModel", "Text", "broken", "check_config", "check_router_models", "check_safety_models",
    "find_config_file", "load_config", "parse_config", "validate_table", "with_tiny_models",
]
