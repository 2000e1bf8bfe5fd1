"""The platform-neutral command catalogue: what every command and reaction does, as plain data.

Adapters translate a platform event into an ``Actor`` (who), an ``Origin`` (where the answer
goes) and a call here; they get back a ``Reply`` (text to show, never sent from here) or a
``Submitted`` job, whose status and result the delivery side posts. Nothing here knows a
platform object, so Discord, Slack and the terminal share every rule: admins, cooldowns,
text options, reactions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

from bot import messages
from bot.commands.compare import Groups
from bot.commands.cooldowns import Cooldowns
from bot.commands.data import Actor, AdminPolicy, ImagineOptions, Outcome, Reply, Submitted
from bot.commands.options import OptionError, parse_imagine_text, text_usage
from bot.commands.reactions import ReactionAction, ReactionKind, normalise_emoji
from bot.commands.scope import Sight, Viewpoint
from bot.settings import BotSettings
from engine import Config, Engine, EngineError, Origin, StoredJob, describe_models

# -- the catalogue -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    usage: str
    summary: str
    admin: bool = False


CATALOGUE: tuple[CommandSpec, ...] = (
    CommandSpec("imagine", "/imagine PROMPT [--model ID] [--steps N] [--guidance G] [--size WxH] [--seed S] [--no TEXT]",
                "make an image"),
    CommandSpec("history", "/history", "your recent jobs in this server"),
    CommandSpec("show", "/show JOB_ID", "one job's settings and outcome (jobs of this server)"),
    CommandSpec("gallery", "/gallery", "a private link to your images on the web (only you can open it)"),
    CommandSpec("react", "/react JOB_ID EMOJI", "what a reaction on a result does (terminal only)"),
    CommandSpec("models", "/models", "the models, what is loaded where, memory", admin=True),
    CommandSpec("queue", "/queue", "the jobs waiting, their positions and ETA", admin=True),
    CommandSpec("stats", "/stats", "per-model timings and safety incidents", admin=True),
    CommandSpec("preload", "/preload MODEL [on WORKER]", "load a model ahead of demand (on one GPU worker)", admin=True),
    CommandSpec("workers", "/workers", "each GPU worker: its card, what is loaded, its job", admin=True),
    CommandSpec("unload", "/unload MODEL", "free a model's memory", admin=True),
    CommandSpec("compare", "/compare PROMPT [--seed S] [--size WxH]", "the prompt on every model, one contact sheet"),
    CommandSpec("pick", "/pick SHEET_ID N", "pick a tile of a sheet (terminal only; elsewhere react 1️⃣-9️⃣)"),
    CommandSpec("sweep", "/sweep PROMPT --model ID --steps 20,24 --guidance 3.5,4.5 [--seed S]",
                "one model at every steps x guidance, one contact sheet", admin=True),
    CommandSpec("preset", "/preset [reset MODEL]", "the presets set from sweeps; reset one to config.toml"),
    CommandSpec("help", "/help", "this list"),
)


# -- the commands --------------------------------------------------------------------------------


@dataclass
class Commands:
    """Every command and reaction, for every platform. One instance per process."""

    engine: Engine
    settings: BotSettings
    admins: Mapping[str, AdminPolicy]  # platform -> who is an admin there
    clock: Callable[[], float] = time.monotonic
    # actor -> (signed URL of their own gallery, expiry); None: no web gallery (bot/cli/webui.py)
    gallery_links: Callable[[Actor], tuple[str, float]] | None = None

    def __post_init__(self) -> None:
        self._cooldowns = Cooldowns(self.settings.cooldown_s, self.clock)
        self.groups = Groups(self, self._cooldowns)  # /compare, /sweep, /preset (bot/commands/compare.py)

    @property
    def config(self) -> Config:
        return self.engine.config

    def is_admin(self, actor: Actor) -> bool:
        policy = self.admins.get(actor.platform)
        return policy is not None and policy.allows(actor)

    def viewpoint(self, actor: Actor, origin: Origin, adult_channel: bool = False) -> Viewpoint:
        """Who asks from where, for /show and /history (bot/commands/scope.py)."""
        policy = self.admins.get(actor.platform)
        return Viewpoint(actor, origin, adult_channel=self.nsfw_allowed(origin, adult_channel),
                         admin=self.is_admin(actor), every_server=policy is not None and policy.every_server)

    def model_name(self, model_id: str) -> str:
        spec = self.config.models.get(model_id)
        return spec.display_name if spec else model_id

    # -- making images ---------------------------------------------------------------------

    def nsfw_allowed(self, origin: Origin, adult_channel: bool) -> bool:
        """The platform's own flag (Discord's age-restricted channels) or config's [safety] allow-list."""
        return adult_channel or self.config.safety.allows_nsfw(origin.platform, origin.channel_id)

    async def imagine(self, actor: Actor, options: ImagineOptions, origin: Origin, *,
                      adult_channel: bool = False) -> Outcome:
        token: float | None = None
        if not self.is_admin(actor):  # checked and taken before the await: concurrent commands cannot both pass
            wait, token = self._cooldowns.take(actor)
            if wait > 0:
                return Reply(messages.cooldown(wait_s=wait, every_s=self._cooldowns.every_s), ok=False)
        try:
            request = options.request(actor, origin, nsfw_allowed=self.nsfw_allowed(origin, adult_channel))
            handle = await self.engine.submit(request)
        except EngineError as exc:  # bad option, queue full, per-user cap: the sentence says why
            self._cooldowns.give_back(actor, token)
            return Reply(exc.user_message, ok=False)
        except BaseException:
            self._cooldowns.give_back(actor, token)
            raise
        return Submitted(handle, Reply(messages.imagine_ack(job_id=handle.id, position=handle.position)))

    async def imagine_text(self, actor: Actor, text: str, origin: Origin) -> Outcome:
        try:
            options = parse_imagine_text(text)
        except OptionError as exc:
            return Reply(messages.option_error(str(exc), text_usage()), ok=False)
        return await self.imagine(actor, options, origin)

    # -- reactions -------------------------------------------------------------------------

    def reaction_action(self, emoji: str) -> ReactionAction | None:
        e = normalise_emoji(emoji)
        if e == normalise_emoji(self.settings.regenerate_emoji):
            return ReactionAction(ReactionKind.REGENERATE)
        if e == normalise_emoji(self.settings.cancel_emoji):
            return ReactionAction(ReactionKind.CANCEL)
        for m in self.config.models.values():
            if m.emoji and e == normalise_emoji(m.emoji):
                return ReactionAction(ReactionKind.SWITCH_MODEL, m.id)
        return None

    def result_reactions(self, model_id: str) -> list[str]:
        """What the bot puts under a result: regenerate, the other models, delete."""
        others = [m.emoji for m in self.config.models.values() if m.emoji and m.id != model_id]
        return [self.settings.regenerate_emoji, *others, self.settings.cancel_emoji]

    def status_reactions(self) -> list[str]:
        return [self.settings.cancel_emoji]

    async def react(self, actor: Actor, job: StoredJob, emoji: str, origin: Origin, *,
                    adult_channel: bool = False) -> Outcome | None:
        """A reaction on a message that shows ``job``. None: not one of ours (ignore it).
        ``origin`` is where a new job's answer goes (its message_ref: the message reacted to)."""
        action = self.reaction_action(emoji)
        if action is None:
            return None
        p = job.params
        if action.kind is ReactionKind.REGENERATE:  # same settings, a new seed
            options = ImagineOptions(p.prompt, p.model_id, p.negative_prompt or None, p.steps, p.guidance,
                                     p.width, p.height, seed=None)
            return await self.imagine(actor, options, origin, adult_channel=adult_channel)
        if action.kind is ReactionKind.SWITCH_MODEL:  # same picture asked of another model, at its own defaults
            await self.engine.record_switch(job, action.model_id or "", f"{actor.platform}:{actor.user_id}")
            options = ImagineOptions(p.prompt, action.model_id, p.negative_prompt or None, None, None,
                                     p.width, p.height, seed=p.seed)
            return await self.imagine(actor, options, origin, adult_channel=adult_channel)
        return await self._cancel_or_delete(actor, job)

    async def _cancel_or_delete(self, actor: Actor, job: StoredJob) -> Reply:
        owner = (job.requester.platform, job.requester.user_id) == (actor.platform, actor.user_id)
        live = self.engine.status(job.id)
        active = live is not None and not live.is_final
        if not owner and not self.is_admin(actor):
            return Reply(messages.not_yours(job.id, "cancel" if active else "delete"), ok=False)
        if active:
            if await self.engine.cancel(job.id):
                return Reply("")  # the status message says "cancelled"
        if not job.status.is_final and not active:
            return Reply(messages.job_not_active(job.id, "finished"), ok=False)
        return Reply("", delete_target=True)

    # -- everyone --------------------------------------------------------------------------

    async def history(self, actor: Actor, origin: Origin, *, adult_channel: bool = False) -> Reply:
        """The asker's recent jobs that they may see from here (bot/commands/scope.py)."""
        view = self.viewpoint(actor, origin, adult_channel)
        jobs = await self.engine.history.recent_jobs(user_id=actor.user_id, platform=actor.platform,
                                                     server_id=view.history_server, limit=self.settings.history_limit)
        return Reply(messages.history_reply([j for j in jobs if view.sight(j) is not Sight.NONE]))

    async def show(self, actor: Actor, job_id: str, origin: Origin, *, adult_channel: bool = False) -> Reply:
        """One job, if the asker may see it from here; another server's job answers like an unknown id."""
        view = self.viewpoint(actor, origin, adult_channel)
        job = await self._visible_job(view, job_id)
        if job is None:
            return Reply(messages.unknown_job(job_id.strip()), ok=False)
        text = messages.show_reply(job, self.model_name(job.params.model_id))
        has_image = job.image_path is not None and job.image_path.is_file()
        if view.sight(job) is Sight.TEXT:
            return Reply(f"{text}\n{messages.image_withheld(job.id)}" if has_image else text)
        return Reply(text, image_path=str(job.image_path) if has_image else None)

    async def _visible_job(self, view: Viewpoint, job_id: str) -> StoredJob | None:
        job = await self.engine.history.get_job(job_id.strip().lower())
        return job if job is not None and view.sight(job) is not Sight.NONE else None

    def gallery(self, actor: Actor) -> Reply:
        """A signed link to the asker's own images (never adult ones: docs/WEB.md)."""
        if self.gallery_links is None:
            return Reply(messages.gallery_off(), ok=False)
        url, expires_at = self.gallery_links(actor)
        return Reply(messages.gallery_link(url, expires_at))

    def help(self, actor: Actor) -> Reply:
        return Reply(messages.help_text(((c.usage, c.summary, c.admin) for c in CATALOGUE), self.is_admin(actor)))

    # -- admins ----------------------------------------------------------------------------

    def _refuse(self, actor: Actor, command: str) -> Reply | None:
        return None if self.is_admin(actor) else Reply(messages.admin_only(command), ok=False)

    async def preload(self, actor: Actor, model: str, worker: str | None = None) -> Reply:
        if refused := self._refuse(actor, "preload"):
            return refused
        try:
            seconds = await self.engine.preload(model.strip(), worker=worker.strip() if worker else None)
        except EngineError as exc:
            return Reply(exc.user_message, ok=False)
        return Reply(messages.preload_done(self.model_name(model.strip().lower()), seconds, worker))

    async def workers(self, actor: Actor) -> Reply:
        if refused := self._refuse(actor, "workers"):
            return refused
        return Reply(messages.workers_reply(self.engine.workers(), self.model_name))

    async def unload(self, actor: Actor, model: str) -> Reply:
        if refused := self._refuse(actor, "unload"):
            return refused
        try:
            was_loaded = await self.engine.unload(model.strip())
        except EngineError as exc:
            return Reply(exc.user_message, ok=False)
        return Reply(messages.unload_done(self.model_name(model.strip().lower()), was_loaded))

    async def models(self, actor: Actor) -> Reply:
        if refused := self._refuse(actor, "models"):
            return refused
        # describe_models looks at the file system (the hub cache): not on the loop.
        rows = await asyncio.to_thread(describe_models, self.config, self.engine.resident_models())
        return Reply(messages.models_reply(self.groups.with_presets(rows)))

    async def queue(self, actor: Actor) -> Reply:
        if refused := self._refuse(actor, "queue"):
            return refused
        entries = self.engine.queue_snapshot()
        return Reply(messages.queue_reply(entries))

    async def stats(self, actor: Actor) -> Reply:
        if refused := self._refuse(actor, "stats"):
            return refused
        stats = await self.engine.history.model_stats()
        text = messages.stats_reply(stats, await self.engine.feedback.switch_away())
        if len(self.engine.workers()) > 1:  # one worker: its lines would repeat the totals
            text += "\n" + messages.worker_stats_reply(await self.engine.history.worker_stats())
        return Reply(text)

    # -- one line of text: the terminal, and Slack's `/promptpics <command>` ------------------

    async def run_line(self, actor: Actor, line: str, origin: Origin) -> Outcome | None:
        """``/name args`` (a line without a slash is an /imagine prompt). None: nothing to do."""
        line = line.strip()
        if not line or line.startswith("#"):
            return None
        if not line.startswith("/"):
            return await self.imagine_text(actor, line, origin)
        name, _, rest = line[1:].partition(" ")
        name, rest = name.lower(), rest.strip()
        simple: dict[str, Callable[[Actor], Awaitable[Reply]]] = {
            "models": self.models, "queue": self.queue, "stats": self.stats, "workers": self.workers,
        }
        if name == "imagine":
            return await self.imagine_text(actor, rest, origin)
        if name == "help":
            return self.help(actor)
        if name == "gallery":
            return self.gallery(actor)
        if name == "history":
            return await self.history(actor, origin)
        if name in simple:
            return await simple[name](actor)
        if name in ("show", "preload", "unload"):
            if not rest:
                usage = next((c.usage for c in CATALOGUE if c.name == name), f"/{name} JOB_ID")
                return Reply(f"`/{name}` needs an argument: {usage}", ok=False)
            if name == "show":
                return await self.show(actor, rest.split()[0], origin)
            if name == "preload":
                return await self._preload_line(actor, rest.split())
            return await self.unload(actor, rest.split()[0])
        if name == "react":
            return await self._react_line(actor, rest, origin)
        if name in self.groups.COMMANDS:  # /compare, /sweep, /preset, /pick
            return await self.groups.run_line(actor, name, rest, origin)
        known = ", ".join(f"/{c.name}" for c in CATALOGUE)
        return Reply(f"`/{name}` is not a command. Commands: {known}.", ok=False)

    async def _preload_line(self, actor: Actor, parts: list[str]) -> Reply:
        """``MODEL`` or ``MODEL on WORKER``."""
        if len(parts) == 1:
            return await self.preload(actor, parts[0])
        if len(parts) == 3 and parts[1].lower() == "on":
            return await self.preload(actor, parts[0], parts[2])
        return Reply("Usage: /preload MODEL [on WORKER], for example `/preload flux_dev on w1`.", ok=False)

    async def _react_line(self, actor: Actor, rest: str, origin: Origin) -> Outcome:
        parts = rest.split()
        if len(parts) != 2:
            return Reply("Usage: /react JOB_ID EMOJI, for example `/react k7mq2x 🔁`.", ok=False)
        job = await self._visible_job(self.viewpoint(actor, origin), parts[0])
        if job is None:
            return Reply(messages.unknown_job(parts[0]), ok=False)
        outcome = await self.react(actor, job, parts[1], replace(origin, message_ref=job.id))
        if outcome is None:
            choices = [self.settings.regenerate_emoji, self.settings.cancel_emoji,
                       *(m.emoji for m in self.config.models.values() if m.emoji)]
            return Reply(f"{parts[1]} does nothing here; try one of {' '.join(choices)}.", ok=False)
        if isinstance(outcome, Reply) and outcome.delete_target:
            return Reply(f"Job `{job.id}` is finished; its image stays in the history.")
        if isinstance(outcome, Reply) and not outcome.text:
            return Reply(messages.cancelled(job.id))
        return outcome
