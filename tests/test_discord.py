"""The Discord adapter end to end: the real discord.py client against a fake Discord on
127.0.0.1, the real engine on tiny models, a real SQLite history under tmp_path."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.gateway import DiscordWebSocket
from PIL import Image

from bot.cli.serve import BotCore, admin_policies, build_core, cmd_sync_commands, serve, serve_apps
from bot.discord import DiscordApp, sync_commands
from bot.posting import RetryPolicy
from bot.settings import BotSettings, DiscordSettings, Settings
from engine import Config, Engine, GenerationParams, JobCancelled, JobProgressed, JobRequest, JobStatus, Origin, Requester
from engine.history import Deliveries, HistoryStore
from engine.images import read_png_metadata
from engine.pipelines.previews import PreviewSettings
from tests.conftest import REPO, make_tiny_config, results_go_unrecorded
from tests.fake_discord import (
    ADMIN,
    ADMIN_ROLE_ID,
    ADULT_CHANNEL_ID,
    ALICE,
    BOB,
    BOT_TOKEN,
    CHANNEL_ID,
    GUILD_ID,
    OTHER_CHANNEL_ID,
    OTHER_GUILD_CHANNEL_ID,
    OTHER_GUILD_ID,
    Call,
    FakeDiscord,
)

pytestmark = pytest.mark.timeout(120)

SMALL = {"steps": 2, "width": 64, "height": 64}
JOB_ID = re.compile(r"job `([a-z0-9]{6})`")


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    # point_at() sets these class attributes of discord.py; put them back after each test.
    monkeypatch.setattr(discord.http.Route, "BASE", discord.http.Route.BASE)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", DiscordWebSocket.DEFAULT_GATEWAY)
    server = await FakeDiscord().start()
    yield server
    await server.close()


@pytest.fixture
def config(tiny_models: Any, tmp_path: Path) -> Config:
    return make_tiny_config(tiny_models, tmp_path / "data")


def settings_for(fake: FakeDiscord, **bot: Any) -> Settings:
    return Settings(
        bot=BotSettings(**{"cooldown_s": 0.0, "progress_interval_s": 0.0, **bot}),
        discord=DiscordSettings(token=BOT_TOKEN, api_base=fake.api_base, gateway_url=fake.gateway_url,
                                admin_user_ids=frozenset({str(ADMIN)}), admin_role_ids=frozenset({str(ADMIN_ROLE_ID)})),
    )


@dataclass
class Running:
    core: BotCore
    app: DiscordApp
    fake: FakeDiscord

    async def reply_to(self, interaction: dict[str, Any]) -> dict[str, Any]:
        """The (one) followup the bot sent for ``interaction``."""
        found = await self.fake.wait_for(lambda: self.fake.followups(interaction))
        return found[0]

    async def result_of(self, job_id: str, channel_id: int = CHANNEL_ID) -> dict[str, Any]:
        """The message with ``job_id``'s image, once its reactions are on and its status is gone."""
        def done() -> dict[str, Any] | None:
            for m in self.fake.channel_messages(channel_id, with_files=True):
                if f"job `{job_id}`" in m["content"] and "❌" in self.fake.reactions.get(int(m["id"]), []):
                    statuses = self.fake.channel_messages(channel_id, with_files=False)
                    if not any(f"job `{job_id}`" in s["content"] for s in statuses if not s["webhook"]):
                        return m
            return None

        return await self.fake.wait_for(done)

    async def history_rows(self) -> list[Any]:
        return await self.core.engine.history.recent_jobs(limit=100)


@contextlib.asynccontextmanager
async def bot(fake: FakeDiscord, config: Config, **bot_settings: Any) -> AsyncIterator[Running]:
    """The bot as `promptpics run` builds it (same core, same shutdown), serving the fake."""
    settings = settings_for(fake, **bot_settings)
    core = build_core(config, settings, admin_policies(settings))
    app = DiscordApp(core.commands, settings.discord, guild_ready_timeout=0.05)
    core.delivery.add_outlet(app.outlet)
    stop = asyncio.Event()
    async with core.engine:
        serving = asyncio.create_task(serve_apps(core, [app], stop))
        await asyncio.wait_for(app.connected.wait(), 30)
        try:
            yield Running(core, app, fake)
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)


def job_id_in(text: str) -> str:
    match = JOB_ID.search(text)
    assert match, text
    return match[1]


# -- /imagine -------------------------------------------------------------------------------------


