"""Prompt -> model id, with a reason a user can read and a confidence.

For now the router honours an explicit choice and otherwise answers the default model; the
rules / embeddings / LLM cascade plugs in behind the same ``Router`` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from engine.config import Config


@dataclass(frozen=True, slots=True)
class RouteDecision:
    model_id: str
    reason: str
    confidence: float
    stage: str  # "explicit", "rules", "embeddings", "llm", "default"


class Router(Protocol):
    async def route(self, prompt: str) -> RouteDecision: ...


class DefaultRouter:
    """Always the configured default model (the last resort of every cascade)."""

    def __init__(self, config: Config) -> None:
        self._config = config

    async def route(self, prompt: str) -> RouteDecision:
        model = self._config.model(self._config.default_model)
        return RouteDecision(model.id, "the default model", 0.0, "default")


def explicit_choice(model_id: str, config: Config) -> RouteDecision:
    return RouteDecision(model_id, f"you chose {config.model(model_id).display_name}", 1.0, "explicit")
