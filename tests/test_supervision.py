"""One platform's failure is not the other's (bot/supervise.py, bot/slack/socket.py and the
Discord parser guard): the real discord.py and slack-bolt clients against the fake servers, both
served by one ``serve_apps`` on one engine, as ``promptpics run`` does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.gateway import DiscordWebSocket

from bot.cli.serve import BotCore, admin_policies, build_core, serve_apps
from bot.discord import DiscordApp
from bot.settings import BotSettings, DiscordSettings, Settings, SlackSettings
from bot.slack import SlackApp
from bot.supervise import Backoff, supervise
from engine import Config
from tests.conftest import make_tiny_config
from tests.fake_discord import BOT_TOKEN as DISCORD_TOKEN
from tests.fake_discord import CHANNEL_ID, FakeDiscord
from tests.fake_slack import APP_TOKEN, BOT_TOKEN, CHANNEL, SIGNING_SECRET, FakeSlack

pytestmark = pytest.mark.timeout(120)

JOB_ID = re.compile(r"job `([a-z0-9]{6})`")
SMALL = {"steps": 2, "width": 64, "height": 64}


# -- the supervisor on its own ----------------------------------------------------------------------


class LoginFailure(Exception):  # named like discord.py's: a configuration error by name
    pass


@dataclass
class FlakyApp:
    """Fails with each of ``failures`` in turn, then serves until ``closed`` is set."""

    failures: list[BaseException]
    platform: str = "flaky"
    resets: int = 0
    serves: int = 0
    ran_s: float = 0.0  # how long each serve() "runs" on the fake clock before failing

    def __post_init__(self) -> None:
        self.closed = asyncio.Event()
        self.now = 0.0

    async def serve(self) -> None:
        self.serves += 1
        self.now += self.ran_s
        if self.failures:
            raise self.failures.pop(0)
        await self.closed.wait()

    async def reset(self) -> None:
        self.resets += 1


async def test_the_supervisor_reconnects_with_a_doubling_backoff_and_logs_each_failure_once_with_a_reference(
        caplog: pytest.LogCaptureFixture) -> None:
    app = FlakyApp([ValueError("bad frame"), OSError("reset by peer"), KeyError("flags")])
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    caplog.set_level(logging.ERROR, logger="bot.supervise")
    task = asyncio.create_task(supervise(app, backoff=Backoff(1.0, 3.0, 60.0), clock=lambda: app.now, sleep=sleep))
    while app.serves < 4:
        await asyncio.sleep(0)
    app.closed.set()
    await asyncio.wait_for(task, 10)  # a serve() that returns ends the supervision
    assert slept == [1.0, 2.0, 3.0] and app.resets == 3
    records = [r for r in caplog.records if r.name == "bot.supervise"]
    assert len(records) == 3 and all(r.exc_info for r in records)
    refs = {re.search(r"ref ([0-9a-f]{6})", r.getMessage())[1] for r in records}  # type: ignore[index]
    assert len(refs) == 3, "each failure gets its own reference"
    assert "ValueError: bad frame" in records[0].getMessage() and "reconnecting in 1 s" in records[0].getMessage()


async def test_a_platform_that_served_a_while_before_failing_starts_the_backoff_over() -> None:
    app = FlakyApp([ValueError("1"), ValueError("2"), ValueError("3")])
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        app.ran_s = 100.0 if len(slept) == 2 else 0.0  # the third serve() runs 100 s before failing

    task = asyncio.create_task(supervise(app, backoff=Backoff(1.0, 60.0, 60.0), clock=lambda: app.now, sleep=sleep))
    while app.serves < 4:
        await asyncio.sleep(0)
    app.closed.set()
    await asyncio.wait_for(task, 10)
    assert slept == [1.0, 2.0, 1.0]


async def test_a_configuration_error_is_raised_at_once_and_not_retried() -> None:
    app = FlakyApp([LoginFailure("Improper token has been passed.")])
    with pytest.raises(LoginFailure):
        await asyncio.wait_for(supervise(app, sleep=lambda s: asyncio.sleep(0)), 10)
    assert app.serves == 1 and app.resets == 0


# -- both platforms on one engine, against the fakes ----------------------------------------------------


@pytest.fixture
async def discord_fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", DiscordWebSocket.DEFAULT_GATEWAY)
    server = await FakeDiscord().start()
    yield server
    await server.close()


@pytest.fixture
async def slack_fake() -> AsyncIterator[FakeSlack]:
    server = await FakeSlack().start()
    yield server
    await server.close()


@pytest.fixture
def config(tiny_models: Any, tmp_path: Path) -> Config:
    return make_tiny_config(tiny_models, tmp_path / "data")


@dataclass
class Both:
    core: BotCore
    discord: DiscordApp
    slack: SlackApp


@contextlib.asynccontextmanager
async def both(dfake: FakeDiscord, sfake: FakeSlack, config: Config) -> AsyncIterator[Both]:
    settings = Settings(
        bot=BotSettings(cooldown_s=0.0, progress_interval_s=0.0),
        discord=DiscordSettings(token=DISCORD_TOKEN, api_base=dfake.api_base, gateway_url=dfake.gateway_url),
        slack=SlackSettings(bot_token=BOT_TOKEN, app_token=APP_TOKEN, signing_secret=SIGNING_SECRET,
                            api_url=sfake.api_url, mode="socket", retry_backoff_s=0.01))
    core = build_core(config, settings, admin_policies(settings))
    dapp = DiscordApp(core.commands, settings.discord, guild_ready_timeout=0.05)
    sapp = SlackApp(core.commands, settings.slack)
    for app in (dapp, sapp):
        core.delivery.add_outlet(app.outlet)
    stop = asyncio.Event()
    async with core.engine:
        serving = asyncio.create_task(serve_apps(core, [dapp, sapp], stop))
        await asyncio.wait_for(asyncio.gather(dapp.connected.wait(), sapp.connected.wait(),
                                              sfake.socket_connected.wait()), 30)
        try:
            yield Both(core, dapp, sapp)
        finally:
            stop.set()
            assert await asyncio.wait_for(serving, 30) == 0, "run would exit 0: nothing stopped it but us"


async def discord_result(fake: FakeDiscord, interaction: dict[str, Any]) -> str:
    """The job id of ``interaction``'s /imagine, once its image is posted in the channel."""
    followup = (await fake.wait_for(lambda: fake.followups(interaction)))[0]
    match = JOB_ID.search(followup["content"])
    assert match, followup
    await fake.wait_for(lambda: any(f"job `{match[1]}`" in m["content"]
                                    for m in fake.channel_messages(CHANNEL_ID, with_files=True)))
    return match[1]


