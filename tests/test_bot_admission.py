"""The bot's side of admission: the cooldown is checked and taken in one step, so commands and
reactions fired at once cannot pass it, and a refused job gives it back. Real Engine, real history."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bot.commands import Actor, AdminPolicy, Commands, ImagineOptions, Reply, Submitted
from bot.settings import BotSettings
from engine import Origin
from tests.conftest import make_tiny_config
from tests.test_scheduler import GatedEngine, ask

ALICE = Actor("chat", "alice", "Alice")
HERE = Origin("chat", "room-1")
WAIT = 60


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def commands_for(engine: Any, cooldown_s: float, clock: Clock) -> Commands:
    admins = {"chat": AdminPolicy(user_ids=frozenset({"root"}))}
    return Commands(engine, BotSettings(cooldown_s=cooldown_s), admins, clock=clock)


def engine_with_caps(tiny_models: Any, data_dir: Path, per_user: int) -> GatedEngine:
    config = make_tiny_config(tiny_models, data_dir)
    return GatedEngine(config.model_copy(update={"scheduler": config.scheduler.model_copy(update={"max_queued_per_user": per_user})}))


async def test_eight_concurrent_imagines_pass_the_cooldown_once(tiny_models: Any, tmp_path: Path) -> None:
    gated, clock = engine_with_caps(tiny_models, tmp_path / "data", per_user=10), Clock()
    async with gated.engine as engine:
        busy = await gated.started(ask("flux_dev", "first"))
        commands = commands_for(engine, 30, clock)
        options = ImagineOptions("a fox", model="flux_dev", steps=1, width=64, height=64)
        outcomes = await asyncio.wait_for(asyncio.gather(*(commands.imagine(ALICE, options, HERE) for _ in range(8))), WAIT)
        submitted = [o for o in outcomes if isinstance(o, Submitted)]
        assert len(submitted) == 1
        assert all(isinstance(o, Reply) and "Please wait" in o.text for o in outcomes if o not in submitted)
        gated.gate.set()
        assert (await busy.result()).png and (await submitted[0].handle.result()).png


async def test_quick_regenerate_reactions_pass_neither_the_cooldown_nor_the_cap(tiny_models: Any,
                                                                                tmp_path: Path) -> None:
    gated, clock = engine_with_caps(tiny_models, tmp_path / "data", per_user=2), Clock()
    async with gated.engine as engine:
        busy = await gated.started(ask("flux_dev", "first"))
        job = await engine.history.get_job(busy.id)
        assert job is not None
        for cooldown_s, accepted in ((30, 1), (0, 2)):  # with a cooldown: one; without: the per-user cap
            commands = commands_for(engine, cooldown_s, clock)
            actor = Actor("chat", f"reactor-{cooldown_s}", "R")
            outcomes = await asyncio.wait_for(asyncio.gather(*(commands.react(actor, job, "🔁", HERE)
                                                              for _ in range(5))), WAIT)
            assert sum(isinstance(o, Submitted) for o in outcomes) == accepted, outcomes
        gated.gate.set()
        assert (await busy.result()).png


async def test_a_job_the_engine_refuses_gives_the_cooldown_back(tiny_models: Any, tmp_path: Path) -> None:
    gated, clock = engine_with_caps(tiny_models, tmp_path / "data", per_user=1), Clock()
    async with gated.engine as engine:
        busy = await gated.started(ask("flux_dev", "first"))
        commands = commands_for(engine, 0.001, clock)
        options = ImagineOptions("a fox", model="flux_dev", steps=1, width=64, height=64)
        first = await commands.imagine(ALICE, options, HERE)
        assert isinstance(first, Submitted)
        commands._cooldowns.every_s = 30  # from now on a cooldown applies...
        clock.now += 100  # ...and the last one is long over
        refused = await commands.imagine(ALICE, options, HERE)  # the engine's per-user cap refuses it
        assert isinstance(refused, Reply) and "You already have 1 jobs waiting" in refused.text
        assert commands._cooldowns.wait_s(ALICE) == 0  # the refused job did not start a new cooldown
        gated.gate.set()
        assert (await busy.result()).png and (await first.handle.result()).png
