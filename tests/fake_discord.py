"""A fake Discord on 127.0.0.1: enough of the REST API and the gateway for the real discord.py.

It keeps what a test wants to look at: every request (method, path, JSON, files, which token),
the messages in each channel with their reactions, and the registered commands. Tests drive
it like Discord would: ``slash(...)`` dispatches an INTERACTION_CREATE, ``react(...)`` a
MESSAGE_REACTION_ADD. discord.py needs ``Content-Type: application/json`` exactly.

Like Discord: message ids are snowflakes of the time they were made; GET
/channels/{id}/messages pages with ``before``/``after``/``around``/``limit`` (newest first);
a message sent with ``enforce_nonce`` and the nonce of one the same author sent in the last
``NONCE_WINDOW_S`` is not made again: that one is returned. ``fail(...)`` makes the next
matching requests answer an error, before or after doing their work (a lost answer).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

APP_ID = 900000000000000001
BOT_USER = {"id": str(APP_ID), "username": "PromptPics", "discriminator": "0", "avatar": None, "bot": True,
            "global_name": None, "public_flags": 0}
GUILD_ID = 900000000000000100
CHANNEL_ID = 900000000000000200
OTHER_CHANNEL_ID = 900000000000000201
ADULT_CHANNEL_ID = 900000000000000202  # age-restricted ("NSFW") in Discord's channel settings
OTHER_GUILD_ID = 900000000000000110  # a second server: the bot is in it, the gateway sends nothing of it
OTHER_GUILD_CHANNEL_ID = 900000000000000210
ADULT_CHANNELS = {ADULT_CHANNEL_ID}
ADMIN_ROLE_ID = 900000000000000300
ALICE, BOB, ADMIN = 900000000000000401, 900000000000000402, 900000000000000403
BOT_TOKEN = "fake-bot-token"
INVALID_WEBHOOK_TOKEN = {"message": "Invalid Webhook Token", "code": 50027}
DISCORD_EPOCH_MS = 1420070400000
NONCE_WINDOW_S = 120.0  # Discord: "checked for uniqueness in the past few minutes"


@dataclass
class Call:
    method: str
    path: str
    body: Any = None
    files: dict[str, bytes] = field(default_factory=dict)
    bot_auth: bool = False  # sent with "Authorization: Bot <token>"
    status: int = 200


@dataclass
class Fault:
    method: str
    path: str  # a fragment of the path
    status: int
    times: int
    after_effect: bool  # the work is done, then the error is answered (the answer is "lost")
    when: Callable[[Call], bool] | None = None  # only requests this says yes to


def user(user_id: int) -> dict[str, Any]:
    return {"id": str(user_id), "username": f"user{user_id % 1000}", "discriminator": "0", "avatar": None,
            "global_name": None, "public_flags": 0}


def member(user_id: int, roles: tuple[int, ...] = ()) -> dict[str, Any]:
    return {"user": user(user_id), "roles": [str(r) for r in roles], "joined_at": "2024-01-01T00:00:00+00:00",
            "deaf": False, "mute": False, "flags": 0, "nick": None, "permissions": "2147483647"}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


class FakeDiscord:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._calls_by_request: dict[int, Call] = {}
        self.messages: dict[int, dict[str, Any]] = {}  # every message ever posted, deleted ones marked
        self.reactions: dict[int, list[str]] = {}
        self.commands: dict[str, list[dict[str, Any]]] = {}  # "global" or a guild id -> commands
        self.interactions: dict[str, dict[str, Any]] = {}  # token -> interaction payload
        self.expire_tokens_after_ack = False  # the 15-minute interaction token, shortened to one reply
        self._expired: set[str] = set()
        self._ids = itertools.count(900000000001000000)
        self._last_snowflake = 0
        self._faults: list[Fault] = []
        self._seq = itertools.count(1)
        self._gateway: web.WebSocketResponse | None = None
        self._changed = asyncio.Condition()
        self.identified = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifetime ----------------------------------------------------------------------------

    async def start(self) -> FakeDiscord:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/gateway", self._gateway_handler)
        r = "/api/v10"
        app.router.add_get(r + "/users/@me", self._me)
        app.router.add_get(r + "/oauth2/applications/@me", self._app_info)
        app.router.add_post(r + "/interactions/{id}/{token}/callback", self._callback)
        app.router.add_post(r + "/webhooks/{app}/{token}", self._followup)
        app.router.add_route("*", r + "/webhooks/{app}/{token}/messages/{mid}", self._webhook_message)
        app.router.add_post(r + "/channels/{cid}/messages", self._post_message)
        app.router.add_get(r + "/channels/{cid}/messages", self._history)
        app.router.add_patch(r + "/channels/{cid}/messages/{mid}", self._edit_message)
        app.router.add_delete(r + "/channels/{cid}/messages/{mid}", self._delete_message)
        app.router.add_put(r + "/channels/{cid}/messages/{mid}/reactions/{emoji}/@me", self._put_reaction)
        app.router.add_put(r + "/applications/{app}/commands", self._sync_commands)
        app.router.add_put(r + "/applications/{app}/guilds/{gid}/commands", self._sync_commands)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        if self._gateway is not None:
            await self._gateway.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # -- what tests look at ------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Wait until ``predicate()`` is truthy (checked after every request); return its value."""
        async def check() -> Any:
            async with self._changed:
                await self._changed.wait_for(predicate)
            return predicate()

        return await asyncio.wait_for(check(), timeout)

    def channel_messages(self, channel_id: int = CHANNEL_ID, *, with_files: bool | None = None) -> list[dict[str, Any]]:
        found = [m for m in self.messages.values() if m["channel_id"] == str(channel_id) and not m.get("deleted")]
        if with_files is not None:
            found = [m for m in found if bool(m.get("files")) == with_files]
        return found

    def followups(self, interaction: dict[str, Any]) -> list[dict[str, Any]]:
        """The replies sent through ``interaction``'s webhook (its token)."""
        return [m for m in self.messages.values() if m.get("token") == interaction["token"]]

    def calls_to(self, method: str, fragment: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and fragment in c.path]

    def fail(self, method: str, path: str, *, status: int = 500, times: int = 1, after_effect: bool = False,
             when: Callable[[Call], bool] | None = None) -> None:
        """The next ``times`` ``method`` requests whose path contains ``path`` (and that ``when``
        accepts) answer ``status``; ``after_effect``: only after doing what they asked (a message
        is made, its answer lost)."""
        self._faults.append(Fault(method, path, status, times, after_effect, when))

    def _fault(self, call: Call) -> Fault | None:
        for fault in self._faults:
            if (fault.times > 0 and fault.method == call.method and fault.path in call.path
                    and (fault.when is None or fault.when(call))):
                fault.times -= 1
                return fault
        return None

    def _snowflake(self) -> int:
        """A message id the way Discord makes them: milliseconds since 2015 in the high bits."""
        made = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last_snowflake = max(made, self._last_snowflake + 1)
        return self._last_snowflake

    async def _changed_now(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- events sent down the gateway ---------------------------------------------------------

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        assert self._gateway is not None, "no client is connected"
        await self._gateway.send_str(json.dumps({"op": 0, "t": event, "s": next(self._seq), "d": data}))

    async def send_raw(self, frame: str) -> None:
        """Send ``frame`` down the gateway as it is (say, one that is not JSON)."""
        assert self._gateway is not None, "no client is connected"
        await self._gateway.send_str(frame)

    async def slash(self, name: str, options: dict[str, Any] | None = None, *, user_id: int = ALICE,
                    roles: tuple[int, ...] = (), size_limit: int = 10 * 1024 * 1024,
                    channel_id: int = CHANNEL_ID, app_permissions: int = 2**41 - 1,
                    guild_id: int = GUILD_ID, send: bool = True) -> dict[str, Any]:
        """Dispatch INTERACTION_CREATE for ``/name`` with ``options`` (unless ``send`` is false);
        returns the payload."""
        kinds = {str: 3, bool: 5, int: 4, float: 10}
        interaction_id = next(self._ids)
        token = f"itoken-{interaction_id}"
        payload = {
            "id": str(interaction_id), "application_id": str(APP_ID), "type": 2, "token": token, "version": 1,
            "guild_id": str(guild_id), "channel_id": str(channel_id),
            "channel": {"id": str(channel_id), "type": 0, "guild_id": str(guild_id), "name": "general", "position": 0,
                        "permission_overwrites": [], "nsfw": channel_id in ADULT_CHANNELS},
            "member": member(user_id, roles), "app_permissions": str(app_permissions), "locale": "en-US",
            "guild_locale": "en-US", "entitlements": [], "attachment_size_limit": size_limit, "context": 0,
            "authorizing_integration_owners": {"0": str(guild_id)},
            "data": {"id": str(next(self._ids)), "name": name, "type": 1,
                     "options": [{"name": k, "type": kinds[type(v)], "value": v} for k, v in (options or {}).items()]},
        }
        self.interactions[token] = payload
        if send:
            await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def react(self, message_id: int | str, emoji: str, *, user_id: int = ALICE, roles: tuple[int, ...] = (),
                    channel_id: int = CHANNEL_ID) -> None:
        await self.dispatch("MESSAGE_REACTION_ADD", {
            "user_id": str(user_id), "channel_id": str(channel_id), "message_id": str(message_id),
            "guild_id": str(GUILD_ID), "member": member(user_id, roles), "burst": False, "type": 0,
            "emoji": {"id": None, "name": emoji}, "message_author_id": str(APP_ID),
        })

    # -- REST ----------------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        if request.path == "/gateway":
            return await handler(request)
        call = Call(request.method, urllib.parse.unquote(request.path),
                    bot_auth=request.headers.get("Authorization") == f"Bot {BOT_TOKEN}")
        if request.content_type == "multipart/form-data":
            async for part in await request.multipart():  # type: ignore[union-attr]
                data = await part.read()  # type: ignore[union-attr]
                if part.name == "payload_json":
                    call.body = json.loads(data)
                else:
                    call.files[part.filename or part.name or "?"] = bytes(data)
        elif request.can_read_body:
            call.body = await request.json()
        self._calls_by_request[id(request)] = call
        self.calls.append(call)
        fault = self._fault(call)
        try:
            if fault is not None and not fault.after_effect:
                response = _json({"message": f"{fault.status}: fake failure", "code": 0}, fault.status)
            else:
                response = await handler(request)
        except web.HTTPException as exc:
            response = _json({"message": exc.reason, "code": 0}, exc.status)
        finally:
            self._calls_by_request.pop(id(request), None)
        if fault is not None and fault.after_effect:
            response = _json({"message": f"{fault.status}: fake failure", "code": 0}, fault.status)
        call.status = response.status
        await self._changed_now()
        return response

    def _call(self, request: web.Request) -> Call:
        return self._calls_by_request[id(request)]

    async def _me(self, request: web.Request) -> web.Response:
        if not self._call(request).bot_auth:
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        return _json(BOT_USER)

    async def _app_info(self, request: web.Request) -> web.Response:
        return _json({"id": str(APP_ID), "name": "PromptPics", "icon": None, "description": "", "bot_public": True,
                      "bot_require_code_grant": False, "owner": user(ALICE), "verify_key": "0" * 64, "flags": 0,
                      "team": None, "summary": "", "rpc_origins": []})

    def _message(self, channel_id: str, call: Call, *, webhook: bool = False) -> dict[str, Any]:
        body = call.body or {}
        message = {
            "id": str(self._snowflake()), "channel_id": channel_id, "author": BOT_USER,
            "content": body.get("content", ""), "timestamp": datetime.now(timezone.utc).isoformat(),
            "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [], "mention_roles": [],
            "attachments": [{"id": str(next(self._ids)), "filename": name, "size": len(data), "url": f"https://x/{name}",
                             "proxy_url": f"https://x/{name}"} for name, data in call.files.items()],
            "embeds": [], "pinned": False, "type": 19 if body.get("message_reference") else 0,
            "flags": body.get("flags", 0), "files": call.files, "bot_auth": call.bot_auth, "webhook": webhook,
            "reference": str((body.get("message_reference") or {}).get("message_id") or "") or None,
            "allowed_mentions": body.get("allowed_mentions"), "edits": [],
            "edit_files": [],  # per edit that set attachments: the files it uploaded ({} removed them all)
            "nonce": body.get("nonce"), "made_at": time.monotonic(),
        }
        if webhook:
            message["webhook_id"] = str(APP_ID)  # an interaction's reply is posted by the application's webhook
        if message["reference"]:
            message["message_reference"] = {"message_id": message["reference"], "channel_id": channel_id}
        self.messages[int(message["id"])] = message
        return message

    @staticmethod
    def _public(message: dict[str, Any]) -> dict[str, Any]:
        hidden = {"files", "bot_auth", "webhook", "reference", "allowed_mentions", "edits", "edit_files", "deleted",
                  "token", "nonce", "made_at"}
        return {k: v for k, v in message.items() if k not in hidden}

    async def _callback(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        if token in self._expired or token not in self.interactions:
            return _json(INVALID_WEBHOOK_TOKEN, 401)
        body = self._call(request).body
        flags = (body.get("data") or {}).get("flags", 0)
        return _json({"interaction": {"id": request.match_info["id"], "type": 2, "response_message_loading": body["type"] == 5,
                                      "response_message_ephemeral": bool(flags & 64)}})

    async def _followup(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        if token in self._expired:
            return _json(INVALID_WEBHOOK_TOKEN, 401)
        channel_id = self.interactions[token]["channel_id"]
        message = self._message(channel_id, self._call(request), webhook=True)
        message["token"] = token
        if self.expire_tokens_after_ack:
            self._expired.add(token)
        return _json(self._public(message))

    async def _webhook_message(self, request: web.Request) -> web.Response:
        if request.match_info["token"] in self._expired:
            return _json(INVALID_WEBHOOK_TOKEN, 401)
        return _json({"message": "Unknown Message", "code": 10008}, 404)

    async def _post_message(self, request: web.Request) -> web.Response:
        call = self._call(request)
        if not call.bot_auth:
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        body = call.body or {}
        if body.get("enforce_nonce") and body.get("nonce") is not None:
            earlier = self._with_nonce(request.match_info["cid"], str(body["nonce"]))
            if earlier is not None and earlier.get("deleted"):
                return _json({"message": "Unknown Message", "code": 10008}, 404)
            if earlier is not None:
                return _json({**self._public(earlier), "nonce": earlier["nonce"]})
        message = self._message(request.match_info["cid"], call)
        return _json({**self._public(message), "nonce": message["nonce"]})

    def _with_nonce(self, channel_id: str, nonce: str) -> dict[str, Any] | None:
        """The bot's message in the channel with this nonce, made within NONCE_WINDOW_S."""
        return next((m for m in self.messages.values() if m["channel_id"] == channel_id and m.get("nonce") == nonce
                     and not m.get("webhook") and time.monotonic() - m.get("made_at", 0.0) < NONCE_WINDOW_S), None)

    async def _history(self, request: web.Request) -> web.Response:
        """GET /channels/{id}/messages: at most ``limit`` (1-100, 50) messages, newest first;
        ``before``/``after`` an id, or ``around`` one (half on each side, as Discord)."""
        if not self._call(request).bot_auth:
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        q = request.query
        limit = min(max(int(q.get("limit", 50)), 1), 100)
        shown = sorted((m for m in self.messages.values()
                        if m["channel_id"] == request.match_info["cid"] and not m.get("deleted")), key=lambda m: int(m["id"]))
        if "after" in q:
            page = [m for m in shown if int(m["id"]) > int(q["after"])][:limit]
        elif "around" in q:
            pivot = int(q["around"])
            older = [m for m in shown if int(m["id"]) < pivot][-(limit // 2):] if limit > 1 else []
            page = older + [m for m in shown if int(m["id"]) >= pivot][:limit - len(older)]
        else:
            older = [m for m in shown if "before" not in q or int(m["id"]) < int(q["before"])]
            page = older[-limit:]
        return _json([self._public(m) for m in reversed(page)])

    def _existing(self, request: web.Request) -> dict[str, Any] | None:
        message = self.messages.get(int(request.match_info["mid"]))
        return None if message is None or message.get("deleted") else message

    async def _edit_message(self, request: web.Request) -> web.Response:
        message = self._existing(request)
        if message is None:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        call = self._call(request)
        message["edits"].append(call.body.get("content"))
        message["content"] = call.body.get("content", message["content"])
        if "attachments" in call.body:  # the message's attachments become exactly these (Discord's rule)
            kept = {str(a.get("id")) for a in call.body["attachments"]}
            message["attachments"] = [a for a in message.get("attachments", []) if a["id"] in kept] + [
                {"id": str(next(self._ids)), "filename": name, "size": len(data), "url": f"https://x/{name}",
                 "proxy_url": f"https://x/{name}"} for name, data in call.files.items()]
            # "files" stays what the message was posted with (results); edits are kept apart
            message.setdefault("edit_files", []).append(dict(call.files))
        return _json(self._public(message))

    async def _delete_message(self, request: web.Request) -> web.Response:
        message = self._existing(request)
        if message is None:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        message["deleted"] = True
        return web.Response(status=204)

    async def _put_reaction(self, request: web.Request) -> web.Response:
        if self._existing(request) is None:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        self.reactions.setdefault(int(request.match_info["mid"]), []).append(request.match_info["emoji"])
        return web.Response(status=204)

    async def _sync_commands(self, request: web.Request) -> web.Response:
        where = request.match_info.get("gid", "global")
        registered = [{**c, "id": str(next(self._ids)), "application_id": str(APP_ID), "version": "1",
                       "default_member_permissions": c.get("default_member_permissions"), "type": c.get("type", 1)}
                      for c in self._call(request).body]
        self.commands[where] = registered
        return _json(registered)

    # -- the gateway -----------------------------------------------------------------------------

    async def _gateway_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._gateway = ws
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 45000}}))
        async for msg in ws:
            data = json.loads(msg.data)
            if data["op"] == 1:  # heartbeat
                await ws.send_str(json.dumps({"op": 11}))
            elif data["op"] == 2:  # identify
                await self._send_ready(ws)
        return ws

    async def _send_ready(self, ws: web.WebSocketResponse) -> None:
        ready = {"v": 10, "user": BOT_USER, "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
                 "session_id": "fake-session", "resume_gateway_url": self.gateway_url, "shard": [0, 1],
                 "application": {"id": str(APP_ID), "flags": 0}, "private_channels": [], "relationships": []}
        await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": next(self._seq), "d": ready}))
        channel = {"id": str(CHANNEL_ID), "type": 0, "name": "general", "position": 0, "permission_overwrites": [],
                   "guild_id": str(GUILD_ID), "nsfw": False}
        other = {**channel, "id": str(OTHER_CHANNEL_ID), "name": "art", "position": 1}
        adult = {**channel, "id": str(ADULT_CHANNEL_ID), "name": "after-dark", "position": 2, "nsfw": True}
        guild = {"id": str(GUILD_ID), "name": "Fake Guild", "owner_id": str(ALICE), "unavailable": False,
                 "member_count": 3, "large": False, "features": [], "emojis": [], "stickers": [], "premium_tier": 0,
                 "roles": [{"id": str(GUILD_ID), "name": "@everyone", "permissions": "104324673", "position": 0},
                           {"id": str(ADMIN_ROLE_ID), "name": "art admins", "permissions": "0", "position": 1}],
                 "channels": [channel, other, adult], "threads": [], "members": [member(APP_ID)], "voice_states": [],
                 "presences": [], "joined_at": "2024-01-01T00:00:00+00:00"}
        await ws.send_str(json.dumps({"op": 0, "t": "GUILD_CREATE", "s": next(self._seq), "d": guild}))
        self.identified.set()
