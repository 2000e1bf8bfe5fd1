"""Readers shared by every config table's parser: each error names the key, the value and the rule.

Kept apart from engine/config.py so the parsers it imports (safety, router, scheduler) can use
them without an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.errors import ConfigError


def table(raw: Mapping[str, Any], key: str, prefix: str = "") -> Mapping[str, Any]:
    """The sub-table ``key`` (empty when absent); anything but a table is refused."""
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(prefix + key, value, "it must be a table ([section])")
    return value


def no_unknown_keys(raw: Mapping[str, Any], prefix: str, known: set[str]) -> None:
    """A typo must never pass silently: every key must be one this table knows."""
    for key in raw:
        if key not in known:
            raise ConfigError(prefix + key, raw[key], f"it is not a known key here (known: {', '.join(sorted(known))})")


def boolean(raw: Mapping[str, Any], key: str, prefix: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(prefix + key, value, "it must be true or false")
    return value
