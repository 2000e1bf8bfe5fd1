"""The Slack adapter end to end: the real slack-bolt AsyncApp and slack_sdk clients against a fake
Slack on 127.0.0.1 (Web API, uploads, response URLs, Socket Mode), the real engine on tiny
models, a real SQLite history under tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import json
import logging
import os
import re
import signal
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import discord
import pytest
from discord.gateway import DiscordWebSocket
from PIL import Image

from bot.cli.serve import BotCore, admin_policies, build_core, platform_apps, serve, serve_apps
from bot.posting import RetryPolicy
from bot.settings import BotSettings, DiscordSettings, Settings, SlackSettings, load_settings, parse_slack_settings
from bot.slack import SlackApp
from bot.slack.outlet import CappedBackoff, ServerErrorRetry, retry_after_s, slack_text, unescape
from engine import Config, ConfigError, GenerationParams, JobRequest, JobStatus, Origin, Requester
from engine.history import Deliveries, HistoryStore
from engine.images import read_png_metadata
from tests.conftest import REPO, make_tiny_config, results_go_unrecorded
from tests.fake_discord import BOT_TOKEN as DISCORD_TOKEN
from tests.fake_discord import CHANNEL_ID as DISCORD_CHANNEL
from tests.fake_discord import FakeDiscord
from tests.fake_slack import (
    ADMIN,
    ADULT_CHANNEL,
    ALICE,
    APP_TOKEN,
    BOB,
    BOT_TOKEN,
    BOT_USER,
    CHANNEL,
    OTHER_TEAM_CHANNEL,
    OTHER_TEAM_ID,
    OUTSIDE_CHANNEL,
    PEOPLE_DM,
    SIGNING_SECRET,
    TEAM_ID,
    FakeSlack,
    Message,
    signed_headers,
)

pytestmark = pytest.mark.timeout(120)

SMALL = "--steps 2 --size 64x64"
WAIT = 60.0  # a safety net only: every wait here ends on the event it waits for
JOB_ID = re.compile(r"job `([a-z0-9]{6})`")
REACTIONS = ["repeat", "camera", "jigsaw", "abc", "x"]  # 🔁, the other models' emojis, ❌


# Each Web API method the bot calls, and the manifest scope that allows it.
METHOD_SCOPES = {"chat.postMessage": "chat:write", "chat.update": "chat:write", "chat.delete": "chat:write",
                 "chat.postEphemeral": "chat:write", "files.getUploadURLExternal": "files:write",
                 "files.completeUploadExternal": "files:write", "files.info": "files:read", "files.list": "files:read",
                 "reactions.add": "reactions:write"}
NO_SCOPE = {"auth.test", "apps.connections.open"}  # the bot token itself; the app-level token


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    server = await FakeSlack().start()
    yield server
    await server.close()
    # Whatever a test made the bot do, slack-manifest.yaml granted it.
    assert {c.method for c in server.calls} <= set(METHOD_SCOPES) | NO_SCOPE


@pytest.fixture
def config(tiny_models: Any, tmp_path: Path) -> Config:
    config = make_tiny_config(tiny_models, tmp_path / "data")
    return config.model_copy(update={"safety": config.safety.model_copy(update={"nsfw_allowed_channels": (f"slack:{ADULT_CHANNEL}",)})})


def slack_settings(fake: FakeSlack, mode: str = "socket", **overrides: Any) -> SlackSettings:
    return SlackSettings(bot_token=BOT_TOKEN, app_token=APP_TOKEN, signing_secret=SIGNING_SECRET, api_url=fake.api_url,
                         mode=mode, http_host="127.0.0.1", http_port=0, admin_user_ids=frozenset({ADMIN}),
                         retry_backoff_s=0.01, **overrides)


def settings_for(fake: FakeSlack, mode: str = "socket") -> Settings:
    return Settings(bot=BotSettings(cooldown_s=0.0, progress_interval_s=0.0), discord=DiscordSettings(),
                    slack=slack_settings(fake, mode))


@dataclass
class Running:
    core: BotCore
    app: SlackApp
    fake: FakeSlack

    async def slash(self, text: str, *, command: str = "/imagine", user: str = ALICE, channel: str = CHANNEL,
                    team: str = TEAM_ID) -> tuple[dict[str, Any], dict[str, Any]]:
        """Send a slash command the way the app receives it (Socket Mode envelope or signed HTTP
        POST); returns the payload and what the acknowledgement carried."""
        payload = self.fake.command(command, text, user=user, channel=channel, team=team)
        if self.app.settings.mode == "socket":
            ack = await self.fake.ack_of(await self.fake.envelope("slash_commands", payload))
            return payload, ack.get("payload") or {}
        status, body = await self.post(urllib.parse.urlencode(payload))
        assert status == 200, body
        return payload, json.loads(body) if body.startswith("{") else {}

    async def post(self, body: str, *, content_type: str = "application/x-www-form-urlencoded",
                   **headers: Any) -> tuple[int, str]:
        """An HTTP-mode request to the app, signed unless ``headers`` says otherwise."""
        sent = {**signed_headers(body, content_type=content_type), **headers}
        url = f"http://127.0.0.1:{self.app.http_port}/slack/events"
        async with aiohttp.ClientSession() as session, session.post(url, data=body.encode(), headers=sent) as response:
            return response.status, await response.text()

    async def react(self, ts: str, name: str, *, user: str = ALICE, **kwargs: Any) -> dict[str, Any]:
        event = self.fake.reaction(ts, name, user=user)
        await self.fake.ack_of(await self.fake.envelope("events_api", event, **kwargs))
        return event

    async def answers(self, payload: dict[str, Any], count: int = 1) -> list[str]:
        return await self.fake.wait_for(lambda: len(self.fake.answers(payload)) >= count and self.fake.answers(payload))

    async def result_of(self, job_id: str, channel: str = CHANNEL) -> Message:
        """The message with ``job_id``'s image, once its reactions are on and its status says done."""
        def done() -> Message | None:
            for m in self.fake.channel_messages(channel, with_files=True):
                if f"job `{job_id}`" in m.text and "x" in m.reactions:
                    heads = [s for s in self.fake.channel_messages(channel, with_files=False)
                             if f"job `{job_id}`" in s.text and "✅ done" in s.text]
                    return m if heads else None
            return None

        return await self.fake.wait_for(done)

    async def history_rows(self) -> list[Any]:
        return await self.core.engine.history.recent_jobs(limit=100)