async def test_imagine_defers_then_edits_a_status_and_posts_the_png_with_reactions(fake: FakeDiscord, config: Config) -> None:
    async with bot(fake, config) as running:
        options = {"prompt": "a red fox in the snow", "model": "flux_dev", "negative": "blur", "guidance": 3.5,
                   "seed": 42, **SMALL}
        interaction = await fake.slash("imagine", options)
        ack = await running.reply_to(interaction)
        job_id = job_id_in(ack["content"])
        result = await running.result_of(job_id)
        rows = await running.history_rows()

    # Acknowledged first, privately (a "thinking" defer), then the job id in a private followup.
    first = next(c for c in fake.calls if interaction["id"] in c.path)
    assert first.path.endswith("/callback") and first.body == {"type": 5, "data": {"flags": 64}}
    assert ack["flags"] & 64
    # The status message went to the channel with the bot token and was edited with progress.
    status = next(m for m in fake.messages.values() if not m["files"] and not m["webhook"]
                  and f"job `{job_id}`" in m["content"] and m["edits"])
    assert status["bot_auth"] and status["deleted"]  # the result replaced it
    assert "model: FLUX.1-dev, as you asked" in fake.calls_to("POST", f"/channels/{CHANNEL_ID}/messages")[0].body["content"]
    assert any("step 2/2" in e for e in status["edits"]) and any("step 1/2" in e for e in status["edits"])
    # The result: a real PNG with the parameters, a caption, our reactions, only the requester mentioned.
    (name, data), = result["files"].items()
    assert name == f"{job_id}.png" and result["bot_auth"]
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (64, 64)
    assert read_png_metadata(data)["seed"] == 42
    caption = result["content"]
    for part in (f"<@{ALICE}>", "a red fox in the snow", "FLUX.1-dev", "seed 42", "2 steps", "guidance 3.5", "64×64",
                 "not: blur"):
        assert part in caption
    assert fake.reactions[int(result["id"])] == ["🔁", "📷", "🧩", "🔤", "❌"]
    assert result["allowed_mentions"] == {"parse": [], "users": [ALICE]}  # nobody else, whatever the prompt says
    # The history links the message to the job (reactions rely on it), and nothing synced commands.
    assert [(r.id, r.status, r.requester.user_id, r.origin.channel_id) for r in rows] == [
        (job_id, JobStatus.SUCCEEDED, str(ALICE), str(CHANNEL_ID))]
    assert fake.calls_to("PUT", "/commands") == []


async def test_bad_options_get_a_private_reply_and_create_no_job(fake: FakeDiscord, config: Config) -> None:
    cases = [
        ({"prompt": "a fox", "steps": 0}, "`steps` is 0, but it must be a whole number from 1 to 50"),
        ({"prompt": "a fox", "width": -5}, "`width` is -5, but it must be at least 64 pixels"),
        ({"prompt": "a fox", "model": "dalle"}, "`model` is 'dalle', but it must be 'auto' or one of: flux_dev"),
        ({"prompt": "   "}, "`prompt` is '   ', but it must not be empty"),
        ({"prompt": "fox " * 1250}, "`prompt` is '4999 characters', but it must be at most 1000 characters"),
    ]
    async with bot(fake, config) as running:
        for options, sentence in cases:
            interaction = await fake.slash("imagine", options)
            reply = await running.reply_to(interaction)
            assert sentence in reply["content"] and reply["flags"] & 64, (options, reply["content"])
        assert await running.history_rows() == []
    assert fake.channel_messages(with_files=False) == [m for m in fake.channel_messages() if m["webhook"]]


async def test_a_channel_where_the_bot_cannot_post_images_is_refused_up_front(fake: FakeDiscord, config: Config) -> None:
    without = (2**41 - 1) & ~discord.Permissions(attach_files=True, add_reactions=True).value
    async with bot(fake, config) as running:
        reply = await running.reply_to(await fake.slash("imagine", {"prompt": "a fox"}, app_permissions=without))
        assert await running.history_rows() == []
    assert reply["content"].startswith("I can't post images in this channel: I am missing Attach Files, Add Reactions.")
    assert reply["flags"] & 64


async def test_a_job_that_outlives_the_interaction_token_is_delivered_with_the_bot_token(fake: FakeDiscord,
                                                                                          config: Config) -> None:
    fake.expire_tokens_after_ack = True  # Discord's 15 minutes, shortened to "after the first reply"
    async with bot(fake, config) as running:
        interaction = await fake.slash("imagine", {"prompt": "a lighthouse", **SMALL, "steps": 3})
        job_id = job_id_in((await running.reply_to(interaction))["content"])
        result = await running.result_of(job_id)
    assert result["bot_auth"] and not result["webhook"]
    webhook_calls = [c for c in fake.calls if "/webhooks/" in c.path]
    assert len(webhook_calls) == 1 and webhook_calls[0].status == 200  # the ack; never the dead token again
    assert all(c.status < 400 for c in fake.calls)


async def test_an_image_over_the_upload_limit_is_reencoded_to_fit(fake: FakeDiscord, config: Config) -> None:
    async with bot(fake, config) as running:
        interaction = await fake.slash("imagine", {"prompt": "static noise", "steps": 1, "width": 256, "height": 256},
                                       size_limit=4000)
        job_id = job_id_in((await running.reply_to(interaction))["content"])
        result = await running.result_of(job_id)
        stored = (await running.core.engine.history.get_job(job_id)).image_path.read_bytes()
    (name, data), = result["files"].items()
    assert len(stored) > 4000  # the PNG really was too big
    assert len(data) <= 4000 and name.rsplit(".", 1)[1] in ("webp", "jpg")
    assert Image.open(io.BytesIO(data)).format in ("WEBP", "JPEG")


# -- reactions ------------------------------------------------------------------------------------


