"""Model presets and contact sheets, in the history's ``model_presets`` and ``sheets`` tables (schema v6).

A preset is a model's steps and guidance chosen from a /sweep sheet: it stands over config.toml's
defaults for later jobs that set neither, across restarts, until it is reset. A sheet is one
/compare or /sweep: its jobs in tile order, the chat message that shows it, and the tile picked.
Both share the store's connection and its cancel-safe transactions (``engine.presets_store``).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass

from engine.history.store import HistoryStore

SHEET_KINDS = ("compare", "sweep")


@dataclass(frozen=True, slots=True)
class Preset:
    model_id: str
    steps: int
    guidance: float
    set_by: str
    set_at: float


@dataclass(frozen=True, slots=True)
class SheetRecord:
    id: str
    kind: str  # "compare" or "sweep"
    job_ids: tuple[str, ...]  # tile order
    platform: str
    channel_id: str
    message_id: str  # "" until posted
    picked: int | None  # 1-based tile
    picked_by: str | None
    created_at: float


class PresetStore:
    """Presets and sheets on ``store``'s connection."""

    def __init__(self, store: HistoryStore) -> None:
        self._store = store

    # -- presets ----------------------------------------------------------------------------

    async def presets(self) -> dict[str, Preset]:
        rows = await self._store._rows("SELECT * FROM model_presets ORDER BY model_id")
        return {r["model_id"]: Preset(r["model_id"], r["steps"], r["guidance"], r["set_by"], r["set_at"]) for r in rows}

    async def set_preset(self, model_id: str, steps: int, guidance: float, *, set_by: str,
                         set_at: float | None = None) -> Preset:
        preset = Preset(model_id, int(steps), float(guidance), set_by, time.time() if set_at is None else set_at)
        async with self._store._write() as db:
            await db.execute("INSERT INTO model_presets (model_id, steps, guidance, set_by, set_at)"
                             " VALUES (?, ?, ?, ?, ?) ON CONFLICT (model_id) DO UPDATE SET steps = excluded.steps,"
                             " guidance = excluded.guidance, set_by = excluded.set_by, set_at = excluded.set_at",
                             (preset.model_id, preset.steps, preset.guidance, preset.set_by, preset.set_at))
        return preset

    async def reset_preset(self, model_id: str) -> bool:
        """Forget the model's preset; False when it had none."""
        async with self._store._write() as db:
            cursor = await db.execute("DELETE FROM model_presets WHERE model_id = ?", (model_id,))
            return cursor.rowcount > 0

    # -- sheets -----------------------------------------------------------------------------

    async def record_sheet(self, kind: str, job_ids: list[str], *, platform: str, channel_id: str = "",
                           created_at: float | None = None) -> SheetRecord:
        if kind not in SHEET_KINDS:
            raise ValueError(f"kind {kind!r} must be one of {', '.join(SHEET_KINDS)}")
        sheet_id = "s" + secrets.token_hex(3)
        created = time.time() if created_at is None else created_at
        async with self._store._write() as db:
            await db.execute("INSERT INTO sheets (id, kind, job_ids, platform, channel_id, created_at)"
                             " VALUES (?, ?, ?, ?, ?, ?)", (sheet_id, kind, json.dumps(job_ids), platform,
                                                             channel_id, created))
        return SheetRecord(sheet_id, kind, tuple(job_ids), platform, channel_id, "", None, None, created)

    async def sheet_posted(self, sheet_id: str, *, channel_id: str, message_id: str) -> None:
        async with self._store._write() as db:
            await db.execute("UPDATE sheets SET channel_id = ?, message_id = ? WHERE id = ?",
                             (str(channel_id), str(message_id), sheet_id))

    async def sheet(self, sheet_id: str) -> SheetRecord | None:
        return self._one(await self._store._rows("SELECT * FROM sheets WHERE id = ?", (sheet_id,)))

    async def sheet_by_message(self, *, platform: str, channel_id: str, message_id: str) -> SheetRecord | None:
        return self._one(await self._store._rows(
            "SELECT * FROM sheets WHERE platform = ? AND channel_id = ? AND message_id = ?",
            (str(platform), str(channel_id), str(message_id))))

    async def record_pick(self, sheet_id: str, tile: int, *, picked_by: str, picked_at: float | None = None) -> None:
        """The tile someone picked (the latest pick wins)."""
        async with self._store._write() as db:
            await db.execute("UPDATE sheets SET picked = ?, picked_by = ?, picked_at = ? WHERE id = ?",
                             (tile, picked_by, time.time() if picked_at is None else picked_at, sheet_id))

    @staticmethod
    def _one(rows: list[sqlite3.Row]) -> SheetRecord | None:
        if not rows:
            return None
        r = rows[0]
        return SheetRecord(r["id"], r["kind"], tuple(json.loads(r["job_ids"])), r["platform"], r["channel_id"],
                           r["message_id"], r["picked"], r["picked_by"], r["created_at"])
