"""The Discord adapter (discord.py 2.x): slash commands and reactions in, status and results out.

Rules of the platform this file follows:

- An interaction must be answered within 3 s, so every command defers first (privately).
- The interaction token dies after 15 minutes, so status messages and results are posted with
  the *bot* token to the channel the job came from; a long queue never loses a result.
- Reactions arrive as ``on_raw_reaction_add``: it fires for messages that are not in the
  cache, so reactions on results keep working after a restart (deliveries are in SQLite).
- Commands are registered only by ``promptpics sync-commands``, never in ``on_ready`` (it can
  fire many times a day and burns the daily command-create limit).
- Default intents only: reactions are not privileged and no message content is read.

No ``from __future__ import annotations`` here: discord.py reads each slash-command option's
type from the annotations at run time, and their bounds come from config.toml.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Optional

import discord
import yarl
from cachetools import LRUCache
from discord import app_commands
from discord.gateway import DiscordWebSocket

from bot import messages
from bot.commands import Actor, AdminPolicy, Commands, ImagineOptions, Outcome, Reply, Submitted
from bot.discord.groups import add_group_commands
from bot.discord.outlet import MESSAGE_LIMIT, NOBODY, PLATFORM, DiscordOutlet, pinging
from bot.settings import DiscordSettings
from bot.sheets import tile_of_emoji
from bot.supervise import new_ref
from engine import MAX_SEED, Config, Origin

log = logging.getLogger(__name__)

UPLOAD_LIMITS_REMEMBERED = 1000  # jobs whose interaction's upload limit is kept until their result is posted
# Permissions the bot needs in a channel (see docs/BOT.md): view, send, send in threads,
# attach files, read history (to react on older messages), add reactions.
PERMISSIONS = discord.Permissions(view_channel=True, send_messages=True, send_messages_in_threads=True,
                                  attach_files=True, read_message_history=True, add_reactions=True)


def point_at(settings: DiscordSettings) -> None:
    """discord.py keeps its API and gateway addresses on classes: set them before connecting
    (Discord's own by default; DISCORD_API_BASE / DISCORD_GATEWAY_URL for compatible servers)."""
    discord.http.Route.BASE = settings.api_base
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.gateway_url)


NEEDED_HERE = (("view_channel", "View Channel"), ("send_messages", "Send Messages"), ("attach_files", "Attach Files"),
               ("read_message_history", "Read Message History"), ("add_reactions", "Add Reactions"))


def missing_permissions(interaction: discord.Interaction) -> list[str]:
    """What the bot lacks in this channel to post statuses and results (Discord says, per interaction)."""
    have = interaction.app_permissions
    needed = list(NEEDED_HERE)
    if isinstance(interaction.channel, discord.Thread):
        needed[1] = ("send_messages_in_threads", "Send Messages in Threads")
    return [label for name, label in needed if not getattr(have, name)]


def is_age_restricted(channel: object) -> bool:
    """Discord's age-restricted ("NSFW") channel flag; unknown channels count as not."""
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


def invite_url(application_id: int) -> str:
    return discord.utils.oauth_url(application_id, permissions=PERMISSIONS,
                                   scopes=("bot", "applications.commands"))




def role_ids(member: object) -> frozenset[str]:
    """The role ids straight from the event (a Member keeps them even when the guild's roles
    are not cached; a plain User, in a DM, has none)."""
    return frozenset(str(r) for r in getattr(member, "_roles", ()))


def origin_of(interaction: discord.Interaction) -> Origin:
    """Where a command was asked: its channel, and its server (the guild; "" in a DM)."""
    return Origin(platform=PLATFORM, channel_id=str(interaction.channel_id), server_id=str(interaction.guild_id or ""))


def actor_of(user: discord.abc.User) -> Actor:
    return Actor(platform=PLATFORM, user_id=str(user.id), display_name=user.display_name, role_ids=role_ids(user))


def guard_parsers(parsers: dict[str, Callable[[Any], None]]) -> None:
    """One gateway event discord.py cannot read (say an interaction whose ``member`` lacks
    ``flags``) would end the whole connection; instead that event is dropped and logged once,
    with a reference, and the connection serves on. Frames that are not JSON at all still end
    it, and the supervisor (bot/supervise.py) reconnects."""
    for event, parse in list(parsers.items()):
        parsers[event] = _guarded(event, parse)