async def test_regenerate_and_switch_model_reactions_work_after_a_restart(fake: FakeDiscord, config: Config) -> None:
    async with bot(fake, config) as running:
        interaction = await fake.slash("imagine", {"prompt": "a castle on a hill", "seed": 7, **SMALL})
        first_id = job_id_in((await running.reply_to(interaction))["content"])
        original = await running.result_of(first_id)

    # A new client and a new engine on the same data folder: nothing is cached any more.
    async with bot(fake, config) as running:
        await fake.react(original["id"], "🔁", user_id=BOB)
        await fake.react(original["id"], "📷", user_id=BOB)
        await fake.wait_for(lambda: len(fake.channel_messages(with_files=True)) == 3
                            and all(len(fake.reactions.get(int(m["id"]), [])) == 5
                                    for m in fake.channel_messages(with_files=True)))
        rows = {r.id: r for r in await running.history_rows()}

    assert len(rows) == 3
    first = rows.pop(first_id)
    by_model = {r.params.model_id: r for r in rows.values()}
    regenerated, switched = by_model["flux_dev"], by_model["realvis_xl"]
    for job in (regenerated, switched):  # linked to the image reacted to, answered where it was
        assert job.origin == Origin("discord", str(CHANNEL_ID), "", original["id"], server_id=str(GUILD_ID))
        assert job.requester.user_id == str(BOB) and job.status is JobStatus.SUCCEEDED
        assert job.params.prompt == first.params.prompt and (job.params.width, job.params.height) == (64, 64)
    assert regenerated.params.steps == first.params.steps and regenerated.params.seed != first.params.seed
    assert switched.params.seed == 7 and switched.params.steps == config.model("realvis_xl").steps
    # Their status messages were replies to the original image.
    replies = [m for m in fake.messages.values() if m["reference"] == original["id"]]
    assert {job_id_in(m["content"]) for m in replies} == {regenerated.id, switched.id}


async def test_cancel_reaction_is_refused_for_others_and_deletes_for_the_owner_or_an_admin(fake: FakeDiscord,
                                                                                           config: Config) -> None:
    async with bot(fake, config) as running:
        made = []
        for prompt in ("first", "second"):
            interaction = await fake.slash("imagine", {"prompt": prompt, **SMALL})
            made.append(await running.result_of(job_id_in((await running.reply_to(interaction))["content"])))
        await fake.react(made[0]["id"], "❌", user_id=BOB)
        refusal = await fake.wait_for(lambda: [m for m in fake.channel_messages() if m["reference"] == made[0]["id"]])
        await fake.react(made[0]["id"], "❌", user_id=ALICE)  # the owner
        await fake.react(made[1]["id"], "❌", user_id=BOB, roles=(ADMIN_ROLE_ID,))  # an admin by role
        await fake.wait_for(lambda: all(fake.messages[int(m["id"])].get("deleted") for m in made))
        await fake.react(made[0]["id"], "👍", user_id=ALICE)  # not ours: ignored
        jobs = await running.history_rows()
    assert refusal[0]["content"].startswith(f"<@{BOB}> Only the person who asked for job")
    deletes = fake.calls_to("DELETE", "/messages/")
    assert [c.path.rsplit("/", 1)[1] for c in deletes if c.path.endswith(tuple(m["id"] for m in made))] == [
        made[0]["id"], made[1]["id"]]
    assert {j.status for j in jobs} == {JobStatus.SUCCEEDED}  # the images stay in the history


async def test_cancel_reaction_on_a_status_message_cancels_queued_and_running_jobs(fake: FakeDiscord,
                                                                                   tiny_models: Any, tmp_path: Path) -> None:
    config = make_tiny_config(tiny_models, tmp_path / "data", max_steps=5000)  # long enough to still be running

    def statuses() -> list[dict[str, Any]]:
        return [m for m in fake.channel_messages(with_files=False)
                if not m["webhook"] and "❌" in fake.reactions.get(int(m["id"]), [])]

    async with bot(fake, config) as running:
        ids = []
        for prompt in ("slow one", "waiting one"):
            interaction = await fake.slash("imagine", {"prompt": prompt, "steps": 5000, "width": 64, "height": 64})
            ids.append(job_id_in((await running.reply_to(interaction))["content"]))
        await fake.wait_for(lambda: len(statuses()) == 2)
        for status in reversed(statuses()):  # the waiting one first, then the running one
            await fake.react(status["id"], "❌", user_id=ALICE)
        await fake.wait_for(lambda: all("cancelled" in s["content"] for s in statuses()))
        rows = {r.id: r.status for r in await running.history_rows()}
    assert rows == {ids[0]: JobStatus.CANCELLED, ids[1]: JobStatus.CANCELLED}
    assert fake.channel_messages(with_files=True) == []


