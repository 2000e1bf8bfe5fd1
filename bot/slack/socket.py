"""Socket Mode with envelopes checked before anything parses them further.

slack_sdk's client hands every frame starting with ``{`` to ``json.loads`` and logs a
traceback when that (or reading the envelope) fails; the envelope is never acknowledged, so
Slack sends it again. Here every frame is read first: one that is not a JSON object, or an envelope whose payload is
not an object, is logged in one line (no traceback), acknowledged when its envelope id can be
read (so it is not redelivered), and dropped; the connection serves on. Good envelopes go to
slack_sdk's own processing unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.web.async_client import AsyncWebClient

log = logging.getLogger(__name__)

ENVELOPE_ID = re.compile(r'"envelope_id"\s*:\s*"([^"\\]{1,200})"')
WITH_PAYLOAD = frozenset({"events_api", "slash_commands", "interactive"})
SHOWN = 80  # characters of a bad frame quoted in the log


class CheckedSocketModeClient(SocketModeClient):
    async def process_message(self) -> None:
        raw = await self.message_queue.get()
        if raw is None:
            return
        problem, message = read_envelope(raw)
        if problem:
            envelope_id = ENVELOPE_ID.search(raw)
            log.warning("slack: dropped a Socket Mode envelope: it %s (%d characters, starting %r)%s", problem,
                        len(raw), raw[:SHOWN], "; acknowledged" if envelope_id else "")
            if envelope_id:
                await self.send_message(json.dumps({"envelope_id": envelope_id[1]}))
            return
        _ = asyncio.ensure_future(self.run_message_listeners(message, raw))


def read_envelope(raw: str) -> tuple[str, dict[str, Any]]:
    """(what is wrong with it or "", the envelope)."""
    try:
        message = json.loads(raw)
    except ValueError as exc:
        return f"is not valid JSON ({exc.__class__.__name__} at character {getattr(exc, 'pos', '?')})", {}
    if not isinstance(message, dict):
        return "is not a JSON object", {}
    if message.get("type") in WITH_PAYLOAD and not isinstance(message.get("payload"), dict):
        return f"has no payload object (type {message.get('type')!r})", {}
    return "", message


class CheckedSocketModeHandler(AsyncSocketModeHandler):
    """bolt's handler on a ``CheckedSocketModeClient`` (built here, not by bolt: slack_sdk's
    client starts its processing task as soon as it is made)."""

    def __init__(self, app: AsyncApp, *, app_token: str, web_client: AsyncWebClient) -> None:
        self.app = app
        self.app_token = app_token
        self.client = CheckedSocketModeClient(app_token=app_token, logger=app.logger, web_client=web_client,
                                             ping_interval=10)  # bolt's handler's default
        self.client.socket_mode_request_listeners.append(self.handle)  # type: ignore[arg-type]
