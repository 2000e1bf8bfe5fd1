"""The platform-neutral parts: text options, admins, cooldowns, reactions, ETA, messages, settings,
image fitting, and the delivery's throttle. No platform and no model: a fake engine at the seam."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot import messages
from bot.console import ADMINS as CONSOLE_ADMINS
from bot.commands import (
    Actor,
    AdminPolicy,
    Commands,
    ImagineOptions,
    OptionError,
    Reply,
    Submitted,
    parse_imagine_text,
)
from bot.delivery import Delivery
from bot.outlet import MessageGone, MessageRef, Picture, fit_image_blocking
from bot.settings import BotSettings, load_settings, parse_bot_settings, parse_discord_settings
from engine import (
    Config,
    ConfigError,
    EngineError,
    GenerationParams,
    JobFinished,
    JobProgressed,
    JobQueued,
    JobRequest,
    JobResult,
    JobStarted,
    JobStatus,
    Origin,
    QueueEntry,
    QueueMoved,
    QueuePlace,
    RequestError,
    Requester,
    Timings,
)
from engine.config import parse_config
from engine.history import Deliveries, HistoryStore, RoutingFeedback, StoredJob
from tests.conftest import REPO, repo_config_raw

ALICE = Actor("chat", "alice", "Alice")
BOB = Actor("chat", "bob", "Bob")
BOSS = Actor("chat", "boss", "Boss", role_ids=frozenset({"mods"}))
HERE = Origin("chat", "room-1")


@pytest.fixture(scope="module")
def config() -> Config:
    return parse_config(repo_config_raw(), {}, base_dir=REPO)


# -- text options --------------------------------------------------------------------------------


def test_text_options_take_flags_anywhere_and_many_words_after_no() -> None:
    options = parse_imagine_text('a neon fox --steps 4 in the rain --size 512x768 --no blur, text —seed 7 '
                                 '--model realvis_xl --guidance=5.5')
    assert options == ImagineOptions(prompt="a neon fox in the rain", model="realvis_xl", negative="blur, text",
                                     steps=4, guidance=5.5, width=512, height=768, seed=7)
    assert parse_imagine_text('"a cat\'s hat" --width 300') == ImagineOptions("a cat's hat", width=300)
    assert parse_imagine_text("a well-known -- dash") == ImagineOptions("a well-known -- dash")


@pytest.mark.parametrize(("text", "problem"), [
    ("a fox --stepz 4", "`--stepz` is not an option I know."),
    ("a fox --steps", "`--steps` needs a value: --steps N (whole number)."),
    ("a fox --steps four", "`--steps` is 'four', but it must be a whole number."),
    ("a fox --guidance high", "`--guidance` is 'high', but it must be a number."),
    ("a fox --size 512", "`--size` is '512', but it must look like 512x768."),
    ("a fox --seed 1 --seed 2", "`--seed` is given twice."),
])
def test_unreadable_text_options_say_which_and_why(text: str, problem: str) -> None:
    with pytest.raises(OptionError) as caught:
        parse_imagine_text(text)
    assert str(caught.value) == problem


# -- a fake engine at the seam -------------------------------------------------------------------


@dataclass
class FakeHandle:
    id: str
    position: int


@dataclass
class FakeEngine:
    """What Commands and Delivery use of the Engine; submissions are recorded, not run."""

    config: Config
    history: HistoryStore
    submitted: list[JobRequest] = field(default_factory=list)
    statuses: dict[str, JobStatus] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    snapshot: list[QueueEntry] = field(default_factory=list)
    subscribers: list[asyncio.Queue[Any]] = field(default_factory=list)
    switches: list[tuple[str, str, str]] = field(default_factory=list)  # routing feedback: (job, model, user)

    async def submit(self, request: JobRequest) -> FakeHandle:
        if request.steps == 0:
            raise RequestError("steps", 0, "it must be a whole number from 1 to 50")
        self.submitted.append(request)
        return FakeHandle(f"job{len(self.submitted):03d}", len(self.submitted))

    def status(self, job_id: str) -> JobStatus | None:
        return self.statuses.get(job_id)

    async def record_switch(self, job: StoredJob, chosen_model: str, user_key: str) -> bool:
        self.switches.append((job.id, chosen_model, user_key))
        return True

    async def cancel(self, job_id: str) -> bool:
        self.cancelled.append(job_id)
        return True

    def queue_snapshot(self) -> list[QueueEntry]:
        return list(self.snapshot)

    def resident_models(self) -> tuple[()]:
        return ()

    def subscribe(self) -> asyncio.Queue[Any]:
        self.subscribers.append(asyncio.Queue())
        return self.subscribers[-1]

    def unsubscribe(self, q: asyncio.Queue[Any]) -> None:
        self.subscribers.remove(q)

    @property
    def deliveries(self) -> Deliveries:
        return Deliveries(self.history)

    @property
    def feedback(self) -> RoutingFeedback:
        return RoutingFeedback(self.history)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def history(tmp_path: Path) -> Any:
    async with HistoryStore.open(tmp_path / "data") as store:
        yield store


def make_commands(config: Config, history: HistoryStore, clock: Clock | None = None, **bot: Any) -> Commands:
    engine = FakeEngine(config, history)
    admins = {"chat": AdminPolicy(user_ids=frozenset({"root"}), role_ids=frozenset({"mods"}))}
    return Commands(engine, BotSettings(**bot), admins, clock=clock or Clock())  # type: ignore[arg-type]


PARAMS = GenerationParams(prompt="a castle", negative_prompt="fog", model_id="flux_dev", steps=24, guidance=4.5,
                          width=512, height=512, seed=7, route_reason="the default model")


async def stored(history: HistoryStore, requester: Actor = ALICE, params: GenerationParams = PARAMS) -> StoredJob:
    return await history.record_queued(requester=requester.requester, origin=HERE, model_asked=None, params=params,
                                       created_at=time.time())


# -- commands ------------------------------------------------------------------------------------


async def test_cooldown_names_the_wait_and_spares_admins(config: Config, history: HistoryStore) -> None:
    clock = Clock()
    commands = make_commands(config, history, clock, cooldown_s=30)
    assert isinstance(await commands.imagine(ALICE, ImagineOptions("a fox"), HERE), Submitted)
    clock.now += 12
    refused = await commands.imagine(ALICE, ImagineOptions("a fox"), HERE)
    assert refused == Reply("Please wait 18 s before your next image (one image every 30 s per person).", ok=False)
    assert isinstance(await commands.imagine(BOB, ImagineOptions("a fox"), HERE), Submitted)  # per person
    for _ in range(3):
        assert isinstance(await commands.imagine(BOSS, ImagineOptions("a fox"), HERE), Submitted)  # admins: none
    clock.now += 18
    assert isinstance(await commands.imagine(ALICE, ImagineOptions("a fox"), HERE), Submitted)
    assert len(commands.engine.submitted) == 6


async def test_a_refused_request_costs_no_cooldown_and_carries_the_engines_sentence(config: Config,
                                                                                     history: HistoryStore) -> None:
    commands = make_commands(config, history, cooldown_s=30)
    refused = await commands.imagine(ALICE, ImagineOptions("a fox", steps=0), HERE)
    assert refused == Reply("`steps` is 0, but it must be a whole number from 1 to 50", ok=False)
    assert isinstance(await commands.imagine(ALICE, ImagineOptions("a fox"), HERE), Submitted)
    (request,) = commands.engine.submitted
    assert request.requester == Requester("chat", "alice", "Alice") and request.origin == HERE


async def test_adult_images_follow_the_channel_flag_or_the_safety_allow_list(config: Config,
                                                                           history: HistoryStore) -> None:
    allow = config.model_copy(update={"safety": config.safety.model_copy(update={"nsfw_allowed_channels": ("chat:room-9",)})})
    commands = make_commands(allow, history, cooldown_s=0)
    await commands.imagine(ALICE, ImagineOptions("a fox"), HERE)
    await commands.imagine(ALICE, ImagineOptions("a fox"), HERE, adult_channel=True)
    await commands.imagine(ALICE, ImagineOptions("a fox"), Origin("chat", "room-9"))
    assert [r.nsfw_allowed for r in commands.engine.submitted] == [False, True, True]


async def test_admins_are_listed_users_or_holders_of_a_listed_role(config: Config, history: HistoryStore) -> None:
    commands = make_commands(config, history)
    root = Actor("chat", "root")
    assert [commands.is_admin(a) for a in (ALICE, BOSS, root, Actor("other", "root"))] == [False, True, True, False]
    for command in ("queue", "stats", "models"):
        assert await getattr(commands, command)(ALICE) == Reply(f"Sorry, `/{command}` is for the bot's admins.", ok=False)
    assert (await commands.preload(ALICE, "flux_dev")).text == "Sorry, `/preload` is for the bot's admins."


async def test_reactions_regenerate_switch_and_cancel(config: Config, history: HistoryStore) -> None:
    commands = make_commands(config, history, cooldown_s=0)
    job = await stored(history)
    here = Origin("chat", "room-1", message_ref="msg-9")
    assert await commands.react(BOB, job, "👍", here) is None  # not ours
    await commands.react(BOB, job, "🔁", here)
    await commands.react(BOB, job, "📷\ufe0f", here)  # with the variation selector some clients add
    regenerate, switch = commands.engine.submitted
    assert (regenerate.model, regenerate.steps, regenerate.guidance, regenerate.seed) == ("flux_dev", 24, 4.5, None)
    assert (switch.model, switch.steps, switch.guidance, switch.seed) == ("realvis_xl", None, None, 7)
    assert commands.engine.switches == [(job.id, "realvis_xl", "chat:bob")]  # routing feedback, the regenerate is none
    assert all(r.prompt == "a castle" and r.negative_prompt == "fog" and r.width == 512 and r.origin == here
               and r.requester.user_id == "bob" for r in (regenerate, switch))

    commands.engine.statuses[job.id] = JobStatus.RUNNING
    refused = await commands.react(BOB, job, "❌", here)
    assert refused == Reply(f"Only the person who asked for job `{job.id}` or an admin can cancel it.", ok=False)
    assert await commands.react(ALICE, job, "❌", here) == Reply("")
    assert await commands.react(BOSS, job, "❌", here) == Reply("")
    assert commands.engine.cancelled == [job.id, job.id]

    await history.record_cancelled(job.id, finished_at=time.time())
    finished = await history.get_job(job.id)
    commands.engine.statuses.pop(job.id)
    assert await commands.react(ALICE, finished, "❌", here) == Reply("", delete_target=True)
    assert (await commands.react(BOB, finished, "❌", here)).text.endswith("can delete it.")


# -- /show and /history scope (bot/commands/scope.py) ---------------------------------------------

G1_ROOM = Origin("chat", "room-1", server_id="g1")
G1_ADULT = Origin("chat", "room-adult", server_id="g1")
G2_ROOM = Origin("chat", "room-7", server_id="g2")
A_DM = Origin("chat", "dm-alice", server_id="")


async def made(history: HistoryStore, where: Origin, *, adult: bool = False, by: Actor = ALICE) -> StoredJob:
    """A finished job with its PNG, asked by ``by`` in ``where``."""
    job = await history.record_queued(requester=by.requester, origin=where, model_asked=None, params=PARAMS,
                                      created_at=time.time(), nsfw_allowed=adult)
    await history.record_succeeded(job.id, png=b"\x89PNG fake", timings=Timings(), finished_at=time.time())
    done = await history.get_job(job.id)
    assert done is not None and done.image_path is not None
    return done


def sight_of(reply: Reply, job: StoredJob) -> str:
    """What /show let through: "none" (answered like an unknown id), "text" or "full" (with the image)."""
    if reply == Reply(messages.unknown_job(job.id), ok=False):
        return "none"
    assert reply.ok and reply.text.startswith(f"Job `{job.id}`: succeeded")
    if reply.image_path is None:
        assert reply.text.endswith(messages.image_withheld(job.id))  # says why
        return "text"
    assert reply.image_path == str(job.image_path) and "not attached" not in reply.text
    return "full"


SCOPE = [  # asker, where, the channel's own adult flag -> sight of (the SFW job, the adult-allowed job, the DM job)
    (ALICE, G1_ROOM, False, ("full", "text", "full")),  # requester, another channel of the same server
    (ALICE, G1_ADULT, True, ("full", "full", "full")),  # requester in an adult channel: the image comes along
    (ALICE, G2_ROOM, False, ("none", "none", "full")),  # requester, another server: only the DM job
    (ALICE, A_DM, False, ("full", "text", "full")),  # requester in a DM: everything of the platform
    (BOB, G1_ROOM, False, ("full", "none", "none")),  # another user, same server: SFW jobs only
    (BOB, G1_ADULT, True, ("full", "none", "none")),  # ... even in an adult channel
    (BOB, G2_ROOM, False, ("none", "none", "none")),
    (BOB, A_DM, False, ("none", "none", "none")),
    (BOSS, G1_ROOM, False, ("full", "text", "none")),  # an admin: all of the server, images by the channel rule
    (BOSS, G1_ADULT, True, ("full", "full", "none")),
    (BOSS, G2_ROOM, False, ("none", "none", "none")),  # ... but not another server's
    (Actor("other", "alice"), Origin("other", "room-1", server_id="g1"), False, ("none", "none", "none")),
]


@pytest.mark.parametrize(("asker", "where", "adult_channel", "expected"), SCOPE)
async def test_show_answers_by_server_requester_admin_and_adult_channel(
        config: Config, history: HistoryStore, asker: Actor, where: Origin, adult_channel: bool,
        expected: tuple[str, str, str]) -> None:
    commands = make_commands(config, history)
    jobs = [await made(history, G1_ROOM), await made(history, G1_ADULT, adult=True), await made(history, A_DM)]
    seen = [sight_of(await commands.show(asker, job.id, where, adult_channel=adult_channel), job) for job in jobs]
    assert tuple(seen) == expected
    listed = (await commands.history(asker, where, adult_channel=adult_channel)).text
    mine = [s if asker == ALICE else "none" for s in expected]  # /history lists the asker's own jobs only
    assert [f"`{job.id}`" in listed for job in jobs] == [s != "none" for s in mine]


async def test_the_safety_allow_list_makes_a_channel_adult_for_show_too(config: Config, history: HistoryStore) -> None:
    allow = config.model_copy(update={"safety": config.safety.model_copy(update={"nsfw_allowed_channels": ("chat:room-9",)})})
    commands = make_commands(allow, history)
    adult = await made(history, G1_ADULT, adult=True)
    assert sight_of(await commands.show(ALICE, adult.id, Origin("chat", "room-9", server_id="g1")), adult) == "full"
    assert sight_of(await commands.show(ALICE, adult.id, G1_ROOM), adult) == "text"


async def test_another_servers_job_answers_exactly_like_an_unknown_id(config: Config, history: HistoryStore) -> None:
    commands = make_commands(config, history)
    job = await made(history, G1_ROOM)
    hidden = await commands.show(BOB, f" {job.id.upper()} ", G2_ROOM)
    unknown = await commands.show(BOB, "zzzzzz", G2_ROOM)
    assert (hidden, unknown) == (Reply(messages.unknown_job(job.id.upper()), ok=False),
                                 Reply(messages.unknown_job("zzzzzz"), ok=False))
    assert await commands.run_line(BOB, f"/show {job.id}", G2_ROOM) == Reply(messages.unknown_job(job.id), ok=False)
    assert await commands.run_line(BOB, f"/react {job.id} 🔁", G2_ROOM) == Reply(messages.unknown_job(job.id), ok=False)
    assert commands.engine.submitted == []  # no key to another server's prompt either


async def test_history_in_another_server_lists_none_of_that_servers_jobs(config: Config, history: HistoryStore) -> None:
    commands = make_commands(config, history, history_limit=2)
    older = await made(history, G2_ROOM)
    for _ in range(3):  # newer jobs elsewhere do not push g2's out of its /history
        await made(history, G1_ROOM)
    listed = (await commands.history(ALICE, G2_ROOM)).text
    assert listed.startswith("Your recent jobs here:") and f"`{older.id}`" in listed and listed.count("\n") == 1
    assert (await commands.history(BOB, G2_ROOM)).text == "You have no jobs here yet. Try `/imagine`."


async def test_the_terminal_sees_every_servers_jobs(config: Config, history: HistoryStore) -> None:
    engine = FakeEngine(config, history)
    commands = Commands(engine, BotSettings(), {"console": CONSOLE_ADMINS})  # type: ignore[arg-type]
    me, terminal = Actor("console", "me"), Origin("console", "terminal")
    adult = await made(history, G1_ADULT, adult=True)
    assert sight_of(await commands.show(me, adult.id, terminal), adult) == "full"


# -- ETA, errors, text ---------------------------------------------------------------------------


def test_describe_error_shows_a_sentence_never_a_path_and_logs_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert messages.describe_error(RequestError("steps", 0, "it must be a whole number from 1 to 50")) == \
        "`steps` is 0, but it must be a whole number from 1 to 50"
    try:
        open("/secret/path/token.txt")  # noqa: SIM115 - the failure is the point
    except OSError as exc:
        error = exc
    with caplog.at_level(logging.ERROR):
        text = messages.describe_error(error, job_id="k7mq2x")
    assert text == "Sorry, something went wrong (job `k7mq2x`). The admin can find the details in the log."
    assert "/secret" not in text and "Traceback" not in text
    assert "k7mq2x" in caplog.text and caplog.records[-1].exc_info is not None
    anonymous = messages.describe_error(ValueError("x"))
    assert anonymous.startswith("Sorry, something went wrong (`ref ") and "x" not in anonymous.split("`")[2]


def test_fit_text_cuts_at_a_line_and_says_so() -> None:
    text = "\n".join(f"line {i}" for i in range(500))
    cut = messages.fit_text(text, 200)
    assert len(cut) <= 200 and cut.endswith("… (cut to fit)") and "\nline 1\n" in cut
    assert messages.fit_text("short", 200) == "short"


def test_an_image_too_big_for_the_limit_is_reencoded_smaller() -> None:
    rng = random.Random(1)
    image = Image.frombytes("RGB", (256, 256), bytes(rng.randrange(256) for _ in range(256 * 256 * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    png = buffer.getvalue()
    assert fit_image_blocking(png, len(png)) == (png, "png")
    data, ext = fit_image_blocking(png, 20_000)
    assert len(png) > 150_000 and len(data) <= 20_000 and ext in ("webp", "jpg")
    assert Image.open(io.BytesIO(data)).format in ("WEBP", "JPEG")


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("table", "raw", "key", "rule"), [
    ("bot", {"cooldown": 3}, "bot.cooldown", "it is not a known key here"),
    ("bot", {"cooldown_s": -1}, "bot.cooldown_s", "it must be at least 0"),
    ("bot", {"regenerate_emoji": "🎨"}, "bot.regenerate_emoji", "it must differ from every model's emoji"),
    ("discord", {"admin_user_ids": ["alice"]}, "discord.admin_user_ids", "each entry must be a Discord id"),
    ("discord", {"admin_role_ids": "123"}, "discord.admin_role_ids", "it must be a list of Discord ids"),
    ("discord", {"api_base": "discord.com"}, "discord.api_base", "it must be a URL starting with http:// or https://"),
])
def test_bad_bot_settings_name_the_key_value_and_rule(config: Config, table: str, raw: dict[str, Any], key: str,
                                                      rule: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_bot_settings(raw, config) if table == "bot" else parse_discord_settings(raw, {})
    assert caught.value.key == key and rule in caught.value.rule


def test_tokens_come_from_the_environment_and_are_never_shown(config: Config) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_discord_settings({"token": "sekrit-token"}, {})
    assert "sekrit" not in caught.value.user_message and "DISCORD_TOKEN" in caught.value.user_message
    with pytest.raises(ConfigError) as caught:
        parse_discord_settings({}, {"DISCORD_TOKEN": "abc def"})
    assert "abc" not in caught.value.user_message
    env = {"DISCORD_TOKEN": " tok.en \n", "DISCORD_API_BASE": "http://127.0.0.1:9/api/v10/",
           "DISCORD_GATEWAY_URL": "ws://127.0.0.1:9/gw"}
    settings = parse_discord_settings({"admin_user_ids": [123, "456"]}, env)
    assert settings.token == "tok.en" and "tok.en" not in repr(settings)
    assert (settings.api_base, settings.gateway_url) == ("http://127.0.0.1:9/api/v10", "ws://127.0.0.1:9/gw")
    assert settings.admin_user_ids == frozenset({"123", "456"})
    assert load_settings(config, {}).platforms_with_tokens == []


def test_the_shipped_config_toml_has_valid_bot_settings(config: Config) -> None:
    settings = load_settings(config, os.environ | {"DISCORD_TOKEN": "x"})
    assert settings.bot.regenerate_emoji == "🔁" and settings.platforms_with_tokens == ["discord"]


# -- delivery ------------------------------------------------------------------------------------


async def eventually(predicate: Any, timeout: float = 60.0) -> None:
    """Until ``predicate()`` holds; ``timeout`` is a safety net, not a measurement."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the condition never came true"
        await asyncio.sleep(0.01)