async def slack_result(fake: FakeSlack, text: str) -> str:
    payload = fake.command("/imagine", text)
    await fake.ack_of(await fake.envelope("slash_commands", payload))
    answer = (await fake.wait_for(lambda: fake.answers(payload)))[0]
    match = JOB_ID.search(answer)
    assert match, answer
    await fake.wait_for(lambda: any(f"job `{match[1]}`" in m.text for m in fake.channel_messages(CHANNEL, with_files=True)))
    return match[1]


async def test_a_discord_event_it_cannot_read_is_dropped_and_logged_once_and_the_connection_serves_on(
        discord_fake: FakeDiscord, slack_fake: FakeSlack, config: Config, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    async with both(discord_fake, slack_fake, config):
        discord_fake.identified.clear()
        # An interaction whose member lacks "flags": discord.py's Member() raises KeyError.
        bad = await discord_fake.slash("imagine", {"prompt": "a cat", **SMALL}, send=False)
        del bad["member"]["flags"]
        await discord_fake.dispatch("INTERACTION_CREATE", bad)
        good = await discord_fake.slash("imagine", {"prompt": "a red fox", **SMALL})
        await discord_result(discord_fake, good)
        dropped = [r for r in caplog.records if "dropped one INTERACTION_CREATE event" in r.getMessage()]
        assert len(dropped) == 1 and "KeyError: 'flags'" in dropped[0].getMessage()
        assert re.search(r"ref [0-9a-f]{6}", dropped[0].getMessage())
        assert not discord_fake.identified.is_set(), "the same connection served on: no new IDENTIFY"
        assert not discord_fake.followups(bad)


async def test_a_broken_discord_connection_reconnects_while_slack_keeps_serving(
        discord_fake: FakeDiscord, slack_fake: FakeSlack, config: Config, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    async with both(discord_fake, slack_fake, config) as running:
        discord_fake.identified.clear()
        await discord_fake.send_raw('{"op": 0, "t": "INTERACTION_CREATE", "s": 9, "d": {"id": ')  # not JSON
        # Slack serves while Discord is down and reconnecting (1 s backoff).
        await slack_result(slack_fake, "a lighthouse at dusk --steps 2 --size 64x64")
        await asyncio.wait_for(discord_fake.identified.wait(), 30)  # logged in and identified again
        await asyncio.wait_for(running.discord.connected.wait(), 30)
        job = await discord_result(discord_fake, await discord_fake.slash("imagine", {"prompt": "a red fox", **SMALL}))
        assert job
        failed = [r for r in caplog.records if r.name == "bot.supervise"]
        assert len(failed) == 1 and failed[0].getMessage().startswith("discord stopped (ref ")
        assert "JSONDecodeError" in failed[0].getMessage()


async def test_slack_envelopes_that_do_not_parse_are_logged_in_one_line_acknowledged_and_dropped(
        discord_fake: FakeDiscord, slack_fake: FakeSlack, config: Config, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with both(discord_fake, slack_fake, config):
        bad = {
            "truncated": '{"envelope_id": "bad-1", "type": "slash_commands", "payload": {"command": "/imag',
            "payload not an object": json.dumps({"envelope_id": "bad-2", "type": "events_api", "payload": "x"}),
            "not an object": json.dumps(["envelope_id", "bad-3"]),
        }
        for frame in bad.values():
            await slack_fake.send_raw(frame)
        assert (await slack_fake.ack_of("bad-1")) == {"envelope_id": "bad-1"}
        assert (await slack_fake.ack_of("bad-2")) == {"envelope_id": "bad-2"}
        await slack_result(slack_fake, "a teapot --steps 2 --size 64x64")  # the connection serves on
        dropped = [r for r in caplog.records if "dropped a Socket Mode envelope: it" in r.getMessage()]
        assert len(dropped) == 3, [r.getMessage() for r in dropped]
        assert all(r.exc_info is None for r in caplog.records), "one line each, no traceback"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "is not valid JSON" in dropped[0].getMessage()
        assert "has no payload object (type 'events_api')" in dropped[1].getMessage()
        assert "is not a JSON object" in dropped[2].getMessage()
