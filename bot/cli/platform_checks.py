"""The chat platforms' part of ``promptpics doctor``: each token present, and valid by one cheap
call with a short timeout (Discord ``GET /users/@me``, Slack ``auth.test``), skipped offline;
the Discord invite URL; the Slack token's scopes against the app manifest's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from bot.settings import DiscordSettings, SlackSettings, load_settings
from engine import Config, EngineError

TIMEOUT_S = 4.0
# Exactly the bot scopes of slack-manifest.yaml (tests/test_doctor.py keeps the two equal).
SLACK_SCOPES = frozenset({"commands", "chat:write", "files:write", "files:read", "reactions:write", "reactions:read"})


@dataclass(frozen=True, slots=True)
class Check:
    status: Literal["ok", "warn", "fail"]
    detail: str


async def platform_checks(config: Config, env: Mapping[str, str], *, offline: bool) -> dict[str, Check]:
    try:
        settings = load_settings(config, env)
    except EngineError as exc:  # a broken [bot]/[discord]/[slack] table: `run` would stop on it
        return {"platforms": Check("fail", exc.user_message)}
    checks: dict[str, Check] = {}
    if not settings.platforms_with_tokens:
        checks["platforms"] = Check("warn", "neither DISCORD_TOKEN nor SLACK_BOT_TOKEN is set: `promptpics run` has "
                                            "nothing to serve (`chat` and `imagine` work)")
    discord, slack = await asyncio.gather(_discord(settings.discord, offline), _slack(settings.slack, offline))
    return checks | discord | slack


async def _discord(settings: DiscordSettings, offline: bool) -> dict[str, Check]:
    if settings.token is None:
        return {"discord token": Check("ok", "DISCORD_TOKEN is not set: Discord is off")}
    if offline:
        return {"discord token": Check("ok", "set; not checked (offline)"),
                "discord invite": Check("ok", "needs the application id: run doctor online to print it")}
    try:
        status, body = await _call("GET", f"{settings.api_base}/users/@me", f"Bot {settings.token}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"discord token": Check("warn", f"set; Discord could not be reached ({type(exc).__name__})")}
    if status == 401:
        return {"discord token": Check("fail", "Discord refused DISCORD_TOKEN (401): reset it in the developer "
                                               "portal (Bot -> Reset Token) and set it again")}
    if status != 200 or not isinstance(body, dict) or "id" not in body:
        return {"discord token": Check("warn", f"set; Discord answered HTTP {status}")}
    from bot.discord.app import invite_url  # discord.py only when there is something to ask it

    return {"discord token": Check("ok", f"valid: bot user {body.get('username', '?')} ({body['id']})"),
            "discord invite": Check("ok", f"{invite_url(int(body['id']))} (default intents, none privileged)")}


async def _slack(settings: SlackSettings, offline: bool) -> dict[str, Check]:
    if settings.bot_token is None:
        return {"slack token": Check("ok", "SLACK_BOT_TOKEN is not set: Slack is off")}
    checks = {}
    if settings.mode == "socket" and settings.app_token is None:
        checks["slack app token"] = Check("fail", "Socket Mode needs SLACK_APP_TOKEN (xapp-, with connections:write)")
    if settings.mode == "http" and settings.signing_secret is None:
        checks["slack signing secret"] = Check("fail", "HTTP mode needs SLACK_SIGNING_SECRET")
    if offline:
        return {"slack token": Check("ok", "set; not checked (offline)")} | checks
    try:
        status, body, scopes = await _slack_auth_test(settings)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"slack token": Check("warn", f"set; Slack could not be reached ({type(exc).__name__})")} | checks
    if not isinstance(body, dict) or not body.get("ok"):
        error = body.get("error", f"HTTP {status}") if isinstance(body, dict) else f"HTTP {status}"
        return {"slack token": Check("fail", f"Slack refused SLACK_BOT_TOKEN ({error}): reinstall the app and copy "
                                             "the Bot User OAuth Token again")} | checks
    checks["slack token"] = Check("ok", f"valid: {body.get('user', '?')} in {body.get('team', '?')}")
    if scopes is not None:
        missing = sorted(SLACK_SCOPES - scopes)
        checks["slack scopes"] = (Check("fail", f"missing {', '.join(missing)}: add them (slack-manifest.yaml) and "
                                                "reinstall the app") if missing else Check("ok", "as in the manifest"))
    return checks


async def _slack_auth_test(settings: SlackSettings) -> tuple[int, Any, frozenset[str] | None]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(f"{settings.api_url}auth.test",
                                headers={"Authorization": f"Bearer {settings.bot_token}"}) as response:
            body = await response.json(content_type=None)
            header = response.headers.get("x-oauth-scopes")
            scopes = frozenset(s.strip() for s in header.split(",") if s.strip()) if header is not None else None
            return response.status, body, scopes


async def _call(method: str, url: str, authorization: str) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.request(method, url, headers={"Authorization": authorization}) as response:
            body = await response.json(content_type=None) if response.status == 200 else None
            return response.status, body
