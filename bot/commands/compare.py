"""/compare, /sweep and /preset: groups of jobs admitted whole, one contact sheet each, and the
picks made on it with number reactions.

A group is submitted with ``Engine.submit_group`` (every seat taken in one step: a /compare
counts as four jobs and is refused whole when they do not fit). Each job is shown like any other
by ``Delivery``; a task per group waits for them all, draws the sheet (bot/sheets.py) and posts
it through the platform's outlet (``post_sheet``), with 1️⃣-9️⃣ under it. A number on a /compare
sheet records the pick (``on_compare_pick``, the routing-feedback hook); on a /sweep sheet an
admin's number makes that tile's steps and guidance the model's preset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bot import messages
from bot.commands.cooldowns import Cooldowns
from bot.commands.data import Actor, Reply
from bot.commands.options import OptionError
from bot.commands.sweeps import PRESET_USAGE, GroupPlan, parse_compare, parse_sweep
from bot.outlet import MessageRef
from bot.settings import BotSettings
from bot.sheets import SheetTile, contact_sheet_blocking, number_emoji, tile_of_emoji
from engine import Engine, EngineError, JobHandle, JobRequest, JobResult, Origin, SheetRecord, StoredJob

log = logging.getLogger(__name__)

JOBS_REMEMBERED = 1000  # the terminal waits for the group jobs it asked for


class Host(Protocol):
    """What the groups need of ``Commands`` (bot/commands/core.py)."""

    engine: Engine
    settings: BotSettings

    def is_admin(self, actor: Actor) -> bool: ...

    def model_name(self, model_id: str) -> str: ...

    def nsfw_allowed(self, origin: Origin, adult_channel: bool) -> bool: ...


class SheetOutlet(Protocol):
    """The part of a platform's outlet that shows sheets (bot/outlet.py's ``Outlet`` plus ``post_sheet``)."""

    platform: str

    async def post_sheet(self, job: StoredJob, sheet_id: str, png: bytes, caption: str) -> MessageRef: ...

    async def add_reactions(self, job: StoredJob, ref: MessageRef, emojis: Sequence[str]) -> None: ...


@dataclass(frozen=True, slots=True)
class ComparePick:
    """Someone picked one model's image on a /compare sheet: a routing label (issue 18's feedback)."""

    sheet_id: str
    job_ids: tuple[str, ...]
    prompt: str
    chosen_model: str
    router_model: str | None  # what the router would have picked, where known
    picked_by: str  # "discord:1234"


def on_compare_pick(pick: ComparePick) -> None:
    """The default listener: one log line (the routing-feedback side adds its own listener)."""
    log.info("compare %s: %s picked %s for %r (jobs %s)", pick.sheet_id, pick.picked_by, pick.chosen_model,
             pick.prompt, ",".join(pick.job_ids))


class Groups:
    """/compare, /sweep, /preset and the reactions on their sheets, for every platform."""

    def __init__(self, host: Host, cooldowns: Cooldowns) -> None:
        self.host, self._cooldowns = host, cooldowns
        self.outlets: dict[str, SheetOutlet] = {}
        self.pick_listeners: list[Callable[[ComparePick], Awaitable[None] | None]] = [on_compare_pick, self._feedback]
        self.jobs: deque[str] = deque(maxlen=JOBS_REMEMBERED)  # group jobs asked for (the terminal waits for them)
        self._tasks: set[asyncio.Task[None]] = set()

    COMMANDS = ("compare", "sweep", "preset", "pick")

    async def _feedback(self, pick: ComparePick) -> None:
        """A pick is routing feedback ("compare_pick", docs/ROUTER.md): once per sheet and person."""
        first = await self.host.engine.history.get_job(pick.job_ids[0]) if pick.job_ids else None
        await self.host.engine.record_feedback(
            "compare_pick", pick.prompt, pick.chosen_model, router_pick=pick.router_model,
            server_id=first.origin.server_id if first is not None else "", job_id=pick.sheet_id, user_key=pick.picked_by)

    async def run_line(self, actor: Actor, name: str, rest: str, origin: Origin) -> Reply:
        """One of ``COMMANDS`` typed as text (the terminal, Slack's ``/promptpics``)."""
        if name == "compare":
            return await self.compare(actor, rest, origin)
        if name == "sweep":
            return await self.sweep(actor, rest, origin)
        if name == "pick":
            return await self.pick_line(actor, rest)
        return await self.preset(actor, rest)

    def add_outlet(self, outlet: object) -> None:
        if hasattr(outlet, "post_sheet"):
            self.outlets[getattr(outlet, "platform")] = outlet  # type: ignore[assignment]

    async def settled(self) -> None:
        """Until every sheet asked for so far is posted (or failed)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- commands --------------------------------------------------------------------------

    async def compare(self, actor: Actor, text: str, origin: Origin, *, seed: int | None = None,
                      adult_channel: bool = False) -> Reply:
        try:
            plan = parse_compare(text, list(self.host.engine.config.models), seed=seed)
        except OptionError as exc:
            return Reply(str(exc), ok=False)
        return await self._submit(actor, plan, origin, adult_channel)

    async def sweep(self, actor: Actor, text: str, origin: Origin, *, adult_channel: bool = False) -> Reply:
        if not self.host.is_admin(actor):
            return Reply(messages.admin_only("sweep"), ok=False)
        try:
            plan = parse_sweep(text, max_tiles=self.host.settings.max_sweep_tiles)
        except OptionError as exc:
            return Reply(str(exc), ok=False)
        return await self._submit(actor, plan, origin, adult_channel)

    async def preset(self, actor: Actor, text: str) -> Reply:
        """``/preset``: the presets in effect; ``/preset reset MODEL``: back to config.toml (admins)."""
        words = text.split()
        presets = self.host.engine.presets
        if not words:
            shown = [f"`{m}` {self.host.model_name(m)}: {p.steps} steps, guidance {p.guidance:g} (set by {p.set_by})"
                     for m in self.host.engine.config.models if presets and (p := presets.get(m))]
            return Reply("Presets over config.toml:\n" + "\n".join(shown) if shown else
                         "No presets: every model runs at config.toml's steps and guidance.")
        if words[0].lower() != "reset" or len(words) != 2:
            return Reply(f"Usage: {PRESET_USAGE}.", ok=False)
        if not self.host.is_admin(actor):
            return Reply(messages.admin_only("preset reset"), ok=False)
        model = words[1].lower()
        if model not in self.host.engine.config.models or presets is None:
            return Reply(f"`model` is {words[1]!r}, but it must be one of: {', '.join(self.host.engine.config.models)}.",
                         ok=False)
        spec = self.host.engine.config.model(model)
        had = await presets.reset(model)
        back = f"{spec.display_name} is back to config.toml's {spec.steps} steps, guidance {spec.guidance:g}"
        return Reply(back + ("." if had else " (it had no preset)."))

    def with_presets(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """/models' rows with each preset's steps and guidance in place of config.toml's."""
        presets = self.host.engine.presets
        if presets is None:
            return rows
        return [{**r, "steps": p.steps, "guidance": p.guidance, "preset": True} if (p := presets.get(r["id"])) else r
                for r in rows]

    # -- a group's life ----------------------------------------------------------------------

    async def _submit(self, actor: Actor, plan: GroupPlan, origin: Origin, adult_channel: bool) -> Reply:
        token: float | None = None
        if not self.host.is_admin(actor):  # taken before the await, like /imagine's
            wait, token = self._cooldowns.take(actor)
            if wait > 0:
                return Reply(messages.cooldown(wait_s=wait, every_s=self._cooldowns.every_s), ok=False)
        nsfw = self.host.nsfw_allowed(origin, adult_channel)
        requests = [JobRequest(prompt=plan.prompt, model=model, negative_prompt=plan.negative, steps=steps,
                               guidance=guidance, width=plan.width, height=plan.height, seed=plan.seed,
                               requester=actor.requester, origin=origin, nsfw_allowed=nsfw)
                    for model, steps, guidance in plan.tiles]
        try:
            handles = await self.host.engine.submit_group(requests)
            sheet = await self.host.engine.presets_store.record_sheet(
                plan.kind, [h.id for h in handles], platform=origin.platform, channel_id=origin.channel_id)
        except EngineError as exc:  # a bad option, the queue or this user's cap: nothing was queued
            self._cooldowns.give_back(actor, token)
            return Reply(exc.user_message, ok=False)
        self.jobs.extend(h.id for h in handles)
        task = asyncio.create_task(self._finish(sheet, plan, handles), name=f"promptpics-sheet-{sheet.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        ids = ", ".join(f"`{h.id}`" for h in handles)
        return Reply(f"{plan.kind.capitalize()} `{sheet.id}`: {len(handles)} jobs queued ({ids}), seed {plan.seed}; "
                     "the contact sheet follows when they are done.")

    async def _finish(self, sheet: SheetRecord, plan: GroupPlan, handles: list[JobHandle]) -> None:
        """Wait for every job, draw the sheet, post it with its number reactions."""
        started = time.perf_counter()
        results = await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)
        wall_s = time.perf_counter() - started
        try:
            tiles = [self._tile(n, plan, h, r) for n, (h, r) in enumerate(zip(handles, results, strict=True), start=1)]
            png = await asyncio.to_thread(contact_sheet_blocking, tiles, columns=plan.columns,
                                          header=self._header(plan, results, wall_s))
            first = await self.host.engine.history.get_job(handles[0].id)
            outlet = self.outlets.get(sheet.platform)
            if first is None or outlet is None:
                log.info("sheet %s: no outlet for %s here; not shown", sheet.id, sheet.platform)
                return
            caption = self._caption(sheet, plan, tiles, handles)
            ref = await outlet.post_sheet(first, sheet.id, png, caption)
            await self.host.engine.presets_store.sheet_posted(sheet.id, channel_id=ref.channel_id,
                                                             message_id=ref.message_id)
            await outlet.add_reactions(first, ref, [number_emoji(n) for n in range(1, len(tiles) + 1)])
        except Exception:  # this task's catch-all: the single images are out; the sheet is not
            log.exception("sheet %s: could not be drawn or posted", sheet.id)

    def _tile(self, n: int, plan: GroupPlan, handle: JobHandle, result: JobResult | BaseException) -> SheetTile:
        p = handle.params
        spec = self.host.engine.config.models.get(p.model_id)
        name = f"{spec.display_name} {spec.emoji}".strip() if spec else p.model_id
        took = (f"{result.timings.generate_s:.1f} s" if isinstance(result, JobResult)
                else f"no image ({type(result).__name__})")
        if plan.kind == "compare":
            return SheetTile(result.png if isinstance(result, JobResult) else None, f"{n} · {name}", took)
        return SheetTile(result.png if isinstance(result, JobResult) else None,
                         f"{n} · {p.steps} steps · guidance {p.guidance:g}", took)

    def _header(self, plan: GroupPlan, results: Sequence[JobResult | BaseException], wall_s: float) -> str:
        busy = sum(r.timings.generate_s for r in results if isinstance(r, JobResult))
        head = plan.prompt if len(plan.prompt) <= 60 else plan.prompt[:59] + "…"
        return f"{head} · seed {plan.seed} · {busy:.1f} s rendering, {wall_s:.1f} s in all"

    def _caption(self, sheet: SheetRecord, plan: GroupPlan, tiles: list[SheetTile], handles: list[JobHandle]) -> str:
        lines = [f"{plan.kind.capitalize()} `{sheet.id}`: “{plan.prompt}”, seed {plan.seed}"]
        lines += [f"{number_emoji(n)} {t.title.split(' · ', 1)[1]} · {t.detail} (job `{h.id}`)"
                  for n, (t, h) in enumerate(zip(tiles, handles, strict=True), start=1)]
        lines.append("React with a number to pick the best." if plan.kind == "compare" else
                     "An admin's number reaction makes that tile the model's preset (/preset reset MODEL undoes it).")
        return "\n".join(lines)

    # -- picks -----------------------------------------------------------------------------

    async def react(self, actor: Actor, emoji: str, *, platform: str, channel_id: str, message_id: str) -> Reply | None:
        """A reaction on a message; None when the message is not a sheet or the emoji not a tile's number."""
        sheet = await self.host.engine.presets_store.sheet_by_message(platform=platform, channel_id=channel_id,
                                                                     message_id=message_id)
        if sheet is None:
            return None
        tile = tile_of_emoji(emoji, len(sheet.job_ids))
        return None if tile is None else await self.pick(actor, sheet, tile)

    async def pick_line(self, actor: Actor, text: str) -> Reply:
        """The terminal's ``/pick SHEET_ID N``."""
        words = text.split()
        sheet = await self.host.engine.presets_store.sheet(words[0].lower()) if words else None
        if sheet is None or len(words) != 2 or not words[1].isdigit():
            return Reply("Usage: /pick SHEET_ID N, for example `/pick s1a2b3 2` (the sheet's id is in its caption).",
                         ok=False)
        tile = int(words[1])
        if not 1 <= tile <= len(sheet.job_ids):
            return Reply(f"`tile` is {tile}, but sheet `{sheet.id}` has tiles 1 to {len(sheet.job_ids)}.", ok=False)
        return await self.pick(actor, sheet, tile)

    async def pick(self, actor: Actor, sheet: SheetRecord, tile: int) -> Reply:
        job = await self.host.engine.history.get_job(sheet.job_ids[tile - 1])
        if job is None:
            return Reply(messages.unknown_job(sheet.job_ids[tile - 1]), ok=False)
        who = f"{actor.platform}:{actor.user_id}"
        p = job.params
        if sheet.kind == "sweep":
            if not self.host.is_admin(actor):
                return Reply(messages.admin_only("sweep"), ok=False)
            presets = self.host.engine.presets
            if presets is None:
                return Reply("The engine is not running; try again in a moment.", ok=False)
            try:
                await presets.set(p.model_id, p.steps, p.guidance, set_by=who)
            except EngineError as exc:
                return Reply(exc.user_message, ok=False)
            await self.host.engine.presets_store.record_pick(sheet.id, tile, picked_by=who)
            return Reply(f"{self.host.model_name(p.model_id)} now runs at {p.steps} steps, guidance {p.guidance:g} "
                         f"when a job sets neither (`/preset reset {p.model_id}` undoes it).")
        await self.host.engine.presets_store.record_pick(sheet.id, tile, picked_by=who)
        pick = ComparePick(sheet.id, sheet.job_ids, p.prompt, p.model_id, None, who)
        for listener in self.pick_listeners:
            try:
                if (pending := listener(pick)) is not None:
                    await pending
            except Exception:
                log.exception("compare %s: a pick listener failed", sheet.id)
        return Reply(f"Noted: {self.host.model_name(p.model_id)} is your pick for sheet `{sheet.id}`.")
