"""How jobs look in Slack: the ``outlet.Outlet`` that posts statuses and images with the bot
token, the text escaping both directions, and the Web API client's retry manners.

- Slack escapes ``&``, ``<`` and ``>`` in what users type; text we post is escaped the same way,
  so a quoted prompt never pings ``<!channel>``; only the requester's own mention is kept live.
- The image goes up with files_upload_v2 (``files.upload`` is retired) as a reply in the status
  message's thread. files.completeUploadExternal does not say which message shows the file:
  files.info ``shares`` does, once Slack has shared it (asynchronously, so it is polled briefly).
- A 429 is retried after its Retry-After; 500/502/503/504 with exponential backoff (slack_sdk's
  retry handlers, narrowed below). A result upload still refused after them reaches
  bot/posting.py as PlatformUnavailable, which tries the whole post again within its bound.
- A result carries its job id in the uploaded file's name, ``<job id>.png``. Slack's upload
  (files.completeUploadExternal) takes no message ``metadata``, so ``find_result`` asks files.list
  (files:read, already granted) for this bot's file of that name in the job's channel, and
  files.info for the message that shares it in the job's thread.
- A channel that refuses the bot (``not_in_channel``, ...) is reported once per job to the
  adapter, which cancels the job and tells the requester what to do.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiohttp
from cachetools import LRUCache
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.http_retry.jitter import Jitter
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient

from bot import messages
from bot.commands import normalise_emoji
from bot.outlet import MessageGone, MessageRef, Picture, PlatformUnavailable
from bot.posting import DEFAULT_RETRY, RetryPolicy
from bot.settings import SlackSettings
from engine import StoredJob

log = logging.getLogger(__name__)

PLATFORM = "slack"
MESSAGE_LIMIT = 3900  # Slack advises keeping a message's text under 4,000 characters
# Slack's answers when the bot may not post in a conversation: the user can act on these.
CHANNEL_ERRORS = frozenset({"not_in_channel", "channel_not_found", "is_archived", "restricted_action",
                            "restricted_action_read_only_channel", "restricted_action_thread_only_channel",
                            "restricted_action_non_threadable_channel", "team_access_not_granted"})
SHARE_WAITS_S = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # files.info polls until the upload shows as shared
REMEMBERED = 2000  # bounded per-job and per-event memories
MAX_WAIT_S = 120.0  # the longest a Web API call waits before its retry, whatever Slack says
FIND_LOOK_BACK_S = 60.0  # find_result lists files uploaded since this long before the job finished
FIND_FILES = 200  # files.list page size (its maximum is 1000)
_UPLOAD_STATUS = re.compile(r"status: (\d{3})")  # slack_sdk's SlackRequestError for a refused upload URL


class ChannelUnavailable(Exception):
    """Slack will not let the bot post where a job came from; the requester has been told."""


# -- text and errors -----------------------------------------------------------------------------


def unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_text(text: str, mention: str = "") -> str:
    """``text`` as Slack mrkdwn: all escaped (a quoted prompt pings nobody), then our one mention restored."""
    out = escape(messages.fit_text(text, MESSAGE_LIMIT))
    return out.replace(escape(mention), mention) if mention else out


def error_code(exc: SlackApiError) -> str:
    return str((exc.response.get("error") if exc.response is not None else None) or "unknown_error")


def unavailable_error(exc: BaseException) -> PlatformUnavailable | None:
    """Slack down for a while (5xx, 429, no connection), after the client's own retries, as
    PlatformUnavailable; None for the rest. The sentence names the status, never a URL."""
    status = None
    if isinstance(exc, SlackApiError) and exc.response is not None:
        status = exc.response.status_code
    elif isinstance(exc, SlackRequestError) and (match := _UPLOAD_STATUS.search(str(exc))):
        status = int(match[1])
    if status is not None and (status >= 500 or status == 429):
        return PlatformUnavailable(f"Slack answered {status}")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return PlatformUnavailable(f"Slack could not be reached ({type(exc).__name__})")
    return None


# -- the Web API client ------------------------------------------------------------------------


# slack_sdk's own retry handlers, each narrowed where it would change what the bot does today:
# its 429 handler sleeps whatever Retry-After says (no cap) plus up to 1 s of jitter and fails on a
# value that is not a whole number; its 5xx handler retries 500 and 503 only; its backoff adds
# up to 1 s of jitter to every wait. One retry count covers them all (slack_sdk's RetryState).


class CappedBackoff(BackoffRetryIntervalCalculator):
    """``backoff_s`` doubling with each attempt, at most ``max_wait_s``, without slack_sdk's jitter."""

    def __init__(self, backoff_s: float, max_wait_s: float = MAX_WAIT_S) -> None:
        super().__init__(backoff_factor=backoff_s, jitter=_NoJitter())
        self.max_wait_s = max_wait_s

    def calculate_sleep_duration(self, current_attempt: int) -> float:
        return min(super().calculate_sleep_duration(current_attempt), self.max_wait_s)