@dataclass
class RecordingOutlet:
    platform: str = "chat"
    progress_interval_s: float | None = None
    calls: list[tuple[float, str, str]] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)

    def mention(self, user_id: str) -> str:
        return f"@{user_id}"

    async def post_status(self, job: StoredJob, text: str) -> MessageRef:
        self.calls.append((time.monotonic(), "post", text))
        return MessageRef("room-1", f"status-{len(self.calls)}")

    async def edit_status(self, job: StoredJob, ref: MessageRef, text: str) -> None:
        if ref.message_id in self.gone:
            raise MessageGone(ref.message_id)
        self.calls.append((time.monotonic(), "edit", text))

    async def post_result(self, job: StoredJob, picture: Picture, caption: str, status: MessageRef | None) -> MessageRef:
        self.calls.append((time.monotonic(), "result", caption))
        return MessageRef("room-1", "result-1")

    async def add_reactions(self, job: StoredJob, ref: MessageRef, emojis: Sequence[str]) -> None:
        self.calls.append((time.monotonic(), "react", "".join(emojis)))

    async def retire_status(self, job: StoredJob, ref: MessageRef) -> None:
        self.calls.append((time.monotonic(), "retire", ref.message_id))


async def test_progress_edits_are_throttled_and_the_result_is_linked_to_its_message(config: Config,
                                                                                   history: HistoryStore) -> None:
    interval = 0.25
    commands = make_commands(config, history, progress_interval_s=interval)
    outlet = RecordingOutlet()
    delivery = Delivery(commands)
    delivery.add_outlet(outlet)
    delivery.attach()
    job = await stored(history)
    events = commands.engine.subscribers[0]
    running = asyncio.create_task(delivery.run())
    events.put_nowait(JobQueued(job.id, 1, PARAMS))
    events.put_nowait(JobStarted(job.id, "flux_dev"))
    started = time.monotonic()
    for step in range(1, 41):  # 40 steps over a second or more: a fake model's step time
        events.put_nowait(JobProgressed(job.id, step, 40))
        await asyncio.sleep(0.025)
    # The last step is shown once the throttle allows (trailing edge), before the result.
    await eventually(lambda: any("step 40/40" in text for _, kind, text in outlet.calls if kind == "edit"))
    result = JobResult(job.id, b"png", PARAMS, 512, 512, Timings(0.0, 0.5, 1.0, 1.6), "/x.png")
    events.put_nowait(JobFinished(job.id, result))
    await asyncio.wait_for(delivery.settled(job.id), 10)
    running.cancel()

    kinds = [kind for _, kind, _ in outlet.calls]
    assert kinds[:2] == ["post", "react"] and kinds[-3:] == ["result", "react", "retire"]
    edits = [(t, text) for t, kind, text in outlet.calls if kind == "edit"]
    gaps = [b[0] - a[0] for a, b in zip(edits, edits[1:])]
    assert all(gap >= interval - 0.01 for gap in gaps), gaps  # never more than one edit per interval
    assert 3 <= len(edits) <= (time.monotonic() - started) / interval + 1
    assert "step 40/40" in edits[-1][1]
    assert [(d.kind, d.message_id) for d in await Deliveries(history).of_job(job.id)] == [("status", "status-1"),
                                                                                          ("result", "result-1")]
    assert outlet.calls[-2][2] == "🔁📷🧩🔤❌"  # the other models' emojis, not flux's own 🎨