def _guarded(event: str, parse: Callable[[Any], None]) -> Callable[[Any], None]:
    def parse_or_drop(data: Any) -> None:
        try:
            parse(data)
        except Exception as exc:
            log.error("discord: dropped one %s event it could not read (ref %s: %s: %s); the connection serves on",
                      event, new_ref(), type(exc).__name__, exc, exc_info=exc)

    return parse_or_drop


# -- the client and its slash commands -----------------------------------------------------------


class PromptPicsClient(discord.Client):
    """A discord.Client with our command tree; ``app`` is None when it only syncs commands."""

    def __init__(self, config: Config, app: "DiscordApp | None" = None, **options: Any) -> None:
        super().__init__(intents=discord.Intents.default(), **options)
        self.app = app
        self.tree = app_commands.CommandTree(self)
        _add_commands(self.tree, config, self._running_app)
        self.tree.error(self._on_command_error)
        guard_parsers(self._connection.parsers)

    def _running_app(self) -> "DiscordApp":
        assert self.app is not None, "this client only syncs commands"
        return self.app

    async def on_ready(self) -> None:
        # May fire again after a reconnect; nothing here may burn a rate limit (no command sync).
        log.info("discord: connected as %s to %d server(s)", self.user, len(self.guilds))
        if self.app is not None:
            self.app.connected.set()

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        if self.app is not None:
            await self.app.on_reaction(payload)

    async def _on_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """The catch-all of this boundary: the user gets a sentence, the log the traceback."""
        if isinstance(error, app_commands.NoPrivateMessage):
            text = "Please use PromptPics commands in a server channel."
        else:
            text = messages.describe_error(getattr(error, "original", error))
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            log.warning("could not tell user %s about an error", interaction.user.id)


def _add_commands(tree: app_commands.CommandTree, config: Config, app: Callable[[], "DiscordApp"]) -> None:
    """The slash commands; their option bounds are the engine's limits (the engine checks again)."""
    lim = config.limits
    models = [app_commands.Choice(name=f"{m.display_name} ({m.id})"[:100], value=m.id) for m in config.models.values()]
    auto = [app_commands.Choice(name="auto: the bot picks the best model", value="auto")]
    model_ids = ", ".join(config.models)

    @tree.command(name="imagine", description="Make an image from a prompt")
    @app_commands.guild_only()
    @app_commands.describe(prompt="what to draw", model="auto (default) or a model", negative="what the image should not show",
                           steps=f"denoising steps ({lim.min_steps}-{lim.max_steps})",
                           guidance=f"how closely to follow the prompt ({lim.min_guidance:g}-{lim.max_guidance:g})",
                           width=f"pixels ({lim.min_image_side}-{lim.max_image_side})",
                           height=f"pixels ({lim.min_image_side}-{lim.max_image_side})", seed="same seed, same picture")
    @app_commands.choices(model=auto + models)
    async def imagine(interaction: discord.Interaction,
                      prompt: app_commands.Range[str, 1, lim.max_prompt_chars],
                      model: Optional[str] = None,
                      negative: Optional[app_commands.Range[str, 1, lim.max_negative_chars]] = None,
                      steps: Optional[app_commands.Range[int, lim.min_steps, lim.max_steps]] = None,
                      guidance: Optional[app_commands.Range[float, lim.min_guidance, lim.max_guidance]] = None,
                      width: Optional[app_commands.Range[int, lim.min_image_side, lim.max_image_side]] = None,
                      height: Optional[app_commands.Range[int, lim.min_image_side, lim.max_image_side]] = None,
                      seed: Optional[app_commands.Range[int, 0, MAX_SEED]] = None) -> None:
        options = ImagineOptions(prompt=prompt, model=model, negative=negative, steps=steps, guidance=guidance,
                                 width=width, height=height, seed=seed)
        await app().on_imagine(interaction, options)

    @tree.command(name="history", description="Your recent jobs")
    @app_commands.guild_only()
    async def history(interaction: discord.Interaction) -> None:
        origin, adult = origin_of(interaction), is_age_restricted(interaction.channel)
        await app().respond(interaction, lambda actor: app().commands.history(actor, origin, adult_channel=adult))

    @tree.command(name="gallery", description="A private link to your images on the web")
    async def gallery(interaction: discord.Interaction) -> None:
        async def link(actor: Actor) -> Reply:
            return app().commands.gallery(actor)
        await app().respond(interaction, link)

    @tree.command(name="show", description="One job's settings, outcome and image")
    @app_commands.guild_only()
    @app_commands.describe(job_id="the job id, e.g. k7mq2x")
    async def show(interaction: discord.Interaction, job_id: app_commands.Range[str, 1, 64]) -> None:
        origin, adult = origin_of(interaction), is_age_restricted(interaction.channel)
        await app().respond(interaction, lambda actor: app().commands.show(actor, job_id, origin, adult_channel=adult))

    @tree.command(name="preload", description="Admins: load a model ahead of demand")
    @app_commands.guild_only()
    @app_commands.describe(model=f"one of {model_ids}"[:100], on="the GPU worker (see /workers); default: the best one")
    @app_commands.choices(model=models)
    async def preload(interaction: discord.Interaction, model: str, on: app_commands.Range[str, 1, 64] | None = None
                      ) -> None:
        await app().respond(interaction, lambda actor: app().commands.preload(actor, model, on))

    @tree.command(name="workers", description="Admins: each GPU worker, its card, what is loaded, its job")
    @app_commands.guild_only()
    async def workers(interaction: discord.Interaction) -> None:
        await app().respond(interaction, app().commands.workers)

    @tree.command(name="unload", description="Admins: free a model's memory")
    @app_commands.guild_only()
    @app_commands.describe(model=f"one of {model_ids}"[:100])
    @app_commands.choices(model=models)
    async def unload(interaction: discord.Interaction, model: str) -> None:
        await app().respond(interaction, lambda actor: app().commands.unload(actor, model))

    @tree.command(name="models", description="Admins: the models, what is loaded where, memory")
    @app_commands.guild_only()
    async def models_(interaction: discord.Interaction) -> None:
        await app().respond(interaction, app().commands.models)

    @tree.command(name="queue", description="Admins: the jobs waiting, positions and ETA")
    @app_commands.guild_only()
    async def queue(interaction: discord.Interaction) -> None:
        await app().respond(interaction, app().commands.queue)

    @tree.command(name="stats", description="Admins: per-model timings and safety incidents")
    @app_commands.guild_only()
    async def stats(interaction: discord.Interaction) -> None:
        await app().respond(interaction, app().commands.stats)

    add_group_commands(tree, config, app, origin_of)  # /compare, /sweep, /preset (bot/discord/groups.py)