class _NoJitter(Jitter):
    def recalculate(self, duration: float) -> float:
        return duration


class RateLimitRetry(AsyncRateLimitErrorRetryHandler):
    """429: wait what Retry-After says, at most ``max_wait_s`` (1 s when the header is unreadable)."""

    def __init__(self, max_retries: int, *, max_wait_s: float = MAX_WAIT_S) -> None:
        super().__init__(max_retry_count=max_retries)
        self.max_wait_s = max_wait_s

    async def prepare_for_next_attempt_async(self, *, state: RetryState, request: HttpRequest,
                                             response: HttpResponse | None = None, error: Exception | None = None) -> None:
        if response is None:  # _can_retry_async asks for a 429 response: cannot happen
            raise error or RuntimeError("a rate-limit retry without a response")
        wait = retry_after_s(response, self.max_wait_s)
        _log_retry(request, response, wait)
        state.next_attempt_requested = True
        await asyncio.sleep(wait)
        state.increment_current_attempt()


class ServerErrorRetry(AsyncServerErrorRetryHandler):
    """500/502/503/504: wait ``backoff_s``, doubling each time (``CappedBackoff``)."""

    SERVER_ERRORS = frozenset({500, 502, 503, 504})

    def __init__(self, max_retries: int, backoff_s: float, *, max_wait_s: float = MAX_WAIT_S) -> None:
        super().__init__(max_retry_count=max_retries, interval_calculator=CappedBackoff(backoff_s, max_wait_s))

    async def _can_retry_async(self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None,
                               error: Exception | None = None) -> bool:
        return response is not None and response.status_code in self.SERVER_ERRORS

    async def prepare_for_next_attempt_async(self, *, state: RetryState, request: HttpRequest,
                                             response: HttpResponse | None = None, error: Exception | None = None) -> None:
        if response is not None:
            _log_retry(request, response, self.interval_calculator.calculate_sleep_duration(state.current_attempt))
        await super().prepare_for_next_attempt_async(state=state, request=request, response=response, error=error)


def retry_after_s(response: HttpResponse, max_wait_s: float = MAX_WAIT_S) -> float:
    """A 429's Retry-After in seconds, between 0 and ``max_wait_s``."""
    values = next((v for k, v in response.headers.items() if k.lower() == "retry-after"), None)
    value = values[0] if isinstance(values, list) and values else values
    try:
        return min(max(float(str(value)), 0.0), max_wait_s)
    except ValueError:
        return 1.0  # Slack always sends Retry-After; just in case


def _log_retry(request: HttpRequest, response: HttpResponse, wait: float) -> None:
    # The method name only: an upload URL is itself a credential for the file.
    what = request.url.split("?")[0].rsplit("/api/", 1)[-1] if "/api/" in request.url else "a file upload"
    log.info("slack: %s answered %d; retrying in %.1f s", what, response.status_code, wait)