async def test_previews_reach_the_status_message_as_edits_with_an_image(fake: FakeDiscord, tiny_models: Any,
                                                                        tmp_path: Path) -> None:
    config = make_tiny_config(tiny_models, tmp_path / "data").model_copy(update={"previews": PreviewSettings(every_steps=1, min_interval_s=0.0)})
    async with bot(fake, config) as running:
        interaction = await fake.slash("imagine", {"prompt": "a neon fox", "steps": 4, "width": 128, "height": 64})
        job_id = job_id_in((await running.reply_to(interaction))["content"])
        result = await running.result_of(job_id)
    status = next(m for m in fake.messages.values() if not m["webhook"] and not m["files"]
                  and f"job `{job_id}`" in m["content"])
    uploads = [files for files in status["edit_files"] if files]
    assert uploads, status["edits"]
    for files in uploads:  # each edit carried exactly one preview, replacing the last one
        (name, data), = files.items()
        picture = Image.open(io.BytesIO(data))
        assert name == f"{job_id}-preview.jpg" and picture.format == "JPEG" and picture.size == (128, 64)
    edits = [c for c in fake.calls_to("PATCH", f"/messages/{status['id']}") if c.files]
    assert all(c.bot_auth and "rendering on" in c.body["content"] for c in edits)  # the text came along
    assert status["deleted"] and list(result["files"]) == [f"{job_id}.png"]  # the image replaced it all


async def test_cancel_reaction_stops_a_running_job_within_one_step_and_drops_its_preview(
        fake: FakeDiscord, tiny_models: Any, tmp_path: Path) -> None:
    config = make_tiny_config(tiny_models, tmp_path / "data", max_steps=5000).model_copy(update={"previews": PreviewSettings(every_steps=1, min_interval_s=0.0)})
    async with bot(fake, config) as running:
        engine = running.core.engine
        events = engine.subscribe()
        interaction = await fake.slash("imagine", {"prompt": "slow one", "steps": 5000, "width": 64, "height": 64})
        job_id = job_id_in((await running.reply_to(interaction))["content"])
        status = await fake.wait_for(lambda: next(
            (m for m in fake.channel_messages(with_files=False) if f"job `{job_id}`" in m["content"]
             and "❌" in fake.reactions.get(int(m["id"]), []) and any(m.get("edit_files", []))), None))
        at_cancel: list[int] = []
        real_cancel = engine.cancel

        async def cancel(cancelled_id: str) -> bool:
            # the last step the GPU thread finished when the flag goes up (engine-internal, read-only)
            running = next(iter(engine._running.values()), None)
            at_cancel.append(running.step if running is not None else -1)
            return await real_cancel(cancelled_id)

        engine.cancel = cancel  # type: ignore[method-assign]
        await fake.react(status["id"], "❌", user_id=ALICE)
        steps: list[int] = []
        while True:
            event = await asyncio.wait_for(events.get(), 30)
            if isinstance(event, JobProgressed) and event.job_id == job_id:
                steps.append(event.step)
            if isinstance(event, JobCancelled) and event.job_id == job_id:
                break
        await fake.wait_for(lambda: "cancelled" in fake.messages[int(status["id"])]["content"])
        rows = {r.id: r.status for r in await running.history_rows()}
    assert at_cancel and at_cancel[0] > 0, "the job was not running yet"
    assert max(steps) <= at_cancel[0] + 1  # the step in flight may finish; no further one starts
    assert rows == {job_id: JobStatus.CANCELLED}
    message = fake.messages[int(status["id"])]
    assert message["edit_files"][-1] == {} and message["attachments"] == []  # the preview went with it


async def test_a_waiting_jobs_status_shows_an_eta_at_submit_and_again_as_the_queue_moves(
        fake: FakeDiscord, tiny_models: Any, tmp_path: Path) -> None:
    config = make_tiny_config(tiny_models, tmp_path / "data", max_steps=5000)
    async with bot(fake, config) as running:
        first = await fake.slash("imagine", {"prompt": "warm up", "model": "flux_dev", **SMALL})
        await running.result_of(job_id_in((await running.reply_to(first))["content"]))  # flux has a recorded time now
        ids = []
        for prompt, steps in (("long one", 300), ("second", 2), ("third", 2)):
            interaction = await fake.slash("imagine", {"prompt": prompt, "model": "flux_dev", "steps": steps,
                                                       "width": 256 if steps > 2 else 64,
                                                       "height": 256 if steps > 2 else 64})
            ids.append(job_id_in((await running.reply_to(interaction))["content"]))
            if steps > 2:  # nothing like it was recorded: its own pace, two steps in, makes the ETAs behind it
                await fake.wait_for(lambda: any(int(n) >= 2 for m in fake.messages.values()
                                                if f"job `{ids[0]}`" in m["content"]
                                                for n in re.findall(r"step (\d+)/300", m["content"])))
        await running.result_of(ids[2])
    third = next(m for m in fake.messages.values() if not m["webhook"] and f"job `{ids[2]}`" in m["content"])
    posted = fake.calls_to("POST", f"/channels/{CHANNEL_ID}/messages")
    shown = [c.body["content"] for c in posted if f"job `{ids[2]}`" in c.body.get("content", "")] + third["edits"]
    queued = [text.splitlines()[0] for text in shown if text.startswith("🕒")]
    assert queued[0].startswith(f"🕒 <@{ALICE}> queued #2 · ETA ~"), queued
    assert any(line.startswith(f"🕒 <@{ALICE}> next in line · ETA ~") for line in queued[1:]), queued


