"""A fake Slack on 127.0.0.1: enough of the Web API, file uploads, response URLs and Socket Mode
for the real slack-bolt and slack_sdk clients.

It keeps what a test wants to look at: every Web API call (method, arguments, which token, the
status answered), the messages in each channel with their edits, reactions and files, the
private answers sent to response URLs, and the Socket Mode acknowledgements. Tests drive it like
Slack would: ``envelope(...)`` sends a Socket Mode envelope, ``command(...)`` and
``reaction(...)`` build the payloads, ``signed_headers(...)`` signs an HTTP-mode request.
``fail(...)`` makes the next calls of a method answer 429, 5xx or a Slack error. files.list
lists the shared files as Slack does (by channel, uploader, creation time, type; newest first).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from slack_sdk.signature import SignatureVerifier

TEAM_ID = "T0FAKE0001"
OTHER_TEAM_ID = "T0OTHER001"  # a second workspace the app is installed in
APP_ID = "A0FAKE0001"
BOT_USER = "U0BOT00001"
BOT_ID = "B0BOT00001"
BOT_NAME = "promptpics"
ALICE, BOB, ADMIN = "U0ALICE001", "U0BOB00001", "U0ADMIN001"
CHANNEL = "C0GENERAL1"  # the bot is a member
ADULT_CHANNEL = "C0ADULTS01"  # the bot is a member; config's [safety] allow-list names it
OUTSIDE_CHANNEL = "C0OUTSIDE1"  # a public channel the bot was never invited to
PEOPLE_DM = "D0PEOPLE01"  # a direct message between two people: the bot cannot see it
BOT_TOKEN = "xoxb-fake-bot-token"
APP_TOKEN = "xapp-fake-app-token"
SIGNING_SECRET = "fake-signing-secret"
OTHER_TEAM_CHANNEL = "C0ELSEWHR1"  # in OTHER_TEAM_ID's workspace; the bot is a member
MEMBER_OF = {CHANNEL: True, ADULT_CHANNEL: True, OUTSIDE_CHANNEL: False, OTHER_TEAM_CHANNEL: True}


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    token: str | None
    status: int = 200
    error: str | None = None


@dataclass
class Fault:
    method: str
    status: int
    error: str
    headers: dict[str, str]
    times: int


@dataclass
class Message:
    ts: str
    channel: str
    text: str
    thread_ts: str | None = None
    files: list[str] = field(default_factory=list)
    edits: list[str] = field(default_factory=list)
    reactions: list[str] = field(default_factory=list)
    deleted: bool = False


def _ok(data: dict[str, Any] | None = None, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"ok": True, **(data or {})}, status=status, headers=headers)


def _error(error: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"ok": False, "error": error}, status=status, headers=headers)


def signed_headers(body: str, *, secret: str = SIGNING_SECRET, timestamp: int | None = None,
                   content_type: str = "application/x-www-form-urlencoded") -> dict[str, str]:
    """The headers Slack sends with an HTTP-mode request (v0 signature of timestamp and body)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = SignatureVerifier(secret).generate_signature(timestamp=ts, body=body) or ""
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": signature, "Content-Type": content_type}


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.messages: dict[str, Message] = {}
        self.ephemerals: list[dict[str, Any]] = []  # chat.postEphemeral
        self.responses: dict[str, list[dict[str, Any]]] = {}  # response URL id -> what was posted to it
        self.uploads: dict[str, bytes] = {}  # file id -> the bytes sent to its upload URL
        self.files: dict[str, dict[str, Any]] = {}
        self.acks: dict[str, dict[str, Any]] = {}  # Socket Mode: envelope id -> the app's acknowledgement
        self.share_delay = 1  # files.info answers without shares this many times per file (Slack shares later)
        self.connections_opened = 0
        self.socket_connected = asyncio.Event()
        self._faults: list[Fault] = []
        self._info_calls: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._ws: web.WebSocketResponse | None = None
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.scopes: tuple[str, ...] | None = None  # auth.test's x-oauth-scopes header, when set

    # -- lifetime ----------------------------------------------------------------------------

    async def start(self) -> FakeSlack:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_post("/response/{rid}", self._response_url)
        app.router.add_get("/socket", self._socket)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return self.base + "/api/"

    # -- what tests look at ------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Wait until ``predicate()`` is truthy (checked after every request); return its value."""
        async def check() -> Any:
            async with self._changed:
                await self._changed.wait_for(predicate)
            return predicate()

        return await asyncio.wait_for(check(), timeout)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def channel_messages(self, channel: str = CHANNEL, *, with_files: bool | None = None) -> list[Message]:
        found = [m for m in self.messages.values() if m.channel == channel and not m.deleted]
        return found if with_files is None else [m for m in found if bool(m.files) == with_files]

    def answers(self, payload: dict[str, Any]) -> list[str]:
        """The texts posted to a command's response URL (its private answers)."""
        return [r.get("text", "") for r in self.responses.get(payload["response_url"].rsplit("/", 1)[1], [])]

    def fail(self, method: str, *, status: int = 200, error: str = "ratelimited", headers: dict[str, str] | None = None,
             times: int = 1) -> None:
        """The next ``times`` calls of ``method`` answer ``status`` with Slack error ``error``."""
        self._faults.append(Fault(method, status, error, headers or {}, times))

    # -- payloads, as Slack sends them ---------------------------------------------------------

    def command(self, command: str, text: str, *, user: str = ALICE, channel: str = CHANNEL,
                team: str = TEAM_ID) -> dict[str, Any]:
        n = next(self._ids)
        return {"token": "deprecated-verification-token", "team_id": team, "team_domain": "fake",
                "channel_id": channel, "channel_name": "general", "user_id": user, "user_name": user.lower(),
                "command": command, "text": text, "api_app_id": APP_ID, "is_enterprise_install": "false",
                "response_url": f"{self.base}/response/{n}", "trigger_id": f"{n}.trigger"}

    def reaction(self, ts: str, name: str, *, user: str = ALICE, channel: str = CHANNEL,
                 event_id: str | None = None) -> dict[str, Any]:
        n = next(self._ids)
        return {"token": "deprecated-verification-token", "team_id": TEAM_ID, "api_app_id": APP_ID,
                "type": "event_callback", "event_id": event_id or f"Ev{n:08d}", "event_time": int(time.time()),
                "authorizations": [{"team_id": TEAM_ID, "user_id": BOT_USER, "is_bot": True}],
                "event": {"type": "reaction_added", "user": user, "reaction": name, "item_user": BOT_USER,
                          "item": {"type": "message", "channel": channel, "ts": ts}, "event_ts": f"{time.time():.6f}"}}

    # -- Socket Mode ---------------------------------------------------------------------------

    async def envelope(self, kind: str, payload: dict[str, Any], *, retry_attempt: int | None = None,
                       envelope_id: str | None = None) -> str:
        """Send one envelope down the Socket Mode connection; returns its id."""
        assert self._ws is not None, "no Socket Mode client is connected"
        envelope_id = envelope_id or f"env-{next(self._ids)}"
        message: dict[str, Any] = {"envelope_id": envelope_id, "type": kind, "payload": payload,
                                   "accepts_response_payload": kind != "events_api"}
        if retry_attempt is not None:
            message.update(retry_attempt=retry_attempt, retry_reason="timeout")
        await self._ws.send_str(json.dumps(message))
        return envelope_id

    async def send_raw(self, frame: str) -> None:
        """Send ``frame`` down the Socket Mode connection as it is (say, a truncated envelope)."""
        assert self._ws is not None, "no Socket Mode client is connected"
        await self._ws.send_str(frame)

    async def ack_of(self, envelope_id: str) -> dict[str, Any]:
        return await self.wait_for(lambda: self.acks.get(envelope_id))

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()  # answers the client's pings by itself
        await ws.prepare(request)
        self._ws = ws
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1, "debug_info": {"host": "fake"},
                                      "connection_info": {"app_id": APP_ID}}))
        self.socket_connected.set()
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                data = json.loads(msg.data)
                self.acks[data["envelope_id"]] = data
                await self._notify()
        return ws

    # -- the Web API ---------------------------------------------------------------------------

    async def _args(self, request: web.Request) -> dict[str, Any]:
        """Arguments come as a query string (files_upload_v2, params=), a form or JSON, or a mix."""
        args: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            args.update(await request.json())
        elif request.can_read_body:
            args.update(dict(await request.post()))
        return args

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        auth = request.headers.get("Authorization", "")
        call = Call(method, await self._args(request), auth.removeprefix("Bearer ") or None)
        self.calls.append(call)
        response = self._answer(call)
        call.status = response.status
        call.error = json.loads(response.body).get("error") if isinstance(response.body, bytes) else None
        await self._notify()
        return response

    def _answer(self, call: Call) -> web.Response:
        for fault in self._faults:
            if fault.method == call.method and fault.times > 0:
                fault.times -= 1
                return _error(fault.error, fault.status, fault.headers)
        wanted = APP_TOKEN if call.method == "apps.connections.open" else BOT_TOKEN
        if call.token != wanted:
            return _error("not_allowed_token_type" if call.token in (BOT_TOKEN, APP_TOKEN) else "invalid_auth")
        handler = getattr(self, "_" + call.method.replace(".", "_"), None)
        return handler(call.args) if handler else _error("unknown_method", 404)

    def _auth_test(self, args: dict[str, Any]) -> web.Response:
        scopes = {"x-oauth-scopes": ",".join(self.scopes)} if self.scopes is not None else None
        return _ok({"url": "https://fake.slack.com/", "team": "Fake", "user": BOT_NAME, "team_id": TEAM_ID,
                    "user_id": BOT_USER, "bot_id": BOT_ID, "is_enterprise_install": False}, headers=scopes)

    def _apps_connections_open(self, args: dict[str, Any]) -> web.Response:
        self.connections_opened += 1
        return _ok({"url": f"ws://127.0.0.1:{self.port}/socket"})

    def _new_ts(self) -> str:
        return f"{1700000000 + next(self._ids)}.{next(self._ids):06d}"

    @staticmethod
    def _channel_error(channel: str) -> web.Response | None:
        if channel not in MEMBER_OF:
            return _error("channel_not_found")
        return None if MEMBER_OF[channel] else _error("not_in_channel")

    def _message(self, args: dict[str, Any]) -> Message | None:
        message = self.messages.get(str(args.get("ts") or args.get("timestamp")))
        return message if message is not None and message.channel == args.get("channel") and not message.deleted else None

    def _chat_postMessage(self, args: dict[str, Any]) -> web.Response:
        if (refused := self._channel_error(args["channel"])) is not None:
            return refused
        message = Message(self._new_ts(), args["channel"], args["text"], args.get("thread_ts"))
        self.messages[message.ts] = message
        return _ok({"channel": message.channel, "ts": message.ts, "message": {"text": message.text}})

    def _chat_update(self, args: dict[str, Any]) -> web.Response:
        message = self._message(args)
        if message is None:
            return _error("message_not_found")
        message.text = args["text"]
        message.edits.append(args["text"])
        return _ok({"channel": message.channel, "ts": message.ts, "text": message.text})

    def _chat_delete(self, args: dict[str, Any]) -> web.Response:
        message = self._message(args)
        if message is None:
            return _error("message_not_found")
        message.deleted = True
        return _ok({"channel": message.channel, "ts": message.ts})

    def _chat_postEphemeral(self, args: dict[str, Any]) -> web.Response:
        if (refused := self._channel_error(args["channel"])) is not None:
            return refused
        self.ephemerals.append(args)
        return _ok({"message_ts": self._new_ts()})

    def _reactions_add(self, args: dict[str, Any]) -> web.Response:
        message = self._message(args)
        if message is None:
            return _error("message_not_found")
        if args["name"] in message.reactions:
            return _error("already_reacted")
        message.reactions.append(args["name"])
        return _ok()

    def _files_getUploadURLExternal(self, args: dict[str, Any]) -> web.Response:
        file_id = f"F{next(self._ids):09d}"
        self.files[file_id] = {"id": file_id, "name": args["filename"], "length": int(args["length"]),
                               "alt_txt": args.get("alt_txt"), "shares": {}, "user": BOT_USER,
                               "created": int(time.time()), "channels": []}
        return _ok({"upload_url": f"{self.base}/upload/{file_id}", "file_id": file_id})

    def _files_completeUploadExternal(self, args: dict[str, Any]) -> web.Response:
        files = json.loads(args["files"]) if isinstance(args["files"], str) else args["files"]
        channel = args.get("channel_id")
        if channel and (refused := self._channel_error(channel)) is not None:
            return refused
        for f in files:
            if f["id"] not in self.uploads or len(self.uploads[f["id"]]) != self.files[f["id"]]["length"]:
                return _error("file_upload_incomplete")
            self.files[f["id"]]["title"] = f.get("title")
        if channel:
            message = Message(self._new_ts(), channel, args.get("initial_comment", ""), args.get("thread_ts"),
                              files=[f["id"] for f in files])
            self.messages[message.ts] = message
            for f in files:
                share = {"ts": message.ts, "channel_name": "general", "team_id": TEAM_ID, "share_user_id": BOT_USER}
                if message.thread_ts:
                    share["thread_ts"] = message.thread_ts
                self.files[f["id"]]["shares"] = {"public": {channel: [share]}}
                self.files[f["id"]]["channels"] = [channel]
        return _ok({"files": [{"id": f["id"], "title": f.get("title")} for f in files]})

    def _files_info(self, args: dict[str, Any]) -> web.Response:
        file = self.files.get(args["file"])
        if file is None:
            return _error("file_not_found")
        self._info_calls[file["id"]] = seen = self._info_calls.get(file["id"], 0) + 1
        return _ok({"file": file if seen > self.share_delay else {**file, "shares": {}}})

    def _files_list(self, args: dict[str, Any]) -> web.Response:
        """Files shared in ``channel``, uploaded by ``user``, created in [ts_from, ts_to], of
        ``types`` ("images": png, jpg, gif, webp); newest first, ``count`` a page."""
        images = (".png", ".jpg", ".jpeg", ".gif", ".webp")
        found = [f for f in self.files.values()
                 if (not args.get("channel") or args["channel"] in f["channels"])
                 and (not args.get("user") or f["user"] == args["user"])
                 and int(args.get("ts_from") or 0) <= f["created"] <= int(args.get("ts_to") or 2**40)
                 and (args.get("types", "all") != "images" or f["name"].lower().endswith(images))]
        found.sort(key=lambda f: f["created"], reverse=True)
        count, page = int(args.get("count") or 100), int(args.get("page") or 1)
        listed = [{k: v for k, v in f.items() if k != "shares"} for f in found[(page - 1) * count:page * count]]
        return _ok({"files": listed, "paging": {"count": count, "total": len(found), "page": page,
                                                "pages": max(1, -(-len(found) // count))}})

    # -- uploads and response URLs -----------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        self.uploads[request.match_info["file_id"]] = await request.read()
        await self._notify()
        return web.Response(text=f"OK - {len(self.uploads[request.match_info['file_id']])}")

    async def _response_url(self, request: web.Request) -> web.Response:
        self.responses.setdefault(request.match_info["rid"], []).append(await request.json())
        await self._notify()
        return web.Response(text="ok")
