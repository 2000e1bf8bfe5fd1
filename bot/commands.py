"""The platform-neutral command catalogue: what every command and reaction does, as plain data.

Adapters translate a platform event into an ``Actor`` (who), an ``Origin`` (where the answer
goes) and a call here; they get back a ``Reply`` (text to show, never sent from here) or a
``Submitted`` job, whose status and result the delivery side posts. Nothing here knows a
platform object, so Discord, Slack and the terminal share every rule: admins, cooldowns,
text options, reactions.
"""

from __future__ import annotations

import asyncio
import enum
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

from bot import messages
from bot.settings import BotSettings
from engine import Config, Engine, EngineError, JobHandle, JobRequest, Origin, Requester, StoredJob
from engine.models_info import describe_models

# -- plain data ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Actor:
    """Who is asking: plain strings from the platform, role ids where the platform has roles."""

    platform: str
    user_id: str
    display_name: str = ""
    role_ids: frozenset[str] = frozenset()

    @property
    def requester(self) -> Requester:
        return Requester(platform=self.platform, user_id=self.user_id, display_name=self.display_name)


@dataclass(frozen=True, slots=True)
class AdminPolicy:
    """Who may run admin commands on one platform: listed user ids or role ids (or everyone)."""

    user_ids: frozenset[str] = frozenset()
    role_ids: frozenset[str] = frozenset()
    everyone: bool = False  # the terminal: whoever holds it owns the machine

    def allows(self, actor: Actor) -> bool:
        return self.everyone or actor.user_id in self.user_ids or bool(actor.role_ids & self.role_ids)


@dataclass(frozen=True, slots=True)
class ImagineOptions:
    """/imagine's options as the user gave them; ``None`` means "use the default"."""

    prompt: str
    model: str | None = None
    negative: str | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None

    def request(self, actor: Actor, origin: Origin, *, nsfw_allowed: bool = False) -> JobRequest:
        return JobRequest(prompt=self.prompt, model=self.model, negative_prompt=self.negative, steps=self.steps,
                          guidance=self.guidance, width=self.width, height=self.height, seed=self.seed,
                          requester=actor.requester, origin=origin, nsfw_allowed=nsfw_allowed)


@dataclass(frozen=True, slots=True)
class Reply:
    """Text for the one who asked (adapters show it privately where they can)."""

    text: str
    ok: bool = True  # False: refused or failed; the terminal's exit status counts these
    image_path: str | None = None  # /show: the job's PNG, for adapters that attach it
    delete_target: bool = False  # a reaction asked to delete the message it was put on


@dataclass(frozen=True, slots=True)
class Submitted:
    handle: JobHandle
    reply: Reply


Outcome = Submitted | Reply


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    usage: str
    summary: str
    admin: bool = False


CATALOGUE: tuple[CommandSpec, ...] = (
    CommandSpec("imagine", "/imagine PROMPT [--model ID] [--steps N] [--guidance G] [--size WxH] [--seed S] [--no TEXT]",
                "make an image"),
    CommandSpec("history", "/history", "your recent jobs"),
    CommandSpec("show", "/show JOB_ID", "one job's settings and outcome"),
    CommandSpec("react", "/react JOB_ID EMOJI", "what a reaction on a result does (terminal only)"),
    CommandSpec("models", "/models", "the models, what is loaded where, memory", admin=True),
    CommandSpec("queue", "/queue", "the jobs waiting, their positions and ETA", admin=True),
    CommandSpec("stats", "/stats", "per-model timings and safety incidents", admin=True),
    CommandSpec("preload", "/preload MODEL", "load a model ahead of demand", admin=True),
    CommandSpec("unload", "/unload MODEL", "free a model's memory", admin=True),
    CommandSpec("help", "/help", "this list"),
)


# -- text options: `/imagine a fox --steps 4 --size 512x512 --no blur` --------------------------


class OptionError(ValueError):
    """A text option that cannot be read; ``str(exc)`` is the sentence for the user."""


TEXT_FLAGS: dict[str, str] = {
    "--model": "ID (auto or a model id)",
    "--steps": "N (whole number)",
    "--guidance": "G (number)",
    "--size": "WxH (e.g. 512x768)",
    "--width": "W (pixels)",
    "--height": "H (pixels)",
    "--seed": "S (whole number)",
    "--no": "TEXT (what the image should not show; may be several words)",
}
_FLAG_ALIASES = {"--negative": "--no", "--neg": "--no", "--ar": "--size"}
_DASHES = ("—", "–", "−")  # phones and Slack turn "--" into an em dash
_SIZE = re.compile(r"(\d+)\s*[x×X*]\s*(\d+)")