# -- admin commands -------------------------------------------------------------------------------


async def test_admin_commands_are_refused_for_others_and_work_for_admins(fake: FakeDiscord, config: Config) -> None:
    async with bot(fake, config) as running:
        for name, options in (("preload", {"model": "flux_dev"}), ("unload", {"model": "flux_dev"}),
                              ("models", {}), ("queue", {}), ("stats", {}), ("workers", {})):
            reply = await running.reply_to(await fake.slash(name, options, user_id=ALICE))
            assert reply["content"] == f"Sorry, `/{name}` is for the bot's admins." and reply["flags"] & 64
        assert running.core.engine.resident_models() == ()

        loaded = await running.reply_to(await fake.slash("preload", {"model": "flux_dev"}, user_id=BOB,
                                                         roles=(ADMIN_ROLE_ID,)))
        assert loaded["content"].startswith("FLUX.1-dev is loaded")
        assert [m.model_id for m in running.core.engine.resident_models()] == ["flux_dev"]
        models = await running.reply_to(await fake.slash("models", user_id=ADMIN))
        queue = await running.reply_to(await fake.slash("queue", user_id=ADMIN))
        workers = await running.reply_to(await fake.slash("workers", user_id=ADMIN))
        elsewhere = await running.reply_to(await fake.slash("preload", {"model": "flux_dev", "on": "w3"}, user_id=ADMIN))
        unloaded = await running.reply_to(await fake.slash("unload", {"model": "flux_dev"}, user_id=ADMIN))
        assert running.core.engine.resident_models() == ()
    assert workers["content"].startswith("1 GPU worker(s):\n`gpu` up, cpu: FLUX.1-dev (cpu)")
    assert workers["content"].endswith("; idle")
    assert elsewhere["content"] == "`worker` is 'w3', but it must be one of the workers: gpu"
    assert "`flux_dev` FLUX.1-dev: loaded" in models["content"] and "`realvis_xl` RealVisXL V4.0: not loaded" in models["content"]
    assert queue["content"] == "The queue is empty."
    assert unloaded["content"] == "FLUX.1-dev is unloaded."


async def test_gallery_answers_a_private_signed_link_to_ones_own_images(fake: FakeDiscord, config: Config) -> None:
    from web.links import load_secret, verify_link

    async with bot(fake, config) as running:
        answer = await running.reply_to(await fake.slash("gallery", user_id=ALICE))
    url = re.search(r"http://127\.0\.0\.1:8765/g/(\S+)", answer["content"])
    assert url, answer["content"]
    member = verify_link(load_secret(config.data_dir), url[1])
    assert (member.platform, member.user_id) == ("discord", str(ALICE))


async def test_history_and_show_are_for_everyone(fake: FakeDiscord, config: Config) -> None:
    async with bot(fake, config) as running:
        interaction = await fake.slash("imagine", {"prompt": "a small boat", "seed": 3, **SMALL})
        job_id = job_id_in((await running.reply_to(interaction))["content"])
        await running.result_of(job_id)
        mine = await running.reply_to(await fake.slash("history", user_id=ALICE))
        theirs = await running.reply_to(await fake.slash("history", user_id=BOB))
        shown = await running.reply_to(await fake.slash("show", {"job_id": job_id.upper()}, user_id=BOB))
        missing = await running.reply_to(await fake.slash("show", {"job_id": "zzzzzz"}, user_id=BOB))
    assert f"`{job_id}`" in mine["content"] and "a small boat" in mine["content"]
    assert theirs["content"] == "You have no jobs here yet. Try `/imagine`."
    assert shown["content"].startswith(f"Job `{job_id}`: succeeded") and "seed 3" in shown["content"]
    assert list(shown["files"]) == [f"{job_id}.png"]  # the image comes along
    assert missing["content"] == "There is no job `zzzzzz` in the history."