async def test_a_deleted_status_message_is_posted_again(config: Config, history: HistoryStore) -> None:
    commands = make_commands(config, history, progress_interval_s=0)
    outlet = RecordingOutlet(gone={"status-1"})
    delivery = Delivery(commands)
    delivery.add_outlet(outlet)
    delivery.attach()
    job = await stored(history)
    events = commands.engine.subscribers[0]
    running = asyncio.create_task(delivery.run())
    for event in (JobQueued(job.id, 1, PARAMS), JobStarted(job.id, "flux_dev"),
                  JobFinished(job.id, JobResult(job.id, b"png", PARAMS, 1, 1, Timings(), None))):
        events.put_nowait(event)
    await asyncio.wait_for(delivery.settled(job.id), 10)
    running.cancel()
    assert [kind for _, kind, _ in outlet.calls] == ["post", "react", "post", "react", "result", "react", "retire"]
    assert [d.message_id for d in await Deliveries(history).of_job(job.id) if d.kind == "status"] == ["status-1", "status-3"]


async def test_a_waiting_jobs_status_follows_its_place_in_the_queue(config: Config, history: HistoryStore) -> None:
    commands = make_commands(config, history, progress_interval_s=0)
    outlet = RecordingOutlet()
    delivery = Delivery(commands)
    delivery.add_outlet(outlet)
    delivery.attach()
    first, second = await stored(history), await stored(history)
    engine, events = commands.engine, commands.engine.subscribers[0]
    running = asyncio.create_task(delivery.run())
    events.put_nowait(JobQueued(first.id, 1, PARAMS))
    events.put_nowait(JobQueued(second.id, 2, PARAMS))

    def texts() -> list[str]:
        return [text for _, kind, text in outlet.calls if kind in ("post", "edit") and f"job `{second.id}`" in text]

    await eventually(lambda: texts())
    events.put_nowait(JobStarted(first.id, "flux_dev"))
    events.put_nowait(QueueMoved((QueuePlace(second.id, 1, None),), first.id))  # the engine's one plan
    await eventually(lambda: len(texts()) == 2)
    running.cancel()
    assert texts()[0].startswith("🕒 @alice queued #2")
    assert texts()[1].startswith("🕒 @alice next in line")


def test_queue_reply_shows_the_engines_eta_for_waiting_jobs_only() -> None:
    entries = [QueueEntry("a", 0, "flux_dev", "alice", JobStatus.RUNNING, 1.0, eta_s=4.0),
               QueueEntry("b", 1, "realvis_xl", "bob", JobStatus.QUEUED, 2.0, eta_s=95.0),
               QueueEntry("c", 2, "sd3_medium", "bob", JobStatus.QUEUED, 2.0, eta_s=None)]
    lines = messages.queue_reply(entries).splitlines()
    assert lines[0] == "3 job(s):"
    assert lines[1].startswith("running `a` flux_dev for alice") and "ETA" not in lines[1]
    assert lines[2].startswith("#1 `b` realvis_xl for bob") and lines[2].endswith(f"ETA ~{messages.duration(95.0)}")
    assert "ETA" not in lines[3]  # no recorded timing: no made-up number


def test_engine_errors_keep_their_sentence() -> None:
    assert messages.describe_error(EngineError("The queue is full.")) == "The queue is full."