@contextlib.asynccontextmanager
async def bot(fake: FakeSlack, config: Config, mode: str = "socket") -> AsyncIterator[Running]:
    """The bot as `promptpics run` builds it (same core, same shutdown), serving the fake."""
    settings = settings_for(fake, mode)
    core = build_core(config, settings, admin_policies(settings))
    app = SlackApp(core.commands, settings.slack)
    core.delivery.add_outlet(app.outlet)
    stop = asyncio.Event()
    async with core.engine:
        serving = asyncio.create_task(serve_apps(core, [app], stop))
        await asyncio.wait_for(app.connected.wait(), 30)
        if mode == "socket":
            await asyncio.wait_for(fake.socket_connected.wait(), 30)
        try:
            yield Running(core, app, fake)
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)


async def images_done(fake: FakeSlack, count: int) -> None:
    """Until ``count`` images are posted, each with its reactions (the last thing its job does)."""
    await fake.wait_for(lambda: len(fake.channel_messages(with_files=True)) >= count
                        and all("x" in m.reactions for m in fake.channel_messages(with_files=True)))


def job_id_in(text: str) -> str:
    match = JOB_ID.search(text)
    assert match, text
    return match[1]


def png_of(fake: FakeSlack, message: Message) -> bytes:
    (file_id,) = message.files
    return fake.uploads[file_id]


# -- /imagine -------------------------------------------------------------------------------------


async def test_imagine_over_socket_mode_posts_a_status_then_the_png_in_its_thread(fake: FakeSlack,
                                                                                  config: Config) -> None:
    async with bot(fake, config) as running:
        text = f"a red fox &amp; a &lt;!channel&gt; sign --model flux_dev --guidance 3.5 --seed 42 --no blur {SMALL}"
        payload, ack = await running.slash(text)
        (got,) = await running.answers(payload)
        job_id = job_id_in(got)
        result = await running.result_of(job_id)
        rows = await running.history_rows()
        deliveries = await running.core.engine.deliveries.of_job(job_id)

    # Acknowledged at once with nothing to show; the job id came privately through the response URL.
    assert ack == {}
    assert got.startswith(f"Got it: job `{job_id}` is next in line.")
    assert fake.responses[payload["response_url"].rsplit("/", 1)[1]][0]["response_type"] == "ephemeral"
    # The status message: queue position and routing reason, then edited with progress and "done".
    (status,) = fake.channel_messages(with_files=False)
    first = fake.calls_to("chat.postMessage")[0].args["text"]
    assert "next in line" in first and "model: FLUX.1-dev, as you asked" in first and f"<@{ALICE}>" in first
    assert any("step 1/2" in e for e in status.edits) and any("step 2/2" in e for e in status.edits)
    assert status.text.startswith("✅ done: the image is in this thread.") and status.reactions == ["x"]
    # The prompt reached the model unescaped, and is quoted escaped: it pings nobody.
    assert rows[0].params.prompt == "a red fox & a <!channel> sign"
    assert "&lt;!channel&gt;" in first and "<!channel>" not in first
    # The image: files_upload_v2 to the channel id, as a reply in the status message's thread.
    complete = fake.calls_to("files.completeUploadExternal")[-1].args
    assert complete["channel_id"] == CHANNEL and complete["thread_ts"] == status.ts
    assert result.thread_ts == status.ts and len(fake.calls_to("files.info")) == 2  # shared on the 2nd look
    image = Image.open(io.BytesIO(png_of(fake, result)))
    assert image.format == "PNG" and image.size == (64, 64)
    assert read_png_metadata(png_of(fake, result))["seed"] == 42
    for part in (f"<@{ALICE}>", "a red fox &amp; a &lt;!channel&gt; sign", "FLUX.1-dev", "seed 42", "2 steps",
                 "guidance 3.5", "64×64", "not: blur"):
        assert part in result.text
    assert result.reactions == REACTIONS
    # Every call used the bot token; the history links both messages to the job.
    assert {c.token for c in fake.calls if c.method != "apps.connections.open"} == {BOT_TOKEN}
    assert [(r.id, r.status, r.requester.user_id, r.origin) for r in rows] == [
        (job_id, JobStatus.SUCCEEDED, ALICE, Origin("slack", CHANNEL, server_id=TEAM_ID))]
    assert {(d.kind, d.message_id) for d in deliveries} == {("status", status.ts), ("result", result.ts)}