async def test_show_and_history_keep_to_the_server_and_adult_images_to_adult_channels(fake: FakeDiscord,
                                                                                    config: Config) -> None:
    async with bot(fake, config) as running:
        async def made(channel_id: int, guild_id: int = GUILD_ID, user_id: int = ALICE) -> str:
            asked = await fake.slash("imagine", {"prompt": f"a lantern in {channel_id}", **SMALL}, user_id=user_id,
                                     channel_id=channel_id, guild_id=guild_id)
            job_id = job_id_in((await running.reply_to(asked))["content"])
            await running.result_of(job_id, channel_id=channel_id)
            return job_id

        async def ask(name: str, user_id: int, channel_id: int, guild_id: int = GUILD_ID, **options: Any) -> dict[str, Any]:
            asked = await fake.slash(name, options, user_id=user_id, channel_id=channel_id, guild_id=guild_id)
            return await running.reply_to(asked)

        sfw, adult = await made(CHANNEL_ID), await made(ADULT_CHANNEL_ID)
        theirs = await made(OTHER_GUILD_CHANNEL_ID, OTHER_GUILD_ID, user_id=BOB)  # Bob's, in another server
        rows = {r.id: r for r in await running.history_rows()}
        show = {  # (who, where, which job) -> the private answer
            "alice, other channel, sfw": await ask("show", ALICE, OTHER_CHANNEL_ID, job_id=sfw),
            "bob, same server, sfw": await ask("show", BOB, CHANNEL_ID, job_id=sfw),
            "bob, other server, sfw": await ask("show", BOB, OTHER_GUILD_CHANNEL_ID, OTHER_GUILD_ID, job_id=sfw),
            "bob, adult channel, adult": await ask("show", BOB, ADULT_CHANNEL_ID, job_id=adult),
            "alice, sfw channel, adult": await ask("show", ALICE, CHANNEL_ID, job_id=adult),
            "alice, adult channel, adult": await ask("show", ALICE, ADULT_CHANNEL_ID, job_id=adult),
            "alice, this server, theirs": await ask("show", ALICE, CHANNEL_ID, job_id=theirs),
            "admin, sfw channel, adult": await ask("show", ADMIN, OTHER_CHANNEL_ID, job_id=adult),
            "admin, adult channel, adult": await ask("show", ADMIN, ADULT_CHANNEL_ID, job_id=adult),
            "admin, this server, theirs": await ask("show", ADMIN, CHANNEL_ID, job_id=theirs),
        }
        history = {
            "alice, here": await ask("history", ALICE, OTHER_CHANNEL_ID),
            "alice, other server": await ask("history", ALICE, OTHER_GUILD_CHANNEL_ID, OTHER_GUILD_ID),
            "bob, here": await ask("history", BOB, CHANNEL_ID),
            "bob, other server": await ask("history", BOB, OTHER_GUILD_CHANNEL_ID, OTHER_GUILD_ID),
        }
    # Each job recorded the server it was asked in; only the age-restricted channel's allows adult images.
    assert [(rows[j].origin.server_id, rows[j].nsfw_allowed) for j in (sfw, adult, theirs)] == [
        (str(GUILD_ID), False), (str(GUILD_ID), True), (str(OTHER_GUILD_ID), False)]
    with_image = {k for k, m in show.items() if m["files"]}
    unknown = {k for k, m in show.items() if m["content"].startswith("There is no job")}
    assert with_image == {"alice, other channel, sfw", "bob, same server, sfw", "alice, adult channel, adult",
                          "admin, adult channel, adult"}
    assert unknown == {"bob, other server, sfw", "bob, adult channel, adult", "alice, this server, theirs",
                       "admin, this server, theirs"}
    assert show["bob, other server, sfw"]["content"] == f"There is no job `{sfw}` in the history."  # as for "zzzzzz"
    for key in ("alice, sfw channel, adult", "admin, sfw channel, adult"):  # the text, and why there is no image
        assert show[key]["content"].startswith(f"Job `{adult}`: succeeded") and not show[key]["files"]
        assert show[key]["content"].endswith(f"The image of job `{adult}` is not attached here: it was made in a "
                                             "channel that allows adult images, so it is shown only in such a channel.")
    assert all(m["flags"] & 64 for m in [*show.values(), *history.values()])  # every answer private (ephemeral)
    listed = {k: [j for j in (sfw, adult, theirs) if f"`{j}`" in m["content"]] for k, m in history.items()}
    assert listed == {"alice, here": [sfw, adult], "alice, other server": [], "bob, here": [],
                      "bob, other server": [theirs]}


# -- restarts -------------------------------------------------------------------------------------


async def test_a_job_taken_back_after_a_restart_is_delivered_to_its_original_channel(fake: FakeDiscord,
                                                                                     config: Config) -> None:
    # A job left queued by a process that died, whose status message was already posted.
    old_status = {"id": "900000000000009999", "channel_id": str(OTHER_CHANNEL_ID), "content": "🕒 queued #1",
                  "files": {}, "webhook": False, "bot_auth": True, "reference": None, "edits": []}
    fake.messages[int(old_status["id"])] = old_status
    async with HistoryStore.open(config.data_dir) as history:
        params = GenerationParams(prompt="an old request", negative_prompt="", model_id="flux_dev", steps=2,
                                  guidance=4.5, width=64, height=64, seed=9, route_reason="the default model")
        stored = await history.record_queued(requester=Requester("discord", str(ALICE), "alice"),
                                             origin=Origin("discord", str(OTHER_CHANNEL_ID)), model_asked=None,
                                             params=params, created_at=time.time())
        await Deliveries(history).record(stored.id, platform="discord", channel_id=str(OTHER_CHANNEL_ID),
                                         message_id=old_status["id"], kind="status")

    async with bot(fake, config) as running:
        result = await running.result_of(stored.id, channel_id=OTHER_CHANNEL_ID)
    assert any("back after a restart" in e for e in old_status["edits"])  # the same status message, edited
    assert old_status.get("deleted") and f"<@{ALICE}>" in result["content"]
    assert read_png_metadata(next(iter(result["files"].values())))["prompt"] == "an old request"


