"""Model presets in effect: config.toml's steps and guidance, overridden per model from the
history's ``model_presets`` (set from a /sweep sheet, undone with /preset reset)."""

from __future__ import annotations

import logging

from engine.config import Config, ModelSpec
from engine.errors import RequestError
from engine.history import HistoryStore
from engine.history.presets import Preset, PresetStore

log = logging.getLogger(__name__)


class ModelPresets:
    """The presets read at start, kept in step with every set and reset (one process owns the folder)."""

    def __init__(self, config: Config, history: HistoryStore) -> None:
        self._config = config
        self.store = PresetStore(history)
        self._presets: dict[str, Preset] = {}

    async def load(self) -> None:
        self._presets = {k: v for k, v in (await self.store.presets()).items() if k in self._config.models}
        if self._presets:
            log.info("model presets over config.toml: %s",
                     ", ".join(f"{p.model_id} {p.steps} steps / {p.guidance:g}" for p in self._presets.values()))

    def get(self, model_id: str) -> Preset | None:
        return self._presets.get(model_id)

    def apply(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` with its preset's steps and guidance, where one is set."""
        preset = self._presets.get(spec.id)
        if preset is None:
            return spec
        return spec.model_copy(update={"steps": preset.steps, "guidance": preset.guidance})

    async def set(self, model_id: str, steps: int, guidance: float, *, set_by: str) -> Preset:
        lim = self._config.limits
        if not lim.min_steps <= steps <= lim.max_steps:
            raise RequestError("steps", steps, f"it must be a whole number from {lim.min_steps} to {lim.max_steps}")
        if not lim.min_guidance <= guidance <= lim.max_guidance:
            raise RequestError("guidance", guidance,
                               f"it must be a number from {lim.min_guidance:g} to {lim.max_guidance:g}")
        preset = await self.store.set_preset(model_id, steps, guidance, set_by=set_by)
        self._presets[model_id] = preset
        log.info("model preset: %s now %d steps / guidance %g (by %s)", model_id, steps, guidance, set_by)
        return preset

    async def reset(self, model_id: str) -> bool:
        had = await self.store.reset_preset(model_id)
        self._presets.pop(model_id, None)
        log.info("model preset: %s back to config.toml (%s)", model_id, "was set" if had else "none was set")
        return had


__all__ = ["ModelPresets"]