def text_usage() -> str:
    flags = "; ".join(f"{flag} {what}" for flag, what in TEXT_FLAGS.items())
    return f"Usage: /imagine PROMPT [options]. Options: {flags}."


def _as_flag(token: str) -> str | None:
    """'--steps', '—steps' or '--steps=4' -> '--steps'; a plain word -> None."""
    word = token.split("=", 1)[0].lower()
    for dash in _DASHES:
        if word.startswith(dash) and len(word) > 1:
            word = "--" + word[1:]
    if not word.startswith("--") or len(word) < 3:
        return None
    return _FLAG_ALIASES.get(word, word)


def parse_imagine_text(text: str) -> ImagineOptions:
    """The words are the prompt; each flag takes one value, except --no, which takes every
    word up to the next flag. Unknown flags and unreadable values raise OptionError."""
    tokens = text.split()
    prompt: list[str] = []
    values: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        flag = _as_flag(token)
        if flag is None:
            prompt.append(token)
            i += 1
            continue
        if flag not in TEXT_FLAGS:
            raise OptionError(f"`{token.split('=', 1)[0]}` is not an option I know.")
        inline = token.split("=", 1)[1] if "=" in token else None
        taken = [inline] if inline else []
        i += 1
        while i < len(tokens) and _as_flag(tokens[i]) is None and (not taken or flag == "--no"):
            taken.append(tokens[i])
            i += 1
        if not taken:
            raise OptionError(f"`{flag}` needs a value: {flag} {TEXT_FLAGS[flag]}.")
        if flag in values:
            raise OptionError(f"`{flag}` is given twice.")
        values[flag] = _unquote(" ".join(taken))
    return _options_from_text(_unquote(" ".join(prompt)), values)


def _options_from_text(prompt: str, values: Mapping[str, str]) -> ImagineOptions:
    width = _whole(values, "--width")
    height = _whole(values, "--height")
    if "--size" in values:
        match = _SIZE.fullmatch(values["--size"].strip())
        if not match:
            raise OptionError(f"`--size` is {values['--size']!r}, but it must look like 512x768.")
        width, height = int(match[1]), int(match[2])
    guidance = _read(values, "--guidance", float, "a number")
    return ImagineOptions(prompt=prompt, model=values.get("--model"), negative=values.get("--no"),
                          steps=_whole(values, "--steps"), guidance=None if guidance is None else float(guidance),
                          width=width, height=height, seed=_whole(values, "--seed"))


def _whole(values: Mapping[str, str], flag: str) -> int | None:
    value = _read(values, flag, int, "a whole number")
    return None if value is None else int(value)


def _read(values: Mapping[str, str], flag: str, kind: Callable[[str], int | float], what: str) -> int | float | None:
    if flag not in values:
        return None
    try:
        return kind(values[flag])
    except ValueError:
        raise OptionError(f"`{flag}` is {values[flag]!r}, but it must be {what}.") from None


def _unquote(text: str) -> str:
    text = text.strip()
    for left, right in (('"', '"'), ("'", "'"), ("“", "”")):
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            return text[1:-1].strip()
    return text


# -- reactions -----------------------------------------------------------------------------------


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


# -- ETA -----------------------------------------------------------------------------------------


# -- cooldown ------------------------------------------------------------------------------------