async def test_a_result_finished_but_never_posted_is_posted_at_the_next_start(fake: FakeDiscord, config: Config) -> None:
    async with Engine(config) as engine:  # the process died after the job finished, before posting it
        handle = await engine.submit(JobRequest("posted late", steps=1, width=64, height=64,
                                                requester=Requester("discord", str(ALICE)),
                                                origin=Origin("discord", str(CHANNEL_ID))))
        await handle.result()
    async with bot(fake, config) as running:
        result = await running.result_of(handle.id)
        deliveries = await running.core.engine.deliveries.of_job(handle.id)
    assert "posted late" in result["content"]
    assert [(d.kind, d.message_id) for d in deliveries] == [("result", result["id"])]


# -- exactly-once delivery ------------------------------------------------------------------------

FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.01)


def result_posts(fake: FakeDiscord, job_id: str) -> list[Call]:
    """Every POST of ``job_id``'s image to the channel, whatever was answered."""
    return [c for c in fake.calls_to("POST", f"/channels/{CHANNEL_ID}/messages") if f"{job_id}.png" in c.files]


def images_of(fake: FakeDiscord, job_id: str) -> list[dict[str, Any]]:
    return [m for m in fake.channel_messages(with_files=True) if f"{job_id}.png" in m["files"]]


def posts_with_an_image(call: Call) -> bool:
    return bool(call.files)


