"""The Slack adapter (slack-bolt AsyncApp): slash commands and reactions in, jobs out through
``SlackOutlet`` (bot/slack/outlet.py). Socket Mode by default; HTTP mode on request.

Rules of the platform this file follows:

- Slack shows "operation timed out" for a slash command not acknowledged within 3 s: every
  command is acknowledged first, then worked on, and answered privately through the command's
  ``response_url`` (valid 30 minutes, so a long /promptpics preload still gets its answer).
- Events are acknowledged by bolt before our listener runs. Slack redelivers one whose
  acknowledgement it did not see (HTTP ``X-Slack-Retry-Num``, Socket Mode ``retry_attempt``)
  with the same ``event_id``: each event id, and each command's ``trigger_id``, is handled once,
  in memory and in the history's ``seen_keys`` for ``SEEN_TTL_S`` (a redelivery that arrives
  after a restart is recognised too).
- In HTTP mode bolt checks every request's signature and timestamp (401 otherwise).
- Slack escapes ``&``, ``<`` and ``>`` in command text: the prompt is unescaped for the model.
- Reactions are emoji *names* (``repeat``), mapped to characters by [slack.emoji_names].
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from cachetools import LRUCache
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.errors import SlackApiError
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot import messages
from bot.commands import (
    CATALOGUE,
    Actor,
    Commands,
    OptionError,
    Outcome,
    Reply,
    Submitted,
    parse_imagine_text,
    text_usage,
)
from bot.settings import SlackSettings
from bot.sheets import tile_of_emoji
from bot.slack.outlet import (
    PLATFORM,
    REMEMBERED,
    SlackOutlet,
    configure_client,
    error_code,
    slack_text,
    unescape,
)
from bot.slack.socket import CheckedSocketModeHandler
from engine import Origin, StoredJob

log = logging.getLogger(__name__)

LOGIN_ERRORS = frozenset({"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired",
                          "not_allowed_token_type"})
SUBCOMMANDS = ("imagine", "history", "show", "models", "queue", "stats", "workers", "preload", "unload", "gallery",
               "compare", "sweep", "preset", "help")
SIGNATURE_MAX_AGE_S = 5 * 60  # how old a signed HTTP request may be (Slack and bolt allow 5 minutes)
SEEN_TTL_S = 3600.0  # Slack retries an event after about 1 and 5 minutes: an hour covers a restart between


class SlackLoginFailure(Exception):
    """Slack refused a token at start-up; ``str(exc)`` names the variable, never its value."""

    def __init__(self, variable: str, error: str) -> None:
        self.variable, self.error = variable, error
        super().__init__(f"Slack refused {variable} ({error}). Copy it again from your app's page on "
                         f"https://api.slack.com/apps and set {variable}.")


# -- helpers -----------------------------------------------------------------------------------------


def origin_of(body: Mapping[str, Any]) -> Origin:
    """Where a slash command was asked: its channel, and its workspace (the team id)."""
    return Origin(platform=PLATFORM, channel_id=str(body.get("channel_id", "")), server_id=str(body.get("team_id") or ""))


def actor_of(body: Mapping[str, Any]) -> Actor:
    return Actor(platform=PLATFORM, user_id=str(body.get("user_id", "")), display_name=str(body.get("user_name", "")))


# -- the adapter ---------------------------------------------------------------------------------


class SlackApp:
    """One Slack workspace served by the shared ``Commands``; ``outlet`` plugs into Delivery."""

    platform = PLATFORM

    def __init__(self, commands: Commands, settings: SlackSettings) -> None:
        self.commands, self.settings = commands, settings
        # signing_secret "" in Socket Mode: bolt checks signatures only on HTTP requests. The token is
        # passed (not a client) so bolt neither reads SLACK_BOT_TOKEN itself nor warns that it did.
        self.bolt = AsyncApp(name="promptpics", token=settings.bot_token, signing_secret=settings.signing_secret or "",
                             process_before_response=False)
        self.client = configure_client(self.bolt.client, settings)
        self.connected = asyncio.Event()
        self.bot_name = "PromptPics"  # replaced by the bot user's name from auth.test
        self.bot_user_id = ""
        self.http_port: int | None = None  # HTTP mode: the port listened on (the configured one, or a free one for 0)
        self._seen: LRUCache[str, None] = LRUCache(maxsize=REMEMBERED)  # "event:<id>", "command:<trigger_id>"
        self._responders: LRUCache[str, str] = LRUCache(maxsize=REMEMBERED)  # job id -> its /imagine's response_url
        self._notices: LRUCache[str, str] = LRUCache(maxsize=REMEMBERED)  # job id -> why its channel refused it
        self._socket: CheckedSocketModeHandler | None = None
        self._runner: web.AppRunner | None = None
        self._closed = asyncio.Event()
        self.outlet = SlackOutlet(self.client, settings.emoji_names, self._cannot_post)
        self.bolt.command(settings.imagine_command)(self.on_imagine)
        self.bolt.command(settings.admin_command)(self.on_admin)
        self.bolt.event("reaction_added")(self.on_reaction)
        self.bolt.error(self._on_error)

    # -- lifetime ------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Check the tokens, connect (Socket Mode) or listen (HTTP), and serve until closed."""
        url = await self._log_in()
        if url is not None:
            self._socket = CheckedSocketModeHandler(self.bolt, app_token=self.settings.app_token or "",
                                                   web_client=self.client)
            self._socket.client.wss_uri = url  # the one apps.connections.open just issued (it checked the token)
            await self._socket.connect_async()
            log.info("slack: connected as %s (Socket Mode)", self.bot_name)
        else:
            await self._listen()
        self.connected.set()
        await self._closed.wait()

    async def reset(self) -> None:
        """After a failure (bot/supervise.py): drop the connection or listener so ``serve()`` starts anew."""
        self.connected.clear()
        socket, self._socket = self._socket, None
        runner, self._runner = self._runner, None
        if socket is not None:
            await socket.close_async()
        if runner is not None:
            await runner.cleanup()

    async def close(self) -> None:
        self._closed.set()
        if self._socket is not None:
            await self._socket.close_async()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _log_in(self) -> str | None:
        """auth.test checks SLACK_BOT_TOKEN; in Socket Mode apps.connections.open checks SLACK_APP_TOKEN
        and returns the WebSocket URL (a refused token would otherwise be retried forever)."""
        try:
            auth = await self.client.auth_test()
        except SlackApiError as exc:
            if error_code(exc) in LOGIN_ERRORS:
                raise SlackLoginFailure("SLACK_BOT_TOKEN", error_code(exc)) from None
            raise
        self.bot_user_id, self.bot_name = str(auth.get("user_id", "")), str(auth.get("user") or self.bot_name)
        if self.settings.mode != "socket":
            return None
        try:
            opened = await self.client.apps_connections_open(app_token=self.settings.app_token or "")
        except SlackApiError as exc:
            if error_code(exc) in LOGIN_ERRORS:
                raise SlackLoginFailure("SLACK_APP_TOKEN", error_code(exc)) from None
            raise
        return str(opened["url"])

    async def _listen(self) -> None:
        """HTTP mode: Slack POSTs commands and events to http_path; bolt checks each signature."""
        app = web.Application()
        app.router.add_post(self.settings.http_path, self._http_request)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.http_host, self.settings.http_port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # the real port when 0 asked for a free one
        self.http_port = sockets[0].getsockname()[1] if sockets else self.settings.http_port
        log.info("slack: connected as %s; listening on %s:%s%s (HTTP mode)", self.bot_name, self.settings.http_host,
                 self.http_port, self.settings.http_path)

    async def _http_request(self, request: web.Request) -> web.Response:
        """Verify, then parse. aiohttp refuses a body over its limit (413); the signature is checked
        on the raw bytes before anything decodes them (401, nothing parsed); a signed body that does
        not decode as a Slack request is a 400 and one log line, never a traceback."""
        raw = await request.read()
        if not self._signed(raw, request.headers):
            log.info("slack: refused an HTTP request without a valid signature (%d bytes)", len(raw))
            return web.Response(status=401, text="invalid request signature")
        try:
            bolt_request = AsyncBoltRequest(body=raw.decode("utf-8"), query=request.query_string,
                                            headers=request.headers)  # type: ignore[arg-type]
        except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError (a truncated event or payload)
            log.warning("slack: refused a signed HTTP request that does not parse (%s, %d bytes)",
                        type(exc).__name__, len(raw))
            return web.Response(status=400, text="malformed request body")
        return await to_aiohttp_response(await self.bolt.async_dispatch(bolt_request))

    def _signed(self, raw: bytes, headers: Mapping[str, str]) -> bool:
        """Slack's v0 signature over the raw bytes (slack_sdk's SignatureVerifier decodes the body
        as UTF-8 first, so it cannot judge a body that is not); 5 minutes of clock skew, as bolt."""
        timestamp, signature = headers.get("X-Slack-Request-Timestamp", ""), headers.get("X-Slack-Signature", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > SIGNATURE_MAX_AGE_S:
            return False
        secret = (self.settings.signing_secret or "").encode()
        expected = "v0=" + hmac.new(secret, b"v0:" + timestamp.encode() + b":" + raw, hashlib.sha256).hexdigest()
        return bool(secret) and hmac.compare_digest(expected, signature)

    # -- commands ------------------------------------------------------------------------------

    async def on_imagine(self, ack: Any, body: dict[str, Any], respond: Any) -> None:
        if await self._seen_before("command", body.get("trigger_id")):
            await ack()
            return
        try:
            options = parse_imagine_text(unescape(str(body.get("text", ""))))
        except OptionError as exc:  # bad flags: answered in the acknowledgement itself, no job
            await ack(text=slack_text(messages.option_error(str(exc), text_usage())))
            return
        if not options.prompt.strip():
            await ack(text=slack_text(messages.option_error(messages.prompt_needed(self.settings.imagine_command),
                                                            text_usage())))
            return
        await ack()  # routing may take longer than Slack's 3 s
        origin = origin_of(body)
        outcome = await self._guarded(lambda: self.commands.imagine(actor_of(body), options, origin))
        await self._answer(respond, body, outcome)

    async def on_admin(self, ack: Any, body: dict[str, Any], respond: Any) -> None:
        await ack()
        if await self._seen_before("command", body.get("trigger_id")):
            return
        words = unescape(str(body.get("text", ""))).strip().lstrip("/")
        name = words.split()[0].lower() if words else "help"
        actor = actor_of(body)
        outcome: Outcome | None
        if name not in SUBCOMMANDS:
            outcome = Reply(messages.unknown_subcommand(self.settings.admin_command, name, SUBCOMMANDS), ok=False)
        elif name == "help":
            outcome = self.help(actor)
        else:
            origin = origin_of(body)
            outcome = await self._guarded(lambda: self.commands.run_line(actor, "/" + words, origin))
        await self._answer(respond, body, outcome)

    def help(self, actor: Actor) -> Reply:
        """The catalogue as typed in Slack: /imagine, and the rest under the one admin command."""
        s = self.settings
        entries = [(c.usage.replace("/imagine", s.imagine_command, 1) if c.name == "imagine"
                    else f"{s.admin_command} {c.usage.lstrip('/')}", c.summary, c.admin)
                   for c in CATALOGUE if c.name not in ("react", "pick")]
        return Reply(messages.help_text(entries, self.commands.is_admin(actor)))

    async def _guarded(self, work: Callable[[], Awaitable[Outcome | None]]) -> Outcome | None:
        try:  # the catch-all of this boundary: the user gets a sentence, the log the traceback
            return await work()
        except Exception as exc:
            return Reply(messages.describe_error(exc), ok=False)

    async def _answer(self, respond: Any, body: Mapping[str, Any], outcome: Outcome | None) -> None:
        """Private answers through the response_url. A job's channel may refuse it before or after
        "got it" is said; either way the user hears why, once, after "got it"."""
        if outcome is None:
            return
        if not isinstance(outcome, Submitted):
            await self._respond(respond, outcome.text)
            return
        job_id = outcome.handle.id
        if job_id not in self._notices:
            await self._respond(respond, outcome.reply.text)
        if job_id in self._notices:
            await self._respond(respond, self._notices[job_id])
        elif url := str(body.get("response_url") or ""):
            self._responders[job_id] = url

    async def _respond(self, respond: Any, text: str) -> None:
        try:
            await respond(text=slack_text(text), response_type="ephemeral")
        except Exception as exc:  # an expired response_url: nothing else reaches the user privately
            log.warning("slack: could not answer a command: %s", exc)

    # -- reactions -----------------------------------------------------------------------------

    async def on_reaction(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        item, user = event.get("item") or {}, str(event.get("user", ""))
        emoji = self.outlet.emoji_of(str(event.get("reaction", "")))
        if item.get("type") != "message" or user == self.bot_user_id or emoji is None:
            return
        if self.commands.reaction_action(emoji) is None and tile_of_emoji(emoji, 9) is None:
            return  # not one of ours: no database look-up for every reaction in the workspace
        if await self._seen_before("event", body.get("event_id")):
            return  # Slack's redelivery of an event already handled
        channel, ts = str(item.get("channel", "")), str(item.get("ts", ""))
        root: str | None = None
        try:  # the catch-all of this boundary
            job = await self.commands.engine.deliveries.job_by_message(platform=PLATFORM, channel_id=channel, message_id=ts)
            if job is None:  # a contact sheet's number (bot/commands/compare.py), or not a message of ours
                await self._on_sheet_reaction(user, emoji, channel, ts)
                return
            root = await self._thread_root(job, channel, ts)
            origin = Origin(platform=PLATFORM, channel_id=channel, thread_id=root, message_ref=ts,
                            server_id=str(body.get("team_id") or ""))
            outcome = await self.commands.react(Actor(PLATFORM, user), job, emoji, origin)
        except Exception as exc:
            outcome = Reply(messages.describe_error(exc), ok=False)
            job = None
        if outcome is None or isinstance(outcome, Submitted):
            return  # a new job: its status message answers
        try:
            if outcome.delete_target and job is not None:
                await self._delete_messages(job)
                log.info("job %s: messages deleted by user %s", job.id, user)
            elif outcome.text:
                await self.client.chat_postEphemeral(channel=channel, user=user, text=slack_text(outcome.text),
                                                     thread_ts=root if root and root != ts else None)
        except SlackApiError as exc:
            log.warning("slack: could not answer a reaction on message %s: %s", ts, error_code(exc))

    async def _on_sheet_reaction(self, user: str, emoji: str, channel: str, ts: str) -> None:
        reply = await self.commands.groups.react(Actor(PLATFORM, user), emoji, platform=PLATFORM, channel_id=channel,
                                                 message_id=ts)
        if reply is not None and reply.text:
            await self.client.chat_postEphemeral(channel=channel, user=user, text=slack_text(reply.text))

    async def _thread_root(self, job: StoredJob, channel: str, ts: str) -> str:
        """A job made by a reaction answers in the thread of the image reacted to (Slack threads
        are one level deep: the root is the first job's status message)."""
        if job.origin.platform == PLATFORM and job.origin.thread_id:
            return job.origin.thread_id
        statuses = [d.message_id for d in await self.commands.engine.deliveries.of_job(job.id)
                    if d.kind == "status" and d.platform == PLATFORM and d.channel_id == channel]
        return statuses[-1] if statuses else ts

    async def _delete_messages(self, job: StoredJob) -> None:
        """Delete the job's messages: the image (a thread reply) first, then the status that heads it."""
        shown = [d for d in await self.commands.engine.deliveries.of_job(job.id) if d.platform == PLATFORM]
        for d in sorted(shown, key=lambda d: d.kind != "result"):
            try:
                await self.client.chat_delete(channel=d.channel_id, ts=d.message_id)
            except SlackApiError as exc:
                if error_code(exc) != "message_not_found":
                    raise

    # -- bookkeeping ---------------------------------------------------------------------------

    async def _cannot_post(self, job: StoredJob, error: str) -> None:
        """The job's channel refused a message: cancel the job (it would run for nobody) and say why."""
        notice = messages.cannot_post_here(error, self.bot_name)
        self._notices[job.id] = notice
        log.warning("job %s: Slack refused channel %s (%s); cancelling it", job.id, job.origin.channel_id, error)
        await self.commands.engine.cancel(job.id)
        if (url := self._responders.pop(job.id, None)) is not None:
            try:
                await AsyncWebhookClient(url).send(text=slack_text(notice), response_type="ephemeral")
            except Exception as exc:
                log.warning("job %s: could not tell the requester: %s", job.id, exc)

    async def _seen_before(self, kind: str, key: object) -> bool:
        """True for an event or command already handled (Slack's retries), also before a restart.
        Memory decides first, with no await between check and mark (concurrent copies in this
        process stop here); then the history's seen_keys, one atomic insert (a copy after a restart)."""
        if not key:
            return False
        name = f"{kind}:{key}"
        if name in self._seen:
            log.info("slack: ignoring a repeated %s %s", kind, key)
            return True
        self._seen[name] = None
        try:
            seen = await self.commands.engine.dedup.seen_before(f"{PLATFORM}:{name}", SEEN_TTL_S)
        except Exception as exc:  # the history cannot be written: a rare duplicate beats a lost request
            log.warning("slack: could not keep %s %s as handled: %s", kind, key, exc)
            return False
        if seen:
            log.info("slack: ignoring a repeated %s %s (handled before a restart)", kind, key)
        return seen

    async def _on_error(self, error: Exception, body: dict[str, Any]) -> None:
        log.error("slack: a %s request failed", body.get("type") or body.get("command") or "Slack", exc_info=error)