def configure_client(client: AsyncWebClient, settings: SlackSettings) -> AsyncWebClient:
    """Point bolt's Web API client at SLACK_API_URL and retry 429s and 5xx (both plain attributes)."""
    client.base_url = settings.api_url
    client.retry_handlers = [AsyncConnectionErrorRetryHandler(),
                             RateLimitRetry(settings.max_retries),
                             ServerErrorRetry(settings.max_retries, settings.retry_backoff_s)]
    return client


# -- the outlet --------------------------------------------------------------------------------


class SlackOutlet:
    """Shows jobs in Slack with the bot token (``outlet.Outlet``).

    No ``edit_status_with_preview``, on purpose: chat.update cannot attach a file, and showing a
    preview would take an upload (three calls, a new file) plus an edit per preview, against
    rate limits of about one message a second per channel. Slack shows the progress text only.
    """

    platform = PLATFORM
    progress_interval_s: float | None = None  # [bot] progress_interval_s (chat.update is rate limited)

    def __init__(self, client: AsyncWebClient, emoji_names: Mapping[str, str],
                 on_channel_error: Callable[[StoredJob, str], Awaitable[None]],
                 result_retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self._client, self._on_channel_error = client, on_channel_error
        self.result_retry = result_retry  # whole posts, on top of the client's per-call retries
        self._user_id: str | None = None  # the bot user's id, from auth.test when first needed
        self._names = {normalise_emoji(e): n for e, n in emoji_names.items()}
        self._emojis = {n: e for e, n in reversed(list(self._names.items()))}
        self._unreachable: LRUCache[str, str] = LRUCache(maxsize=REMEMBERED)  # job id -> Slack's refusal: no more calls

    def mention(self, user_id: str) -> str:
        return f"<@{user_id}>"

    def emoji_of(self, reaction: str) -> str | None:
        """Slack's reaction name ("repeat", "+1::skin-tone-2") -> the emoji character we use, if any."""
        return self._emojis.get(reaction.split("::", 1)[0])

    def _text(self, job: StoredJob, text: str) -> str:
        return slack_text(text, self.mention(job.requester.user_id) if job.requester.platform == PLATFORM else "")

    async def _call(self, job: StoredJob, method: Callable[..., Awaitable[Any]], **kwargs: Any) -> Any:
        if job.id in self._unreachable:
            raise ChannelUnavailable(f"job {job.id}: Slack refused the channel: {self._unreachable[job.id]}")
        try:
            return await method(**kwargs)
        except SlackApiError as exc:
            if error_code(exc) not in CHANNEL_ERRORS:
                raise
            self._unreachable[job.id] = error_code(exc)
            await self._on_channel_error(job, error_code(exc))
            raise ChannelUnavailable(f"job {job.id}: Slack refused the channel: {error_code(exc)}") from None

    async def post_status(self, job: StoredJob, text: str) -> MessageRef:
        response = await self._call(job, self._client.chat_postMessage, channel=job.origin.channel_id,
                                    text=self._text(job, text), thread_ts=job.origin.thread_id or None,
                                    unfurl_links=False, unfurl_media=False)
        return MessageRef(str(response["channel"]), str(response["ts"]))

    async def edit_status(self, job: StoredJob, ref: MessageRef, text: str) -> None:
        try:
            await self._call(job, self._client.chat_update, channel=ref.channel_id, ts=ref.message_id,
                             text=self._text(job, text))
        except SlackApiError as exc:
            if error_code(exc) in ("message_not_found", "cant_update_message"):
                raise MessageGone(ref.message_id) from exc
            raise

    async def post_result(self, job: StoredJob, picture: Picture, caption: str, status: MessageRef | None) -> MessageRef:
        channel = job.origin.channel_id
        thread = job.origin.thread_id or (status.message_id if status else None)
        try:
            response = await self._call(job, self._client.files_upload_v2, channel=channel, file=picture.png,
                                        filename=f"{job.id}.png", title=messages.clip(job.params.prompt, 80),
                                        alt_txt=messages.clip(job.params.prompt, 1000),
                                        initial_comment=self._text(job, caption), thread_ts=thread)
        except (SlackApiError, SlackRequestError, aiohttp.ClientError, OSError) as exc:
            if (unavailable := unavailable_error(exc)) is None:
                raise
            raise unavailable from exc
        file_id = str(response["file"]["id"])
        ts = await self._shared_at(job, file_id, channel, thread)
        if ts is None:  # reactions then go on the status message, which maps to the same job
            log.warning("job %s: Slack did not say which message shows file %s", job.id, file_id)
            ts = status.message_id if status else file_id
        return MessageRef(channel, ts)

    async def post_sheet(self, job: StoredJob, sheet_id: str, png: bytes, caption: str) -> MessageRef:
        """A /compare or /sweep contact sheet in ``job``'s channel (its number reactions go on the message)."""
        channel, thread = job.origin.channel_id, job.origin.thread_id or None
        response = await self._call(job, self._client.files_upload_v2, channel=channel, file=png,
                                    filename=f"{sheet_id}-sheet.png", title=messages.clip(job.params.prompt, 80),
                                    initial_comment=slack_text(caption), thread_ts=thread)
        file_id = str(response["file"]["id"])
        return MessageRef(channel, await self._shared_at(job, file_id, channel, thread) or file_id)

    async def find_result(self, job: StoredJob, status: MessageRef | None) -> MessageRef | None:
        """The message showing this bot's ``<job id>.png`` in the job's channel, uploaded since
        shortly before the job finished (files.list, then files.info for the share's ts)."""
        channel = job.origin.channel_id
        thread = job.origin.thread_id or (status.message_id if status else None)
        if self._user_id is None:
            self._user_id = str((await self._client.auth_test()).get("user_id") or "")
        since = int((job.finished_at or job.created_at) - FIND_LOOK_BACK_S)
        listed = await self._client.files_list(channel=channel, user=self._user_id or None, ts_from=str(since),
                                               types="images", count=FIND_FILES)
        for file in listed.get("files") or []:
            if file.get("name") == f"{job.id}.png" and (ts := await self._shared_at(job, str(file["id"]), channel,
                                                                                     thread)) is not None:
                return MessageRef(channel, ts)
        return None

    async def _shared_at(self, job: StoredJob, file_id: str, channel: str, thread: str | None) -> str | None:
        """The ts of the message showing ``file_id`` in ``channel``: files.info ``shares``, which
        Slack fills in shortly after files.completeUploadExternal."""
        for wait in SHARE_WAITS_S:
            await asyncio.sleep(wait)
            try:
                info = await self._client.files_info(file=file_id)
            except SlackApiError as exc:  # files:read missing (an older manifest): fall back, say why
                log.warning("job %s: files.info failed: %s", job.id, error_code(exc))
                return None
            shares = (info.get("file") or {}).get("shares") or {}
            found = [s for kind in ("public", "private") for s in (shares.get(kind) or {}).get(channel, [])]
            if found:
                in_thread = [s for s in found if thread and s.get("thread_ts") == thread]
                return str((in_thread or found)[0]["ts"])
        return None

    async def add_reactions(self, job: StoredJob, ref: MessageRef, emojis: Sequence[str]) -> None:
        for emoji in emojis:
            name = self._names.get(normalise_emoji(emoji))
            if name is None:
                continue  # settings check every configured emoji has a name; nothing to add otherwise
            try:
                await self._client.reactions_add(channel=ref.channel_id, timestamp=ref.message_id, name=name)
            except SlackApiError as exc:
                if error_code(exc) != "already_reacted":
                    raise

    async def retire_status(self, job: StoredJob, ref: MessageRef) -> None:
        """The status message stays (it heads the thread the image is in) and says it is done."""
        try:
            await self._client.chat_update(channel=ref.channel_id, ts=ref.message_id,
                                           text=self._text(job, messages.status_done_in_thread(job_id=job.id,
                                                                                               params=job.params)))
        except SlackApiError as exc:
            if error_code(exc) not in ("message_not_found", "cant_update_message"):
                raise