async def test_a_crash_between_posting_and_recording_the_result_posts_it_once_after_a_restart(
        fake: FakeDiscord, config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    with results_go_unrecorded(monkeypatch):  # the process dies right after Discord took the post
        async with bot(fake, config) as running:
            interaction = await fake.slash("imagine", {"prompt": "a lighthouse at dusk", **SMALL})
            job_id = job_id_in((await running.reply_to(interaction))["content"])
            await asyncio.wait_for(running.core.delivery.settled(job_id), 60)
            assert len(images_of(fake, job_id)) == 1
            assert not [d for d in await running.core.engine.deliveries.of_job(job_id) if d.kind == "result"]

    async with bot(fake, config) as running:  # the next start: its catch-up finds the post
        result = await running.result_of(job_id)
        deliveries = await running.core.engine.deliveries.of_job(job_id)
    assert images_of(fake, job_id) == [result] and len(result_posts(fake, job_id)) == 1
    assert ("result", result["id"]) in [(d.kind, d.message_id) for d in deliveries]
    assert fake.calls_to("GET", f"/channels/{CHANNEL_ID}/messages")  # it looked in the channel's history


async def test_a_500_after_discord_made_the_message_still_posts_one_message(fake: FakeDiscord, config: Config) -> None:
    # Discord made the message, then the answer was lost as a 500: discord.py sends it again
    # (after 1 s) with the same nonce, and Discord returns the message it made.
    fake.fail("POST", "/messages", status=500, after_effect=True, when=posts_with_an_image)
    async with bot(fake, config) as running:
        interaction = await fake.slash("imagine", {"prompt": "a paper crane", **SMALL})
        job_id = job_id_in((await running.reply_to(interaction))["content"])
        result = await running.result_of(job_id)
        deliveries = await running.core.engine.deliveries.of_job(job_id)
    posts = result_posts(fake, job_id)
    assert [c.status for c in posts] == [500, 200]
    assert posts[0].body["nonce"] == posts[1].body["nonce"] == f"r-{job_id}" and posts[0].body["enforce_nonce"]
    assert images_of(fake, job_id) == [result]
    assert [d.message_id for d in deliveries if d.kind == "result"] == [result["id"]]


async def test_a_503_is_retried_by_the_bot_after_looking_for_the_message_first(fake: FakeDiscord,
                                                                               config: Config) -> None:
    # discord.py does not retry a 503; the bot does. Here the first try did make the message:
    # the bot finds it in the channel before trying again, and records it.
    fake.fail("POST", "/messages", status=503, after_effect=True, when=posts_with_an_image)
    fake.fail("POST", "/messages", status=503, when=posts_with_an_image)  # then one that made nothing
    async with bot(fake, config) as running:
        running.app.outlet.result_retry = FAST_RETRY
        first = job_id_in((await running.reply_to(await fake.slash("imagine", {"prompt": "one", **SMALL})))["content"])
        found = await running.result_of(first)
        second = job_id_in((await running.reply_to(await fake.slash("imagine", {"prompt": "two", **SMALL})))["content"])
        posted = await running.result_of(second)
        recorded = {j: [d.message_id for d in await running.core.engine.deliveries.of_job(j) if d.kind == "result"]
                    for j in (first, second)}
    assert [c.status for c in result_posts(fake, first)] == [503]  # found: not posted again
    assert [c.status for c in result_posts(fake, second)] == [503, 200]
    assert images_of(fake, first) == [found] and images_of(fake, second) == [posted]
    assert recorded == {first: [found["id"]], second: [posted["id"]]}


async def test_discord_down_past_the_retry_bound_gets_a_note_then_the_next_start_posts_it(
        fake: FakeDiscord, config: Config) -> None:
    fake.fail("POST", "/messages", status=503, times=FAST_RETRY.attempts, when=posts_with_an_image)
    async with bot(fake, config) as running:
        running.app.outlet.result_retry = FAST_RETRY
        interaction = await fake.slash("imagine", {"prompt": "a patient heron", **SMALL})
        job_id = job_id_in((await running.reply_to(interaction))["content"])
        await asyncio.wait_for(running.core.delivery.settled(job_id), 60)
        (status,) = [m for m in fake.channel_messages(with_files=False) if not m["webhook"]]
        stored = (await running.core.engine.history.get_job(job_id))
    assert [c.status for c in result_posts(fake, job_id)] == [503] * FAST_RETRY.attempts
    assert status["content"].startswith(f"⚠️ <@{ALICE}> your image is ready, but posting it failed 3 times "
                                        "(Discord answered 503)") and f"`show {job_id}`" in status["content"]
    assert stored is not None and stored.status is JobStatus.SUCCEEDED and stored.image_path is not None

    async with bot(fake, config) as running:  # Discord is back: the catch-up posts it, once
        result = await running.result_of(job_id)
    assert images_of(fake, job_id) == [result] and [c.status for c in result_posts(fake, job_id)][-1] == 200
    assert status.get("deleted")  # the note was the status message: the image replaces it


# -- registering commands -------------------------------------------------------------------------


async def test_sync_commands_registers_the_commands_globally_or_in_one_guild(fake: FakeDiscord, config: Config) -> None:
    settings = settings_for(fake).discord
    names, application_id = await sync_commands(config, settings, None)
    await sync_commands(config, settings, GUILD_ID)
    assert set(names) == {"imagine", "history", "gallery", "show", "preload", "unload", "models", "queue", "stats",
                          "workers", "compare", "sweep", "preset"}
    assert application_id == 900000000000000001
    imagine = next(c for c in fake.commands["global"] if c["name"] == "imagine")
    options = {o["name"]: o for o in imagine["options"]}
    assert options["prompt"]["required"] and options["prompt"]["max_length"] == 1000
    assert (options["steps"]["min_value"], options["steps"]["max_value"]) == (1, 50)
    assert options["width"]["min_value"] == 64
    assert [c["value"] for c in options["model"]["choices"]] == ["auto", "flux_dev", "realvis_xl", "sd3_medium", "logo_sdxl"]
    assert {c["name"] for c in fake.commands[str(GUILD_ID)]} == set(names)
    assert not fake.identified.is_set()  # HTTP only: no gateway session was opened


async def test_sync_commands_cli_prints_the_commands_and_the_invite_url(fake: FakeDiscord, config: Config,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("DISCORD_API_BASE", fake.api_base)
    code = await cmd_sync_commands(config, argparse.Namespace(guild=GUILD_ID))
    out = capsys.readouterr().out
    assert code == 0 and f"registered 12 commands in server {GUILD_ID}: /imagine, /history" in out
    assert ("https://discord.com/oauth2/authorize?client_id=900000000000000001&scope=bot+applications.commands"
            "&permissions=274878008384") in out
    assert list(fake.commands) == [str(GUILD_ID)]


async def test_a_refused_token_stops_run_with_a_sentence_and_no_token_shown(fake: FakeDiscord, config: Config,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(fake)
    settings = settings.model_copy(update={"discord": settings.discord.model_copy(update={"token": "wrong-token"})})
    code = await asyncio.wait_for(serve(config, settings), 60)
    err = capsys.readouterr().err
    assert code == 1 and "discord refused the token" in err and "DISCORD_TOKEN" in err
    assert "wrong-token" not in err and not fake.identified.is_set()


# -- `promptpics run` as a process ----------------------------------------------------------------


def bot_env(tmp_path: Path, tiny_models: Any, **extra: str) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    if not (data / "tiny-models").exists():
        (data / "tiny-models").symlink_to(tiny_models.root.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "SLACK_"))}
    return {**env, "PROMPTPICS_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1", **extra}


def test_run_without_a_token_says_which_variable_to_set(tmp_path: Path, tiny_models: Any) -> None:
    done = subprocess.run([sys.executable, "-m", "bot", "run"], cwd=REPO, env=bot_env(tmp_path, tiny_models),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Set DISCORD_TOKEN" in done.stderr and "`promptpics chat`" in done.stderr and "Traceback" not in done.stderr


async def test_run_serves_discord_from_the_environment_and_stops_cleanly_on_sigterm(fake: FakeDiscord, tmp_path: Path,
                                                                                    tiny_models: Any) -> None:
    env = bot_env(tmp_path, tiny_models, DISCORD_TOKEN=BOT_TOKEN, DISCORD_API_BASE=fake.api_base,
                  DISCORD_GATEWAY_URL=fake.gateway_url)
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "--profile", "tiny", "run", cwd=REPO,
                                                   env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.wait_for(fake.identified.wait(), 60)
        interaction = await fake.slash("imagine", {"prompt": "a kite", "steps": 1, "width": 256, "height": 256})
        ack = (await fake.wait_for(lambda: fake.followups(interaction), 60))[0]
        job_id = job_id_in(ack["content"])
        await fake.wait_for(lambda: [m for m in fake.channel_messages(with_files=True) if job_id in m["content"]], 60)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr and BOT_TOKEN.encode() not in stderr