# -- the adapter ---------------------------------------------------------------------------------


class DiscordApp:
    """One Discord connection serving the shared ``Commands``; ``outlet`` plugs into Delivery."""

    platform = PLATFORM

    def __init__(self, commands: Commands, settings: DiscordSettings, **client_options: Any) -> None:
        self.commands, self.settings = commands, settings
        self.connected = asyncio.Event()  # set once the gateway is ready; delivery waits for it
        self._client_options = client_options
        self.client = PromptPicsClient(commands.config, self, **client_options)
        self._upload_limits: LRUCache[str, int] = LRUCache(maxsize=UPLOAD_LIMITS_REMEMBERED)  # job id -> limit
        self.outlet = DiscordOutlet(self.client, settings, self._upload_limits, self.connected)

    @staticmethod
    def admin_policy(settings: DiscordSettings) -> AdminPolicy:
        return AdminPolicy(user_ids=settings.admin_user_ids, role_ids=settings.admin_role_ids)

    async def serve(self) -> None:
        """Connect and serve until closed. Raises discord.LoginFailure for a refused token."""
        if not self.settings.token:
            raise RuntimeError("DISCORD_TOKEN is not set")
        point_at(self.settings)
        await self.client.start(self.settings.token)

    async def reset(self) -> None:
        """After a failure (bot/supervise.py): close what is left and start over on a new client
        (a closed discord.Client is not meant to start again); posts wait for ``connected``."""
        self.connected.clear()
        await self.client.close()
        self.client = PromptPicsClient(self.commands.config, self, **self._client_options)
        self.outlet.use(self.client)

    async def close(self) -> None:
        await self.client.close()

    # -- commands ------------------------------------------------------------------------------

    async def on_imagine(self, interaction: discord.Interaction, options: ImagineOptions) -> None:
        # Discord drops an interaction not answered within 3 s, and routing may take longer.
        await interaction.response.defer(ephemeral=True, thinking=True)
        if missing := missing_permissions(interaction):
            # The results go out with the bot token: without these the job would run for nobody.
            await self._send_reply(interaction, Reply(messages.missing_permissions(missing), ok=False))
            return
        origin = origin_of(interaction)
        outcome = await self.commands.imagine(actor_of(interaction.user), options, origin,
                                              adult_channel=is_age_restricted(interaction.channel))
        if isinstance(outcome, Submitted):
            self._upload_limits[outcome.handle.id] = interaction.filesize_limit
            outcome = outcome.reply
        await self._send_reply(interaction, outcome)

    async def respond(self, interaction: discord.Interaction, work: Callable[[Actor], Awaitable[Reply]]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)  # /preload can take minutes
        await self._send_reply(interaction, await work(actor_of(interaction.user)))

    async def respond_posting(self, interaction: discord.Interaction, work: Callable[[Actor], Awaitable[Reply]]) -> None:
        """``respond`` for a command whose images go to this channel (/compare, /sweep): refused
        up front, like /imagine, where the bot could not post them."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        if missing := missing_permissions(interaction):
            await self._send_reply(interaction, Reply(messages.missing_permissions(missing), ok=False))
            return
        await self._send_reply(interaction, await work(actor_of(interaction.user)))

    async def _send_reply(self, interaction: discord.Interaction, reply: Reply) -> None:
        file: discord.File = discord.utils.MISSING
        if reply.image_path:
            path = Path(reply.image_path)
            if path.stat().st_size <= interaction.filesize_limit:
                file = discord.File(path, filename=path.name)
        await interaction.followup.send(messages.fit_text(reply.text, MESSAGE_LIMIT), ephemeral=True,
                                        allowed_mentions=NOBODY, file=file)

    # -- reactions -----------------------------------------------------------------------------

    async def on_reaction(self, payload: discord.RawReactionActionEvent) -> None:
        me = self.client.user
        if (me is not None and payload.user_id == me.id) or not payload.emoji.is_unicode_emoji():
            return
        emoji = str(payload.emoji)
        if self.commands.reaction_action(emoji) is None and tile_of_emoji(emoji, 9) is None:
            return  # not one of ours: no database look-up for every reaction in the server
        actor = Actor(platform=PLATFORM, user_id=str(payload.user_id),
                      display_name=payload.member.display_name if payload.member else "",
                      role_ids=role_ids(payload.member))
        origin = Origin(platform=PLATFORM, channel_id=str(payload.channel_id), message_ref=str(payload.message_id),
                        server_id=str(payload.guild_id or ""))
        adult = is_age_restricted(self.client.get_channel(payload.channel_id))
        try:  # the catch-all of this boundary
            job = await self.commands.engine.deliveries.job_by_message(
                platform=PLATFORM, channel_id=str(payload.channel_id), message_id=str(payload.message_id))
            outcome: Outcome | None
            if job is None:  # a contact sheet's number, or not a message of ours
                outcome = await self.commands.groups.react(actor, emoji, platform=PLATFORM, channel_id=origin.channel_id,
                                                           message_id=origin.message_ref)
            else:
                outcome = await self.commands.react(actor, job, emoji, origin, adult_channel=adult)
        except Exception as exc:
            outcome = Reply(messages.describe_error(exc), ok=False)
        if outcome is None or isinstance(outcome, Submitted):
            return  # a new job: its status message answers
        channel = self.client.get_partial_messageable(payload.channel_id)
        target = channel.get_partial_message(payload.message_id)
        try:
            if outcome.delete_target:
                await target.delete()
                log.info("message %s deleted by user %s", payload.message_id, payload.user_id)
            elif outcome.text:
                await channel.send(messages.fit_text(f"<@{payload.user_id}> {outcome.text}", MESSAGE_LIMIT),
                                   reference=target.to_reference(fail_if_not_exists=False),
                                   allowed_mentions=pinging(str(payload.user_id)))
        except discord.HTTPException as exc:
            log.warning("could not answer a reaction on message %s: %s", payload.message_id, exc)


# -- `promptpics sync-commands` ------------------------------------------------------------------


async def sync_commands(config: Config, settings: DiscordSettings, guild_id: int | None) -> tuple[list[str], int]:
    """Register the slash commands (globally, or in one guild: instant, for testing).
    Returns the command names and the application id. HTTP only: no gateway connection."""
    if not settings.token:
        raise RuntimeError("DISCORD_TOKEN is not set")
    point_at(settings)
    client = PromptPicsClient(config)
    async with client:
        await client.login(settings.token)
        guild = discord.Object(id=guild_id) if guild_id else None
        if guild is not None:
            client.tree.copy_global_to(guild=guild)
        synced = await client.tree.sync(guild=guild)
        assert client.application_id is not None
        return [c.name for c in synced], client.application_id
