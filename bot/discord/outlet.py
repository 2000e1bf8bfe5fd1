"""How jobs look in Discord: the ``outlet.Outlet`` that posts status messages, previews and
results with the bot token, to the channel each job came from.

- The interaction token dies after 15 minutes, so nothing here uses it: a long queue never
  loses a result. A partial messageable needs no cache, so this works after a restart too.
- A result larger than the channel's upload limit is re-encoded to fit (bot/outlet.py).
- Mentions are off except the requester's own: a prompt quoted in a message may say @everyone.
- A result carries its job id twice: its attachment is named ``<job id>.<ext>`` (what
  ``find_result`` looks for in the channel's history after a restart: a message by this bot,
  not an interaction reply, with that file), and its ``nonce`` is derived from the job id, sent
  with ``enforce_nonce`` (discord.py sets it), so Discord itself drops a resend of the same
  result within a few minutes.
- discord.py retries 500/502/504/524 itself (5 tries, 1-7 s apart) and waits out 429s; a 503,
  those retries used up, or a lost connection reach bot/posting.py as PlatformUnavailable.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from collections.abc import MutableMapping, Sequence
from datetime import datetime, timezone

import aiohttp
import discord

from bot import messages
from bot.outlet import MessageGone, MessageRef, Picture, PlatformUnavailable, PreviewPicture, fit_image_blocking
from bot.posting import DEFAULT_RETRY, RetryPolicy
from bot.settings import DiscordSettings
from engine import StoredJob

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000  # characters in one message
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024  # bytes a bot may attach where Discord says nothing else
NOBODY = discord.AllowedMentions.none()
NONCE_LENGTH = 25  # Discord's limit on a message nonce
FIND_LOOK_BACK_S = 60.0  # find_result reads the channel from this long before the job finished ...
FIND_MESSAGES = 300  # ... at most this many messages (oldest first: a result follows its job closely)


def pinging(user_id: str) -> discord.AllowedMentions:
    """Ping this user only: a prompt quoted in a message may say @everyone or <@someone>."""
    users = [discord.Object(int(user_id))] if user_id.isdigit() else False
    return discord.AllowedMentions(everyone=False, roles=False, users=users, replied_user=False)


class DiscordOutlet:
    """Shows jobs in Discord with the bot token (``outlet.Outlet``)."""

    platform = PLATFORM
    progress_interval_s: float | None = None  # [bot] progress_interval_s

    def __init__(self, client: discord.Client, settings: DiscordSettings, upload_limits: MutableMapping[str, int],
                 connected: asyncio.Event, result_retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self._client, self._settings, self._upload_limits = client, settings, upload_limits
        self._connected = connected
        self.result_retry = result_retry  # on top of discord.py's own retries (module docstring)

    def use(self, client: discord.Client) -> None:
        """The app's new client after a reconnect (bot/supervise.py)."""
        self._client = client

    def mention(self, user_id: str) -> str:
        return f"<@{user_id}>"

    async def _channel(self, channel_id: str) -> discord.PartialMessageable:
        await self._connected.wait()  # jobs taken back at start may finish before the gateway is up
        # A partial messageable needs no cache: it works for any channel id, also after a restart.
        return self._client.get_partial_messageable(int(channel_id))

    async def post_status(self, job: StoredJob, text: str) -> MessageRef:
        channel = await self._channel(job.origin.channel_id)
        text, mentions = messages.fit_text(text, MESSAGE_LIMIT), requester_only(job)
        if job.origin.message_ref.isdigit():  # a reaction's job answers under the image reacted to
            reference = channel.get_partial_message(int(job.origin.message_ref)).to_reference(fail_if_not_exists=False)
            message = await channel.send(text, reference=reference, allowed_mentions=mentions)
        else:
            message = await channel.send(text, allowed_mentions=mentions)
        return MessageRef(str(channel.id), str(message.id))

    async def edit_status(self, job: StoredJob, ref: MessageRef, text: str) -> None:
        channel = await self._channel(ref.channel_id)
        try:
            await channel.get_partial_message(int(ref.message_id)).edit(content=messages.fit_text(text, MESSAGE_LIMIT),
                                                                        allowed_mentions=requester_only(job))
        except discord.NotFound as exc:
            raise MessageGone(ref.message_id) from exc

    async def edit_status_with_preview(self, job: StoredJob, ref: MessageRef, text: str,
                                       preview: PreviewPicture | None) -> None:
        """The status text with the preview as its one attachment (replacing the last one);
        None removes it. A preview is a few KB, far under any upload limit."""
        channel = await self._channel(ref.channel_id)
        files = [discord.File(io.BytesIO(preview.data), filename=preview.filename)] if preview is not None else []
        try:
            await channel.get_partial_message(int(ref.message_id)).edit(content=messages.fit_text(text, MESSAGE_LIMIT),
                                                                        attachments=files,
                                                                        allowed_mentions=requester_only(job))
        except discord.NotFound as exc:
            raise MessageGone(ref.message_id) from exc

    async def post_result(self, job: StoredJob, picture: Picture, caption: str, status: MessageRef | None) -> MessageRef:
        channel = await self._channel(job.origin.channel_id)
        limit = self._upload_limit(job)
        data, ext = await asyncio.to_thread(fit_image_blocking, picture.png, limit)
        if ext != "png":
            log.info("job %s: PNG of %d bytes re-encoded to %s of %d bytes to fit %d", job.id, len(picture.png), ext,
                     len(data), limit)
        file = discord.File(io.BytesIO(data), filename=f"{job.id}.{ext}")
        try:
            message = await channel.send(messages.fit_text(caption, MESSAGE_LIMIT), file=file,
                                         allowed_mentions=requester_only(job), nonce=result_nonce(job.id))
        except (discord.DiscordException, aiohttp.ClientError, OSError) as exc:
            if (unavailable := unavailable_error(exc)) is None:
                raise
            raise unavailable from exc
        self._upload_limits.pop(job.id, None)
        return MessageRef(str(channel.id), str(message.id))

    async def find_result(self, job: StoredJob, status: MessageRef | None) -> MessageRef | None:
        """This bot's message in the job's channel with ``<job id>.<ext>`` attached, posted since
        shortly before the job finished (channel history, oldest first; Read Message History)."""
        channel = await self._channel(job.origin.channel_id)
        me = self._client.user
        since = datetime.fromtimestamp((job.finished_at or job.created_at) - FIND_LOOK_BACK_S, tz=timezone.utc)
        async for message in channel.history(limit=FIND_MESSAGES, after=since, oldest_first=True):
            if me is not None and message.author.id == me.id and message.webhook_id is None and any(
                    a.filename.rsplit(".", 1)[0] == job.id for a in message.attachments):
                return MessageRef(str(channel.id), str(message.id))
        return None

    async def post_sheet(self, job: StoredJob, sheet_id: str, png: bytes, caption: str) -> MessageRef:
        """A /compare or /sweep contact sheet in ``job``'s channel, fitted to its upload limit."""
        channel = await self._channel(job.origin.channel_id)
        data, ext = await asyncio.to_thread(fit_image_blocking, png, self._upload_limit(job))
        file = discord.File(io.BytesIO(data), filename=f"{sheet_id}-sheet.{ext}")
        message = await channel.send(messages.fit_text(caption, MESSAGE_LIMIT), file=file,
                                     allowed_mentions=requester_only(job))
        return MessageRef(str(channel.id), str(message.id))

    async def add_reactions(self, job: StoredJob, ref: MessageRef, emojis: Sequence[str]) -> None:
        message = (await self._channel(ref.channel_id)).get_partial_message(int(ref.message_id))
        for emoji in emojis:
            await message.add_reaction(emoji)

    async def retire_status(self, job: StoredJob, ref: MessageRef) -> None:
        """The result replaces the status message: one message per image in the channel."""
        message = (await self._channel(ref.channel_id)).get_partial_message(int(ref.message_id))
        try:
            await message.delete()
        except discord.NotFound:
            pass

    def _upload_limit(self, job: StoredJob) -> int:
        limit = self._upload_limits.get(job.id)
        if limit is None:  # a job from before a restart: the guild's limit, if the channel is known
            channel = self._client.get_channel(int(job.origin.channel_id))
            guild = getattr(channel, "guild", None)
            limit = guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT
        cap = self._settings.max_upload_bytes
        return min(limit, cap) if cap else limit


def result_nonce(job_id: str) -> str:
    """The same nonce for every post of one job's result (Discord keeps at most 25 characters)."""
    nonce = f"r-{job_id}"
    return nonce if len(nonce) <= NONCE_LENGTH else "r-" + hashlib.sha256(job_id.encode()).hexdigest()[:NONCE_LENGTH - 2]


def unavailable_error(exc: BaseException) -> PlatformUnavailable | None:
    """Discord down for a while (5xx, 429, no connection) as PlatformUnavailable; None for the rest."""
    if isinstance(exc, discord.RateLimited):
        return PlatformUnavailable(f"Discord asked to wait {exc.retry_after:.0f} s")
    if isinstance(exc, discord.HTTPException) and (exc.status >= 500 or exc.status == 429):
        return PlatformUnavailable(f"Discord answered {exc.status}")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return PlatformUnavailable(f"Discord could not be reached ({type(exc).__name__})")
    return None


def requester_only(job: StoredJob) -> discord.AllowedMentions:
    return pinging(job.requester.user_id) if job.requester.platform == PLATFORM else NOBODY