async def test_bad_options_get_an_ephemeral_error_and_create_no_job(fake: FakeSlack, config: Config) -> None:
    async with bot(fake, config) as running:
        _, unknown = await running.slash("a fox --stpes 4")
        _, unreadable = await running.slash("a fox --steps many")
        _, no_value = await running.slash("a fox --seed")
        _, no_prompt = await running.slash("  --steps 4")
        out_of_range, ack = await running.slash("a fox --steps 0")
        (limit,) = await running.answers(out_of_range)
        assert await running.history_rows() == []
    assert unknown["text"].startswith("`--stpes` is not an option I know.\nUsage: /imagine PROMPT [options].")
    for flag in ("--model", "--steps", "--guidance", "--size", "--seed", "--no"):
        assert flag in unknown["text"]
    assert unreadable["text"].startswith("`--steps` is 'many', but it must be a whole number.")
    assert no_value["text"].startswith("`--seed` needs a value")
    assert no_prompt["text"].startswith("`/imagine` needs a prompt: what should the image show?\nUsage:")
    assert ack == {} and "`steps` is 0, but it must be a whole number from 1 to 50" in limit
    assert fake.calls_to("chat.postMessage") == [] and fake.uploads == {}


# -- HTTP mode ------------------------------------------------------------------------------------


