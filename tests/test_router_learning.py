"""The router that learns from its community: feedback recorded for each kind, `router learn`
(applied, refused, dry run), learned examples across a restart, the switch-away rate.

Real SQLite files under tmp_path, the real all-MiniLM-L6-v2, the tiny models; every prompt here
was written for these tests (the dev set is read by bench/router_learning.py only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import time
from pathlib import Path
import pytest

from bot.commands import Actor, AdminPolicy, Commands
from bot.settings import BotSettings
from engine import Config, Engine, HistoryStore, JobRequest, Origin, Requester, RoutingFeedback
from engine.history import SCHEMA_VERSION, FeedbackRecord, LearnedExample, LearnRun
from engine.router import CascadeRouter, read_examples
from engine.router.learn import CHECK_STAGES, LearnOptions, learn, learned_router, learned_state
from engine.router.learning import Confirmed, confirmed_examples, merge_examples
from tests.conftest import REPO

HELD_OUT = REPO / "bench" / "router_heldout.jsonl"
IDS = ("flux_dev", "realvis_xl", "sd3_medium", "logo_sdxl")
GAMES = ["minecraft", "fortnite", "valorant", "roblox", "overwatch", "terraria", "halo", "destiny", "warframe",
         "runescape", "rocket league", "hearthstone", "dota", "rust"]
VIDEOS = ["video", "speedrun", "let's play", "montage", "tutorial", "review", "stream highlights"]
STYLES = ["minimalist", "bold", "vintage", "neon", "gritty", "retro", "sleek", "dramatic", "clean"]
ALICE = Actor("discord", "alice", "Alice")
GUILD = Origin("discord", "chan-1", server_id="guild-1")


def thumbnails(n: int, seed: int, avoid: frozenset[str] = frozenset()) -> list[str]:
    """A class the router sends to flux_dev but whose askers want sd3_medium (a layout with a title)."""
    rng, found = random.Random(seed), set[str]()
    while len(found) < n:
        prompt = f"thumbnail for my {rng.choice(GAMES)} {rng.choice(VIDEOS)}, {rng.choice(STYLES)}"
        if prompt not in avoid:
            found.add(prompt)
    return sorted(found)


def offline(config: Config) -> Config:
    """Rules and embeddings only: the tiny LLM has random weights."""
    return config.model_copy(update={"router": config.router.model_copy(update={"stages": CHECK_STAGES})})


async def switches(feedback: RoutingFeedback, prompts: list[str], chosen: str, *, start: int = 0) -> None:
    for i, prompt in enumerate(prompts, start=start):
        assert await feedback.record("switch", prompt=prompt, chosen_model=chosen, router_pick="flux_dev",
                                     from_model="flux_dev", job_id=f"job{i}", user_key=f"discord:{i}")


async def accuracy(router: CascadeRouter, prompts: list[str], expected: str) -> float:
    async with router:
        picks = [(await router.route(p)).model_id for p in prompts]
    return sum(p == expected for p in picks) / len(picks)


def cli(*argv: str) -> argparse.Namespace:
    from bot.cli.router import add_router_commands

    parser = argparse.ArgumentParser(prog="promptpics")
    add_router_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


# -- feedback, each kind ------------------------------------------------------------------------


async def test_feedback_is_recorded_for_a_switch_an_explicit_model_and_a_compare_pick(tiny_config: Config) -> None:
    async with Engine(offline(tiny_config)) as engine:
        commands = Commands(engine, BotSettings(cooldown_s=0), {"discord": AdminPolicy()})
        asked = await engine.submit(JobRequest("a quiet harbor at dawn with mist over the water", steps=1, width=64,
                                               height=64, requester=Requester("discord", "bob"), origin=GUILD))
        explicit = await engine.submit(JobRequest("a red kite over a beach", model="realvis_xl", steps=1, width=64,
                                                  height=64, requester=Requester("discord", "bob"), origin=GUILD))
        job = await engine.history.get_job(asked.id)
        assert job is not None and job.params.model_id == "flux_dev"
        # a switch reaction (🧩: sd3_medium): the switch is recorded, its own --model job is not recorded again
        switched = await commands.react(ALICE, job, "🧩", GUILD)
        assert switched is not None
        assert await engine.record_feedback("compare_pick", "a lighthouse in fog", "logo_sdxl", router_pick="flux_dev",
                                            server_id="guild-1", job_id="cmp1", user_key="discord:alice")
        rows = await engine.feedback.rows()
    by_kind = {r.kind: r for r in rows}
    assert sorted(r.kind for r in rows) == ["compare_pick", "explicit", "switch"]
    s, e, c = by_kind["switch"], by_kind["explicit"], by_kind["compare_pick"]
    assert (s.prompt, s.chosen_model, s.from_model, s.router_pick, s.server_id, s.job_id, s.user_key) == (
        job.params.prompt, "sd3_medium", "flux_dev", "flux_dev", "guild-1", job.id, "discord:alice")
    assert (e.chosen_model, e.router_pick, e.job_id, e.user_key, e.server_id) == (
        "realvis_xl", None, explicit.id, "discord:bob", "guild-1")
    assert (c.prompt, c.chosen_model, c.job_id) == ("a lighthouse in fog", "logo_sdxl", "cmp1")


async def test_eight_concurrent_switch_reactions_on_one_result_count_once_per_user(tiny_config: Config) -> None:
    async with Engine(offline(tiny_config)) as engine:
        commands = Commands(engine, BotSettings(cooldown_s=0), {"discord": AdminPolicy()})
        handle = await engine.submit(JobRequest("a quiet harbor at dawn", steps=1, width=64, height=64, origin=GUILD))
        job = await engine.history.get_job(handle.id)
        assert job is not None
        users = [ALICE] * 8 + [Actor("discord", "carol")]
        outcomes = await asyncio.gather(*(commands.react(u, job, "📷", GUILD) for u in users), return_exceptions=True)
        assert not [o for o in outcomes if isinstance(o, BaseException)]
        rows = await engine.feedback.rows()
    assert sorted(r.user_key for r in rows if r.kind == "switch") == ["discord:alice", "discord:carol"]


async def test_an_unknown_kind_is_refused_with_the_kinds_named(tmp_path: Path) -> None:
    async with HistoryStore.open(tmp_path) as store:
        with pytest.raises(ValueError, match="switch, compare_pick, explicit"):
            await RoutingFeedback(store).record("like", prompt="a cat", chosen_model="flux_dev")
    with sqlite3.connect(tmp_path / "promptpics.sqlite3") as con:
        assert con.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


# -- router learn --------------------------------------------------------------------------------


async def test_learning_a_synthetic_stream_fixes_the_class_and_keeps_the_check_set(tiny_config: Config,
                                                                                  tmp_path: Path) -> None:
    train = thumbnails(24, seed=1)
    fresh = thumbnails(20, seed=2, avoid=frozenset(train))
    check = read_examples(HELD_OUT, tiny_config.models)
    base = offline(tiny_config).router
    async with HistoryStore.open(tmp_path) as store:
        feedback = RoutingFeedback(store)
        await switches(feedback, train[:21], "sd3_medium")
        await switches(feedback, train[21:], "logo_sdxl", start=21)  # a few users disagree
        before = await accuracy(CascadeRouter(tiny_config, base), fresh, "sd3_medium")
        outcome = await learn(tiny_config, feedback, check)
        learned, thresholds = await learned_state(feedback)
        after = await accuracy(learned_router(tiny_config, base, learned, thresholds), fresh, "sd3_medium")
        assert (await feedback.last_learn()) is not None
    assert outcome.applied and outcome.refused is None
    # those the router already sends to the chosen model add nothing
    assert {e.model_id for e in outcome.added} == {"sd3_medium", "logo_sdxl"} and 12 <= len(learned) <= 24
    assert before <= 0.2 and after >= before + 0.3, (before, after)
    assert outcome.check_after["strict_accuracy"] >= outcome.check_before["strict_accuracy"]
    assert set(thresholds) == set(tiny_config.models)


async def test_a_learn_that_lowers_the_check_accuracy_is_refused(tiny_config: Config,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # users "switch" plain landscapes to the text model; the check set says landscapes are flux_dev's
    scenes = [f"a {w} {p} at {t}" for w in ("misty", "quiet", "frozen") for p in ("lake", "valley", "harbor")
              for t in ("dawn", "dusk")]
    check_file = tiny_config.data_dir.parent / "check.jsonl"
    check_file.write_text("\n".join(json.dumps({"prompt": f"a {w} lake at {t}, wide view", "expected": "flux_dev"})
                                    for w in ("calm", "still") for t in ("dawn", "noon")), encoding="utf-8")
    async with HistoryStore.open(tiny_config.data_dir) as store:
        await switches(RoutingFeedback(store), scenes, "logo_sdxl")
    args = cli("router", "learn", "--check", str(check_file))
    assert await args.run(offline(tiny_config), args) == 1
    shown = capsys.readouterr().out
    assert "REFUSED: the check set's strict accuracy would fall from 100.0%" in shown and "not applied" in shown
    async with HistoryStore.open(tiny_config.data_dir) as store:
        feedback = RoutingFeedback(store)
        assert await feedback.learned() == [] and await feedback.last_learn() is None
        refused = await feedback.last_learn(applied_only=False)
    assert refused is not None and not refused.applied and refused.check_after < refused.check_before


async def test_a_dry_run_shows_the_change_and_keeps_everything(tiny_config: Config,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    async with HistoryStore.open(tiny_config.data_dir) as store:
        await switches(RoutingFeedback(store), thumbnails(6, seed=3), "sd3_medium")
    args = cli("router", "learn", "--dry-run", "--json")
    assert await args.run(offline(tiny_config), args) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dry_run"] and not shown["applied"] and len(shown["added"]) == 6
    assert {a["model"] for a in shown["added"]} == {"sd3_medium"} and shown["check"]["after"]["n"] == 80
    async with HistoryStore.open(tiny_config.data_dir) as store:
        assert await RoutingFeedback(store).learned() == []
        assert await RoutingFeedback(store).last_learn(applied_only=False) is None


async def test_learned_examples_persist_across_a_restart(tiny_config: Config,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = offline(tiny_config)
    train = thumbnails(16, seed=4)
    fresh = thumbnails(4, seed=5, avoid=frozenset(train))
    async with HistoryStore.open(config.data_dir) as store:
        await switches(RoutingFeedback(store), train, "sd3_medium")
        outcome = await learn(config, RoutingFeedback(store), read_examples(HELD_OUT, config.models))
    assert outcome.applied
    async with Engine(config) as engine:  # a fresh engine: its router starts with what the learn applied
        await engine.warm_up_router()
        handles = [await engine.submit(JobRequest(p, steps=1, width=64, height=64)) for p in fresh]
        assert [h.params.model_id for h in handles] == ["sd3_medium"] * len(fresh)
        assert all(h.params.route_reason.startswith("like the examples of") for h in handles)
    args = cli("route", fresh[0], "--json", "--stages", "rules,embeddings")  # `route` reads them too
    assert await args.run(config, args) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "sd3_medium"


# -- the switch-away rate ------------------------------------------------------------------------


async def test_stats_show_the_switch_away_rate_before_and_after_the_last_learn(tiny_config: Config,
                                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli.jobs import add_job_commands

    config = offline(tiny_config)
    async with Engine(config) as engine:
        commands = Commands(engine, BotSettings(cooldown_s=0), {"discord": AdminPolicy(user_ids=frozenset({"root"}))})
        first = [await engine.submit(JobRequest(p, model="flux_dev", steps=1, width=64, height=64)) for p in ("a fox", "an owl")]
        for h in first:
            await h.result()
        job = await engine.history.get_job(first[0].id)
        assert job is not None
        await commands.react(ALICE, job, "🧩", GUILD)
        await engine.feedback.save_learn(_applied_learn(), [])
        later = await engine.submit(JobRequest("a heron", model="flux_dev", steps=1, width=64, height=64))
        await later.result()
        rates = {a.model_id: a for a in await engine.feedback.switch_away()}
        reply = await commands.stats(Actor("discord", "root"))  # /stats in the chat says it too
    assert "`flux_dev`: 3 job(s)" in reply.text
    assert "switched away from 1 of 3 results, 33% (50% before the last router learn, 0% after)" in reply.text
    flux = rates["flux_dev"]
    assert (flux.switched, flux.rate_before, flux.rate_after) == (1, 0.5, 0.0)
    parser = argparse.ArgumentParser(prog="promptpics")
    add_job_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["stats", "--json"])
    assert await args.run(config, args) == 0
    rows = {r["model_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["flux_dev"]["switch_away"]["before_learn"] == 0.5


def _applied_learn() -> LearnRun:
    return LearnRun(time.time(), True, 0.9, 0.9, 0, 0, {})


def test_learn_options_default_to_the_documented_rule() -> None:
    options = LearnOptions()
    assert dict(options.weights) == {"switch": 1.0, "compare_pick": 1.0, "explicit": 0.5}
    assert (options.min_weight, options.cap_per_model) == (1.0, 100)


# -- the rule, on its own ------------------------------------------------------------------------


def row(kind: str, prompt: str, model: str, user: str, at: float) -> FeedbackRecord:
    return FeedbackRecord(at, kind, prompt, model, user_key=user, job_id=f"{user}-{at}")


def test_a_users_latest_choice_counts_and_explicit_choices_weigh_half() -> None:
    rows = [
        row("switch", "a fox", "sd3_medium", "u1", 1), row("switch", "A  Fox", "logo_sdxl", "u1", 2),  # u1 changed their mind
        row("explicit", "a heron", "realvis_xl", "u1", 1),  # one explicit choice: 0.5, not enough
        row("explicit", "a crane", "realvis_xl", "u1", 1), row("explicit", "a crane", "realvis_xl", "u2", 2),
        row("switch", "a wolf", "sd3_medium", "u1", 1), row("compare_pick", "a wolf", "logo_sdxl", "u2", 2),  # split
        row("switch", "a bear", "dalle", "u3", 1),  # not a configured model
        row("explicit", "a swan", "flux_dev", "u1", 1), row("explicit", "a swan", "sd3_medium", "u1", 2),  # trying out
        row("explicit", "a swan", "sd3_medium", "u2", 3),
    ]
    confirmed = {c.prompt: (c.model_id, c.weight) for c in confirmed_examples(rows, IDS)}
    assert confirmed == {"a fox": ("logo_sdxl", 1.0), "a crane": ("realvis_xl", 1.0)}


def test_the_learned_set_is_capped_per_model_oldest_out_and_relabelled_in_place() -> None:
    old = [LearnedExample(f"p{i}", "sd3_medium", 1.0, float(i)) for i in range(3)]
    new = [Confirmed("p0", "logo_sdxl", 1.0), Confirmed("p9", "sd3_medium", 2.0), Confirmed("p1", "sd3_medium", 1.0)]
    merged = merge_examples(old, new, now=10.0, cap_per_model=2)
    assert [(e.prompt, e.model_id, e.added_at) for e in merged] == [
        ("p2", "sd3_medium", 2.0), ("p0", "logo_sdxl", 10.0), ("p9", "sd3_medium", 10.0)]
