"""The traffic the placement planner serves first: each model's share of jobs, from the history
(``HistoryStore.model_shares``) or an admin's ``--shares flux_dev=0.5,realvis_xl=0.3``."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

from engine.errors import ConfigError

RECENT_JOBS = 500  # the history's newest jobs counted; fewer than 20 count every model equally


def parse_shares(text: str, model_ids: Collection[str]) -> dict[str, float]:
    """``id=share,...`` normalised to sum 1 (models not named: 0); raises ``ConfigError`` naming
    the field, the value and the rule."""
    shares: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        mid, sep, value = item.partition("=")
        mid = mid.strip()
        if not sep or not mid:
            raise ConfigError("--shares", item, "each item is model_id=share, e.g. flux_dev=0.5")
        if mid not in model_ids:
            raise ConfigError("--shares", mid, f"not a configured model (one of {', '.join(sorted(model_ids))})")
        if mid in shares:
            raise ConfigError("--shares", mid, "each model may be named once")
        try:
            share = float(value)
        except ValueError:
            share = math.nan
        if not (math.isfinite(share) and share >= 0):
            raise ConfigError(f"--shares {mid}", value.strip(), "a share is a number of 0 or more")
        shares[mid] = share
    total = sum(shares.values())
    if total <= 0:
        raise ConfigError("--shares", text, "at least one share must be more than 0")
    return {mid: share / total for mid, share in shares.items()}


def describe_shares(shares: Mapping[str, float] | None, source: str) -> str:
    """One line for ``promptpics plan`` and the start-up log: which traffic the plan served."""
    if shares is None:
        return f"traffic: every model counted equally ({source})"
    return f"traffic ({source}): " + ", ".join(f"{mid} {share:.0%}" for mid, share in shares.items())
