"""What a reaction on a job's message asks for: regenerate, the same picture from another model, cancel or delete."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ReactionKind(enum.Enum):
    REGENERATE = "regenerate"
    SWITCH_MODEL = "switch"
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class ReactionAction:
    kind: ReactionKind
    model_id: str | None = None  # SWITCH_MODEL only


def normalise_emoji(emoji: str) -> str:
    """Clients add or drop the variation selector (U+FE0F); compare without it."""
    return emoji.replace("\ufe0f", "").strip()