async def test_http_mode_serves_signed_requests_and_refuses_bad_or_stale_signatures(fake: FakeSlack,
                                                                                    config: Config) -> None:
    async with bot(fake, config, mode="http") as running:
        forged = urllib.parse.urlencode(fake.command("/imagine", f"a forged fox {SMALL}"))
        bad = await running.post(forged, **{"X-Slack-Signature": "v0=" + "0" * 64})
        stale_ts = int(time.time()) - 10 * 60  # bolt accepts 5 minutes of clock skew
        stale = await running.post(forged, **signed_headers(forged, timestamp=stale_ts))
        other_secret = await running.post(forged, **signed_headers(forged, secret="not-the-secret"))
        assert await running.history_rows() == []

        payload, ack = await running.slash(f"a signed fox --seed 5 {SMALL}")
        job_id = job_id_in((await running.answers(payload))[0])
        result = await running.result_of(job_id)
        # A reaction event over HTTP, then Slack's retry of it (same event_id, X-Slack-Retry-Num).
        event = json.dumps(fake.reaction(result.ts, "repeat", user=BOB))
        first = await running.post(event, content_type="application/json")
        retried = await running.post(event, content_type="application/json",
                                     **{**signed_headers(event, content_type="application/json"),
                                        "X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
        # A distinct event after the retry: once its job is done, a duplicate from the retry would be there too.
        later = json.dumps(fake.reaction(result.ts, "camera", user=ALICE))
        after = await running.post(later, content_type="application/json")
        await images_done(fake, 3)
        rows = await running.history_rows()
    assert [bad[0], stale[0], other_secret[0]] == [401, 401, 401]
    assert ack == {} and first[0] == retried[0] == after[0] == 200
    assert len(rows) == 3 and [r.requester.user_id for r in rows].count(BOB) == 1
    assert "a forged fox" not in json.dumps([m.text for m in fake.messages.values()])


async def test_http_mode_verifies_then_parses_malformed_bodies_get_a_4xx_and_the_bot_keeps_serving(
        fake: FakeSlack, config: Config, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    form, as_json = "application/x-www-form-urlencoded", "application/json"

    async def send(running: Running, body: bytes, content_type: str, *, sign: bool = True,
                   **headers: str) -> int:
        if sign:  # signed over the raw bytes, as Slack does
            ts = str(int(time.time()))
            digest = hmac.new(SIGNING_SECRET.encode(), b"v0:" + ts.encode() + b":" + body, hashlib.sha256).hexdigest()
            headers |= {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": "v0=" + digest}
        url = f"http://127.0.0.1:{running.app.http_port}/slack/events"
        async with aiohttp.ClientSession() as session, \
                session.post(url, data=body, headers={"Content-Type": content_type, **headers}) as response:
            return response.status

    async with bot(fake, config, mode="http") as running:
        statuses = [
            await send(running, b"command=%2Fimagine&text=a+fox+\xff\xfe", form),  # signed, not UTF-8
            await send(running, b'{"type": "event_callback", "event": {"type": "reaction_', as_json),  # signed, cut short
            await send(running, b"payload=%7B%22type%22%3A%20%22block_", form),  # signed, its JSON payload cut short
            await send(running, b"\x00\xff garbage", form, sign=False),  # unsigned garbage
            await send(running, b'{"type": "event_callb', as_json, sign=False),  # unsigned, cut short
            await send(running, b"text=x", form, sign=False, **{"X-Slack-Request-Timestamp": "soon",
                                                               "X-Slack-Signature": "v0=00"}),  # a timestamp that is no number
        ]
        payload, _ = await running.slash(f"a fox after the garbage --seed 5 {SMALL}")
        await running.result_of(job_id_in((await running.answers(payload))[0]))
        rows = await running.history_rows()
    assert statuses == [400, 400, 400, 401, 401, 401]
    assert [r.params.prompt for r in rows] == ["a fox after the garbage"]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage() and "HTTP request" in r.getMessage()]
    assert sum("does not parse" in m for m in refused) == 3 and sum("signature" in m for m in refused) == 3


# -- reactions ------------------------------------------------------------------------------------


async def test_reactions_regenerate_or_switch_model_in_the_thread_of_the_image(fake: FakeSlack, config: Config) -> None:
    async with bot(fake, config) as running:
        payload, _ = await running.slash(f"a small boat --seed 7 {SMALL}")
        first_id = job_id_in((await running.answers(payload))[0])
        original = await running.result_of(first_id)
        await running.react(original.ts, "repeat", user=BOB)
        await running.react(original.ts, "camera", user=BOB)
        await running.react(original.ts, "thumbsup", user=BOB)  # not ours: ignored
        await fake.wait_for(lambda: len(fake.channel_messages(with_files=True)) == 3
                            and all(m.reactions == REACTIONS if "FLUX" in m.text else len(m.reactions) == 5
                                    for m in fake.channel_messages(with_files=True)))
        rows = {r.id: r for r in await running.history_rows()}

    first = rows.pop(first_id)
    root = original.thread_ts
    assert root is not None
    by_model = {r.params.model_id: r for r in rows.values()}
    regenerated, switched = by_model["flux_dev"], by_model["realvis_xl"]
    for job in (regenerated, switched):  # answered in the thread of the image reacted to
        assert job.origin == Origin("slack", CHANNEL, root, original.ts, server_id=TEAM_ID)
        assert job.requester.user_id == BOB and job.status is JobStatus.SUCCEEDED
        assert job.params.prompt == first.params.prompt
    assert regenerated.params.steps == first.params.steps and regenerated.params.seed != first.params.seed
    assert switched.params.seed == 7 and switched.params.steps == config.model("realvis_xl").steps
    in_thread = [m for m in fake.channel_messages() if m.thread_ts == root]
    assert {job_id_in(m.text) for m in in_thread} == {first_id, regenerated.id, switched.id}
    assert all(m.thread_ts == root for m in fake.channel_messages(with_files=True))  # one level deep


async def test_a_retried_event_creates_no_duplicate_job(fake: FakeSlack, config: Config) -> None:
    async with bot(fake, config) as running:
        payload, _ = await running.slash(f"a lighthouse {SMALL}")
        original = await running.result_of(job_id_in((await running.answers(payload))[0]))
        event = await running.react(original.ts, "repeat", user=BOB)
        for attempt in (1, 2):  # Slack's redeliveries: a new envelope, the same event
            await fake.ack_of(await fake.envelope("events_api", event, retry_attempt=attempt))
        # A distinct event after the redeliveries: once its job is done, a duplicate would be there too.
        await running.react(original.ts, "camera", user=ALICE)
        await images_done(fake, 3)
        rows = await running.history_rows()
    assert len(rows) == 3 and sum(r.requester.user_id == BOB for r in rows) == 1


async def test_cancel_reaction_is_refused_for_others_and_deletes_for_the_owner_or_an_admin(fake: FakeSlack,
                                                                                           config: Config) -> None:
    async with bot(fake, config) as running:
        made = []
        for prompt in ("first", "second"):
            payload, _ = await running.slash(f"{prompt} {SMALL}")
            made.append(await running.result_of(job_id_in((await running.answers(payload))[0])))
        await running.react(made[0].ts, "x", user=BOB)
        refusal = await fake.wait_for(lambda: fake.ephemerals)
        await running.react(made[0].ts, "x", user=ALICE)  # the owner
        await running.react(made[1].ts, "x", user=ADMIN)  # an admin by user id
        await fake.wait_for(lambda: fake.channel_messages() == [])
        jobs = await running.history_rows()
    assert refusal[0]["user"] == BOB and refusal[0]["channel"] == CHANNEL
    assert refusal[0]["text"].startswith("Only the person who asked for job")
    assert len(fake.calls_to("chat.delete")) == 4  # each image, then the status message heading its thread
    assert {j.status for j in jobs} == {JobStatus.SUCCEEDED}  # the images stay in the history


async def test_cancel_reaction_on_a_status_message_cancels_a_running_job(fake: FakeSlack, tiny_models: Any,
                                                                         tmp_path: Path) -> None:
    config = make_tiny_config(tiny_models, tmp_path / "data", max_steps=5000)  # long enough to still be running
    async with bot(fake, config) as running:
        payload, _ = await running.slash("a slow one --steps 5000 --size 64x64")
        job_id = job_id_in((await running.answers(payload))[0])
        status = await fake.wait_for(lambda: next((m for m in fake.channel_messages() if "step" in m.text), None))
        await running.react(status.ts, "x", user=ALICE)
        await fake.wait_for(lambda: "cancelled" in status.text)
        rows = await running.history_rows()
    assert [(r.id, r.status) for r in rows] == [(job_id, JobStatus.CANCELLED)] and fake.uploads == {}


async def test_a_job_taken_back_after_a_restart_is_posted_in_its_status_messages_thread(fake: FakeSlack,
                                                                                         config: Config) -> None:
    # A job left queued by a process that died, whose status message was already posted.
    old_status = Message("1690000000.000001", CHANNEL, "🕒 queued #1")
    fake.messages[old_status.ts] = old_status
    async with HistoryStore.open(config.data_dir) as history:
        params = GenerationParams(prompt="an old request", negative_prompt="", model_id="flux_dev", steps=2,
                                  guidance=4.5, width=64, height=64, seed=9, route_reason="the default model")
        stored = await history.record_queued(requester=Requester("slack", ALICE, "alice"), origin=Origin("slack", CHANNEL),
                                             model_asked=None, params=params, created_at=time.time())
        await Deliveries(history).record(stored.id, platform="slack", channel_id=CHANNEL, message_id=old_status.ts,
                                         kind="status")

    async with bot(fake, config) as running:
        result = await running.result_of(stored.id)
    assert any("back after a restart" in e for e in old_status.edits)  # the same status message, edited
    assert result.thread_ts == old_status.ts and f"<@{ALICE}>" in result.text
    assert read_png_metadata(png_of(fake, result))["prompt"] == "an old request"


# -- Slack's refusals -----------------------------------------------------------------------------


async def test_rate_limits_and_server_errors_are_retried(fake: FakeSlack, config: Config) -> None:
    fake.fail("chat.postMessage", status=429, headers={"Retry-After": "0"})
    fake.fail("chat.update", status=503, error="service_unavailable", times=2)
    fake.fail("files.completeUploadExternal", status=500, error="internal_error")
    async with bot(fake, config) as running:
        payload, _ = await running.slash(f"a patient fox {SMALL}")
        result = await running.result_of(job_id_in((await running.answers(payload))[0]))
    assert [c.status for c in fake.calls_to("chat.postMessage")] == [429, 200]
    assert [c.status for c in fake.calls_to("chat.update")][:3] == [503, 503, 200]
    assert [c.status for c in fake.calls_to("files.completeUploadExternal")] == [500, 200]
    assert Image.open(io.BytesIO(png_of(fake, result))).format == "PNG"


# -- exactly once -----------------------------------------------------------------------------------

FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.01)


def images_of(fake: FakeSlack, job_id: str) -> list[Message]:
    """The messages sharing ``job_id``'s image (the uploaded file named after the job)."""
    return [m for m in fake.channel_messages(with_files=True) if any(fake.files[f]["name"] == f"{job_id}.png"
                                                                      for f in m.files)]


async def test_a_crash_between_posting_and_recording_the_result_posts_it_once_after_a_restart(
        fake: FakeSlack, config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    with results_go_unrecorded(monkeypatch):  # the process dies right after Slack took the upload
        async with bot(fake, config) as running:
            payload, _ = await running.slash(f"a lighthouse at dusk {SMALL}")
            job_id = job_id_in((await running.answers(payload))[0])
            await asyncio.wait_for(running.core.delivery.settled(job_id), WAIT)
            assert len(images_of(fake, job_id)) == 1

    async with bot(fake, config) as running:  # the next start: its catch-up finds the upload
        result = await running.result_of(job_id)
        deliveries = await running.core.engine.deliveries.of_job(job_id)
    assert images_of(fake, job_id) == [result] and len(fake.calls_to("files.completeUploadExternal")) == 1
    assert ("result", result.ts) in {(d.kind, d.message_id) for d in deliveries}
    (listed,) = fake.calls_to("files.list")
    assert listed.args["channel"] == CHANNEL and listed.args["user"] == BOT_USER


async def test_server_errors_past_the_clients_retries_post_the_image_again_once(fake: FakeSlack,
                                                                                config: Config) -> None:
    # slack_sdk tries a call 1 + max_retries (4) times; all five 500s, then the bot tries the whole
    # post again, after looking for it: the first file was never shared, so one image in all.
    fake.fail("files.completeUploadExternal", status=500, error="internal_error", times=5)
    async with bot(fake, config) as running:
        running.app.outlet.result_retry = FAST_RETRY
        payload, _ = await running.slash(f"a patient fox {SMALL}")
        job_id = job_id_in((await running.answers(payload))[0])
        result = await running.result_of(job_id)
    assert [c.status for c in fake.calls_to("files.completeUploadExternal")] == [500] * 5 + [200]
    assert len(fake.calls_to("files.getUploadURLExternal")) == 2 and len(fake.calls_to("files.list")) == 1
    assert images_of(fake, job_id) == [result]


async def test_slack_down_past_the_retry_bound_gets_a_note_then_the_next_start_posts_it(fake: FakeSlack,
                                                                                        config: Config) -> None:
    fake.fail("files.completeUploadExternal", status=503, error="service_unavailable", times=5 * FAST_RETRY.attempts)
    async with bot(fake, config) as running:
        running.app.outlet.result_retry = FAST_RETRY
        payload, _ = await running.slash(f"a patient heron {SMALL}")
        job_id = job_id_in((await running.answers(payload))[0])
        await asyncio.wait_for(running.core.delivery.settled(job_id), WAIT)
        (status,) = fake.channel_messages()
    assert status.text.startswith(f"⚠️ <@{ALICE}> your image is ready, but posting it failed 3 times "
                                  "(Slack answered 503)") and f"`show {job_id}`" in status.text

    async with bot(fake, config) as running:  # Slack is back: the catch-up posts it, once
        result = await running.result_of(job_id)
    assert images_of(fake, job_id) == [result] and result.thread_ts == status.ts


async def test_a_redelivery_after_a_restart_creates_no_second_job(fake: FakeSlack, config: Config) -> None:
    async with bot(fake, config) as running:
        payload, _ = await running.slash(f"a lighthouse {SMALL}")
        original = await running.result_of(job_id_in((await running.answers(payload))[0]))
        event = await running.react(original.ts, "repeat", user=BOB)
        await images_done(fake, 2)

    async with bot(fake, config) as running:
        # Slack's redeliveries after the restart: the same trigger id, and eight copies of the same event.
        again = [await fake.envelope("slash_commands", payload)]
        again += await asyncio.gather(*(fake.envelope("events_api", event, retry_attempt=2) for _ in range(8)))
        for envelope_id in again:
            await fake.ack_of(envelope_id)
        # Eight copies of a new event make one job; once its image is there, a duplicate would be too.
        fresh = fake.reaction(original.ts, "camera", user=ALICE)
        for envelope_id in await asyncio.gather(*(fake.envelope("events_api", fresh) for _ in range(8))):
            await fake.ack_of(envelope_id)
        await images_done(fake, 3)
        rows = await running.history_rows()
    assert len(rows) == 3 and sum(r.requester.user_id == BOB for r in rows) == 1
    assert sum(r.params.model_id == "realvis_xl" for r in rows) == 1


async def test_retries_wait_what_retry_after_says_and_back_off_on_server_errors() -> None:
    from slack_sdk.http_retry.request import HttpRequest
    from slack_sdk.http_retry.response import HttpResponse
    from slack_sdk.http_retry.state import RetryState

    assert retry_after_s(HttpResponse(status_code=429, headers={"Retry-After": ["7"]})) == 7.0
    assert retry_after_s(HttpResponse(status_code=429, headers={"retry-after": ["3600"]})) == 120.0
    backoff = CappedBackoff(0.5)
    assert [backoff.calculate_sleep_duration(n) for n in range(3)] == [0.5, 1.0, 2.0]
    assert backoff.calculate_sleep_duration(20) == 120.0
    # slack_sdk's own server-error handler retries 500 and 503 only; Slack's gateways also answer 502 and 504.
    retry = ServerErrorRetry(max_retries=4, backoff_s=0.5)
    request = HttpRequest(method="POST", url="https://slack.test/api/chat.postMessage", headers={})
    answers = {code: await retry.can_retry_async(state=RetryState(), request=request,
                                                 response=HttpResponse(status_code=code, headers={}))
               for code in (500, 502, 503, 504, 429, 400)}
    assert answers == {500: True, 502: True, 503: True, 504: True, 429: False, 400: False}


async def test_a_channel_the_bot_cannot_post_in_gets_an_actionable_reply_and_no_job_runs(fake: FakeSlack,
                                                                                        config: Config) -> None:
    async with bot(fake, config) as running:
        outside, _ = await running.slash(f"a fox {SMALL}", channel=OUTSIDE_CHANNEL)
        dm, _ = await running.slash(f"a fox {SMALL}", channel=PEOPLE_DM)
        (got, outside_why) = await running.answers(outside, 2)
        dm_got, dm_why = (await running.answers(dm, 2))[:2]
        # Both jobs' last events have been shown: nothing more can be posted or recorded for them.
        for job_id in (job_id_in(got), job_id_in(dm_got)):
            await asyncio.wait_for(running.core.delivery.settled(job_id), WAIT)
        rows = await running.history_rows()
    assert got.startswith("Got it: job")
    assert outside_why == ("I can't post the image here: I'm not a member of this channel. "
                           "Invite me with `/invite @promptpics` and ask again.")
    assert dm_why.startswith("I can't post the image here: I can't see this conversation")
    assert {r.status for r in rows} == {JobStatus.CANCELLED} and len(rows) == 2
    assert fake.uploads == {}
    # One refused attempt per job: no retry storm against a channel that said no.
    assert len([c for c in fake.calls_to("chat.postMessage") if c.error]) == 2


# -- who may do what ------------------------------------------------------------------------------


async def test_admin_subcommands_are_refused_for_others_and_work_for_admins(fake: FakeSlack, config: Config) -> None:
    async with bot(fake, config) as running:
        async def ask(text: str, user: str = ADMIN) -> str:
            payload, ack = await running.slash(text, command="/promptpics", user=user)
            assert ack == {}  # acknowledged at once, answered through the response URL
            return (await running.answers(payload))[0]

        refused = await ask("preload flux_dev", user=ALICE)
        loaded = await ask("preload flux_dev")
        resident = [m.model_id for m in running.core.engine.resident_models()]
        models = await ask("models")
        queue = await ask("queue")
        workers = await ask("workers")
        on_worker = await ask("preload flux_dev on gpu")
        bad_worker = await ask("preload flux_dev on w9")
        garbled = await ask("preload flux_dev at gpu")
        unloaded = await ask("unload flux_dev")
        helped = await ask("", user=ALICE)
        unknown = await ask("frobnicate")
        history = await ask("history", user=ALICE)
    assert refused == "Sorry, `/preload` is for the bot's admins."
    assert loaded.startswith("FLUX.1-dev is loaded") and resident == ["flux_dev"]
    assert "`flux_dev` FLUX.1-dev: loaded" in models and queue == "The queue is empty."
    assert unloaded == "FLUX.1-dev is unloaded."
    assert workers.startswith("1 GPU worker(s):\n`gpu` up, cpu: FLUX.1-dev (cpu)")
    assert on_worker == "FLUX.1-dev was already loaded on `gpu`."
    assert bad_worker == "`worker` is 'w9', but it must be one of the workers: gpu"
    assert garbled == "Usage: /preload MODEL [on WORKER], for example `/preload flux_dev on w1`."
    assert "/imagine PROMPT [--model ID]" in helped and "/promptpics history: your recent jobs" in helped
    assert "preload" not in helped and "/react" not in helped  # admin lines for admins; no terminal-only ones
    assert unknown.startswith("`/promptpics frobnicate` is not a command. Try `/promptpics imagine`")
    assert history == "You have no jobs here yet. Try `/imagine`."


async def test_show_and_history_keep_to_the_workspace_and_adult_jobs_to_their_requester_and_admins(
        fake: FakeSlack, config: Config) -> None:
    async with bot(fake, config) as running:
        async def made(channel: str, team: str = TEAM_ID, user: str = ALICE) -> str:
            payload, _ = await running.slash(f"a lantern in {channel} {SMALL}", user=user, channel=channel, team=team)
            job_id = job_id_in((await running.answers(payload))[0])
            await running.result_of(job_id, channel)
            return job_id

        async def ask(text: str, user: str, channel: str, team: str = TEAM_ID) -> str:
            payload, ack = await running.slash(text, command="/promptpics", user=user, channel=channel, team=team)
            assert ack == {}  # answered privately, through the response URL
            return (await running.answers(payload))[0]

        sfw, adult = await made(CHANNEL), await made(ADULT_CHANNEL)
        theirs = await made(OTHER_TEAM_CHANNEL, OTHER_TEAM_ID, user=BOB)  # Bob's, in another workspace
        rows = {r.id: r for r in await running.history_rows()}
        uploads = len(fake.calls_to("files.completeUploadExternal"))
        show = {  # (who, where, which job) -> the private answer
            "alice, other channel, sfw": await ask(f"show {sfw}", ALICE, ADULT_CHANNEL),
            "bob, same workspace, sfw": await ask(f"show {sfw}", BOB, CHANNEL),
            "bob, other workspace, sfw": await ask(f"show {sfw}", BOB, OTHER_TEAM_CHANNEL, OTHER_TEAM_ID),
            "bob, adult channel, adult": await ask(f"show {adult}", BOB, ADULT_CHANNEL),
            "alice, sfw channel, adult": await ask(f"show {adult}", ALICE, CHANNEL),
            "alice, adult channel, adult": await ask(f"show {adult}", ALICE, ADULT_CHANNEL),
            "alice, this workspace, theirs": await ask(f"show {theirs}", ALICE, CHANNEL),
            "admin, sfw channel, adult": await ask(f"show {adult}", ADMIN, CHANNEL),
            "admin, adult channel, adult": await ask(f"show {adult}", ADMIN, ADULT_CHANNEL),
            "admin, this workspace, theirs": await ask(f"show {theirs}", ADMIN, CHANNEL),
        }
        history = {
            "alice, here": await ask("history", ALICE, CHANNEL),
            "alice, other workspace": await ask("history", ALICE, OTHER_TEAM_CHANNEL, OTHER_TEAM_ID),
            "bob, here": await ask("history", BOB, CHANNEL),
            "bob, other workspace": await ask("history", BOB, OTHER_TEAM_CHANNEL, OTHER_TEAM_ID),
        }
    # Each job recorded the workspace it was asked in; only the allow-listed channel's allows adult images.
    assert [(rows[j].origin.server_id, rows[j].nsfw_allowed) for j in (sfw, adult, theirs)] == [
        (TEAM_ID, False), (TEAM_ID, True), (OTHER_TEAM_ID, False)]
    unknown = {k for k, text in show.items() if text.startswith("There is no job")}
    assert unknown == {"bob, other workspace, sfw", "bob, adult channel, adult", "alice, this workspace, theirs",
                       "admin, this workspace, theirs"}
    assert show["bob, other workspace, sfw"] == f"There is no job `{sfw}` in the history."  # as for an unknown id
    withheld = f"The image of job `{adult}` is not attached here"
    assert {k for k, text in show.items() if withheld in text} == {"alice, sfw channel, adult",
                                                                   "admin, sfw channel, adult"}
    assert all(text.startswith("Job `") for k, text in show.items() if k not in unknown)
    assert len(fake.calls_to("files.completeUploadExternal")) == uploads  # /show on Slack answers in text only
    listed = {k: [j for j in (sfw, adult, theirs) if f"`{j}`" in text] for k, text in history.items()}
    assert listed == {"alice, here": [sfw, adult], "alice, other workspace": [], "bob, here": [],
                      "bob, other workspace": [theirs]}


async def test_the_safety_allow_list_marks_slack_channels_by_id(fake: FakeSlack, config: Config) -> None:
    async with bot(fake, config) as running:
        seen: list[JobRequest] = []
        submit = running.core.engine.submit

        async def recording(request: JobRequest) -> Any:
            seen.append(request)
            return await submit(request)

        running.core.engine.submit = recording  # type: ignore[method-assign]
        for channel in (ADULT_CHANNEL, CHANNEL):
            payload, _ = await running.slash(f"a portrait {SMALL}", channel=channel)
            await running.answers(payload)
    assert [(r.origin.channel_id, r.nsfw_allowed) for r in seen] == [(ADULT_CHANNEL, True), (CHANNEL, False)]


# -- the manifest and the settings ----------------------------------------------------------------


def test_the_manifest_asks_for_exactly_the_scopes_events_and_commands_the_bot_uses() -> None:
    import yaml

    manifest = yaml.safe_load((REPO / "slack-manifest.yaml").read_text(encoding="utf-8"))
    scopes = manifest["oauth_config"]["scopes"]["bot"]
    # The methods' scopes, "commands" for the slash commands, "reactions:read" for reaction_added.
    assert sorted(scopes) == sorted(set(METHOD_SCOPES.values()) | {"commands", "reactions:read"})
    assert manifest["settings"]["event_subscriptions"]["bot_events"] == ["reaction_added"]
    assert manifest["settings"]["socket_mode_enabled"] is True  # the default mode
    defaults = SlackSettings()
    assert [c["command"] for c in manifest["features"]["slash_commands"]] == [defaults.imagine_command,
                                                                              defaults.admin_command]
    assert all(c["should_escape"] is False for c in manifest["features"]["slash_commands"])



@pytest.mark.parametrize(("raw", "env", "key", "rule"), [
    ({}, {"SLACK_BOT_TOKEN": "xoxb-1"}, "SLACK_APP_TOKEN", "Socket Mode (the default) needs an App-Level Token"),
    ({"mode": "http"}, {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1"}, "SLACK_SIGNING_SECRET",
     "HTTP mode checks every request"),
    ({}, {"SLACK_APP_TOKEN": "xapp-1"}, "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN is set"),
    ({}, {"SLACK_BOT_TOKEN": "xapp-wrong-kind", "SLACK_APP_TOKEN": "xapp-1"}, "SLACK_BOT_TOKEN", "start with 'xoxb-'"),
    ({"mode": "webhook"}, {}, "slack.mode", "\"socket\""),
    ({"bot_token": "xoxb-secret"}, {}, "slack.bot_token", "SLACK_BOT_TOKEN environment variable"),
    ({"admin_user_ids": ["alice"]}, {}, "slack.admin_user_ids", "Slack user id"),
    ({"http_port": 70000}, {}, "slack.http_port", "within 0..65535"),
    ({"http_path": "events"}, {}, "slack.http_path", "starting with /"),
    ({"imagine_command": "imagine"}, {}, "slack.imagine_command", "a slash"),
    ({"emoji_names": {"🦊": "Fox Face"}}, {}, "slack.emoji_names.🦊", "Slack emoji name"),
    ({}, {"SLACK_API_URL": "slack.example"}, "SLACK_API_URL", "http:// or https://"),
    ({"surprise": 1}, {}, "slack.surprise", "not a known key"),
])
def test_bad_slack_settings_name_the_key_value_and_rule(raw: dict[str, Any], env: dict[str, str], key: str,
                                                        rule: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_slack_settings(raw, env)
    assert caught.value.key == key and rule in caught.value.rule
    assert "xoxb-secret" not in str(caught.value) and "xoxb-1" not in str(caught.value)


def test_slack_settings_from_the_environment_and_the_shipped_config(config: Config) -> None:
    env = {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "s3cret", "SLACK_API_URL": "https://slack.gov.example/api"}
    settings = parse_slack_settings({"mode": "http", "http_port": 8080, "admin_user_ids": ["U012ABCDEF"]}, env)
    assert (settings.mode, settings.http_port, settings.api_url) == ("http", 8080, "https://slack.gov.example/api/")
    assert settings.admin_user_ids == frozenset({"U012ABCDEF"}) and "xoxb-1" not in repr(settings)
    shipped = load_settings(config, {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1", "DISCORD_TOKEN": "d"})
    assert shipped.slack.mode == "socket" and shipped.platforms_with_tokens == ["discord", "slack"]
    with pytest.raises(ConfigError, match="has none here"):  # a model emoji Slack has no name for
        parse_slack_settings({"emoji_names": {}}, {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1"},
                             shipped.bot.model_copy(update={"regenerate_emoji": "🫠"}), config)


def test_text_is_escaped_for_slack_except_our_own_mention() -> None:
    assert unescape("a &lt;b&gt; &amp;amp;") == "a <b> &amp;"
    text = "<@U1> asked: <!channel> & <@U2>"
    assert slack_text(text, "<@U1>") == "<@U1> asked: &lt;!channel&gt; &amp; &lt;@U2&gt;"


# -- `promptpics run` -----------------------------------------------------------------------------


async def test_a_refused_slack_token_stops_run_with_a_sentence_and_no_token_shown(
        fake: FakeSlack, config: Config, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(fake)
    for variable in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN"):
        slack = (settings.slack.model_copy(update={"bot_token": "xoxb-wrong"}) if variable == "SLACK_BOT_TOKEN"
                 else settings.slack.model_copy(update={"app_token": "xapp-wrong"}))
        code = await asyncio.wait_for(serve(config, settings.model_copy(update={"slack": slack})), 60)
        err = capsys.readouterr().err
        assert code == 1 and f"Slack refused {variable} (invalid_auth)" in err, err
        assert "wrong" not in err and "Traceback" not in err
    assert fake.connections_opened == 0 and not fake.socket_connected.is_set()


def test_platform_apps_builds_one_app_per_platform_with_a_token(fake: FakeSlack, config: Config) -> None:
    settings = settings_for(fake).model_copy(update={"discord": DiscordSettings(token="d")})
    core = build_core(config, settings, admin_policies(settings))
    assert [app.platform for app in platform_apps(core, settings)] == ["discord", "slack"]
    assert admin_policies(settings)["slack"].user_ids == frozenset({ADMIN})


async def test_run_serves_discord_and_slack_from_one_process_and_one_queue(fake: FakeSlack, tmp_path: Path,
                                                                           tiny_models: Any,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", DiscordWebSocket.DEFAULT_GATEWAY)
    data = tmp_path / "data"
    data.mkdir()
    (data / "tiny-models").symlink_to(tiny_models.root.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "SLACK_"))}
    discord_fake = await FakeDiscord().start()
    env.update(PROMPTPICS_DATA_DIR=str(data), HF_HUB_OFFLINE="1", DISCORD_TOKEN=DISCORD_TOKEN,
               DISCORD_API_BASE=discord_fake.api_base, DISCORD_GATEWAY_URL=discord_fake.gateway_url,
               SLACK_BOT_TOKEN=BOT_TOKEN, SLACK_APP_TOKEN=APP_TOKEN, SLACK_API_URL=fake.api_url)
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "--profile", "tiny", "run", cwd=REPO,
                                                   env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(asyncio.gather(discord_fake.identified.wait(), fake.socket_connected.wait()), 60)
        interaction = await discord_fake.slash("imagine", {"prompt": "a kite", "steps": 1, "width": 256, "height": 256})
        payload = fake.command("/imagine", "a kite --steps 1 --size 256x256")
        await fake.envelope("slash_commands", payload)
        await discord_fake.wait_for(lambda: discord_fake.channel_messages(DISCORD_CHANNEL, with_files=True), 60)
        # Posted, reacted to and its status marked done: the job is fully shown before the stop.
        await fake.wait_for(lambda: any("x" in m.reactions for m in fake.channel_messages(with_files=True))
                            and any("✅ done" in m.text for m in fake.channel_messages()), 60)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await discord_fake.close()
    assert process.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr and BOT_TOKEN.encode() not in stderr and APP_TOKEN.encode() not in stderr
    assert discord_fake.followups(interaction) and fake.answers(payload)
    async with HistoryStore.open(data) as history:  # one history: both platforms' jobs, one queue
        rows = await history.recent_jobs(limit=10)
    assert sorted(r.origin.platform for r in rows) == ["discord", "slack"]
    assert {r.status for r in rows} == {JobStatus.SUCCEEDED}