class Cooldowns:
    """One job per ``every_s`` per user; only submitted jobs count."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self._clock = every_s, clock
        self._last: dict[tuple[str, str], float] = {}

    def wait_s(self, actor: Actor) -> float:
        last = self._last.get((actor.platform, actor.user_id))
        return 0.0 if last is None else max(0.0, self.every_s - (self._clock() - last))

    def take(self, actor: Actor) -> tuple[float, float | None]:
        """Check and set in one step (no await between: rule 6): ``(0.0, token)`` when the user
        may go now — the cooldown runs from now — else ``(seconds to wait, None)``. Give the
        token back with ``give_back`` if the job is then not accepted."""
        wait = self.wait_s(actor)
        if wait > 0:
            return wait, None
        key = (actor.platform, actor.user_id)
        previous = self._last.get(key)
        self.note(actor)
        return 0.0, previous if previous is not None else -math.inf

    def give_back(self, actor: Actor, token: float | None) -> None:
        """Undo ``take``: the submit it allowed was refused, so it does not count."""
        if token is None:
            return
        key = (actor.platform, actor.user_id)
        if token == -math.inf:
            self._last.pop(key, None)
        else:
            self._last[key] = token

    def note(self, actor: Actor) -> None:
        now = self._clock()
        if len(self._last) > 10_000:  # forget users whose cooldown is long over
            self._last = {k: t for k, t in self._last.items() if now - t < self.every_s}
        self._last[(actor.platform, actor.user_id)] = now


# -- the commands --------------------------------------------------------------------------------


@dataclass
class Commands:
    """Every command and reaction, for every platform. One instance per process."""

    engine: Engine
    settings: BotSettings
    admins: Mapping[str, AdminPolicy]  # platform -> who is an admin there
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._cooldowns = Cooldowns(self.settings.cooldown_s, self.clock)

    @property
    def config(self) -> Config:
        return self.engine.config

    def is_admin(self, actor: Actor) -> bool:
        policy = self.admins.get(actor.platform)
        return policy is not None and policy.allows(actor)

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

    async def history(self, actor: Actor) -> Reply:
        jobs = await self.engine.history.recent_jobs(user_id=actor.user_id, platform=actor.platform,
                                                     limit=self.settings.history_limit)
        return Reply(messages.history_reply(jobs))

    async def show(self, actor: Actor, job_id: str) -> Reply:
        job = await self.engine.history.get_job(job_id.strip().lower())
        if job is None:
            return Reply(messages.unknown_job(job_id.strip()), ok=False)
        if job.requester.platform != actor.platform and not self.is_admin(actor):
            return Reply(messages.not_your_platform(job.id), ok=False)
        image = str(job.image_path) if job.image_path and job.image_path.is_file() else None
        return Reply(messages.show_reply(job, self.model_name(job.params.model_id)), image_path=image)

    def help(self, actor: Actor) -> Reply:
        return Reply(messages.help_text(((c.usage, c.summary, c.admin) for c in CATALOGUE), self.is_admin(actor)))

    # -- admins ----------------------------------------------------------------------------

    def _refuse(self, actor: Actor, command: str) -> Reply | None:
        return None if self.is_admin(actor) else Reply(messages.admin_only(command), ok=False)

    async def preload(self, actor: Actor, model: str) -> Reply:
        if refused := self._refuse(actor, "preload"):
            return refused
        try:
            seconds = await self.engine.preload(model.strip())
        except EngineError as exc:
            return Reply(exc.user_message, ok=False)
        return Reply(messages.preload_done(self.model_name(model.strip().lower()), seconds))

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
        return Reply(messages.models_reply(rows))

    async def queue(self, actor: Actor) -> Reply:
        if refused := self._refuse(actor, "queue"):
            return refused
        entries = self.engine.queue_snapshot()
        return Reply(messages.queue_reply(entries))

    async def stats(self, actor: Actor) -> Reply:
        if refused := self._refuse(actor, "stats"):
            return refused
        return Reply(messages.stats_reply(await self.engine.history.model_stats()))

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
            "history": self.history, "models": self.models, "queue": self.queue, "stats": self.stats,
        }
        if name == "imagine":
            return await self.imagine_text(actor, rest, origin)
        if name == "help":
            return self.help(actor)
        if name in simple:
            return await simple[name](actor)
        if name in ("show", "preload", "unload"):
            if not rest:
                usage = next((c.usage for c in CATALOGUE if c.name == name), f"/{name} JOB_ID")
                return Reply(f"`/{name}` needs an argument: {usage}", ok=False)
            handler = {"show": self.show, "preload": self.preload, "unload": self.unload}[name]
            return await handler(actor, rest.split()[0])
        if name == "react":
            return await self._react_line(actor, rest, origin)
        known = ", ".join(f"/{c.name}" for c in CATALOGUE)
        return Reply(f"`/{name}` is not a command. Commands: {known}.", ok=False)

    async def _react_line(self, actor: Actor, rest: str, origin: Origin) -> Outcome:
        parts = rest.split()
        if len(parts) != 2:
            return Reply("Usage: /react JOB_ID EMOJI, for example `/react k7mq2x 🔁`.", ok=False)
        job = await self.engine.history.get_job(parts[0].lower())
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
