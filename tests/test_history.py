"""HistoryStore against real SQLite files under tmp_path: lifecycle, restarts, migrations, failures."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from engine import history
from engine.errors import EngineError
from engine.history import (
    SCHEMA_VERSION, Deliveries, DuplicateJobError, HistoryError, HistoryStore, JobFinishedError, SeenKeys,
    StorageError, UnknownJobError, files, schema,
)
from engine.jobs import GenerationParams, JobStatus, Origin, Requester, Timings

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
DAY = 86400.0


def params(prompt: str = "a neon fox in the rain", model_id: str = "flux_dev", **kw: object) -> GenerationParams:
    base: dict[str, object] = dict(prompt=prompt, negative_prompt="blurry", model_id=model_id, steps=24,
                                   guidance=4.5, width=768, height=512, seed=4_294_967_295,
                                   route_reason="general scene")
    base.update(kw)
    return GenerationParams(**base)  # type: ignore[arg-type]


async def queue(store: HistoryStore, prompt: str = "a neon fox", *, model_id: str = "flux_dev",
                user: str = "u1", platform: str = "discord", at: float = T0, job_id: str | None = None):
    return await store.record_queued(
        job_id, requester=Requester(platform, user, f"name-{user}"),
        origin=Origin(platform, "chan-1", "thread-1", "msg-0"), model_asked=None,
        params=params(prompt, model_id), created_at=at)


@pytest_asyncio.fixture
async def store(tmp_path: Path):
    async with HistoryStore.open(tmp_path / "data") as s:
        yield s


def make_v1_file(path: Path) -> None:
    """A file exactly as the version-1 code left it (rollback journal, one job)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.executescript(history.MIGRATIONS[0])
    con.execute("PRAGMA user_version = 1")
    con.execute(
        "INSERT INTO jobs (id, status, created_at, requester_platform, requester_user_id, requester_name,"
        " origin_platform, origin_channel_id, origin_thread_id, origin_message_ref, prompt,"
        " negative_prompt, model_asked, model_used, route_reason, steps, guidance, width, height, seed)"
        " VALUES ('old111', 'queued', ?, 'slack', 'U9', 'Ann', 'slack', 'C1', '', '', 'an old prompt',"
        " '', NULL, 'sd3_medium', 'poster', 30, 6.0, 512, 512, 7)", (T0,))
    con.commit()
    con.close()


# -- round trips ----------------------------------------------------------------------------

AWKWARD = [
    "'); DROP TABLE jobs;--",
    'she said "hi" and it\'s fine',
    "🦊 neon fox 🌧️ with ZWJ 👩‍💻",
    "line one\nline two\r\n\ttabbed",
    "Robert'); DELETE FROM attempts WHERE ('1'='1",
    "nul \x00 inside",
]


@pytest.mark.asyncio
@pytest.mark.parametrize("prompt", AWKWARD)
async def test_awkward_text_round_trips_unchanged_across_a_restart(tmp_path: Path, prompt: str) -> None:
    async with HistoryStore.open(tmp_path) as store:
        job = await store.record_queued(
            requester=Requester("discord", "42", prompt), origin=Origin("discord", "c", "t", prompt),
            model_asked=prompt, params=params(prompt, negative_prompt=prompt, route_reason=prompt),
            created_at=T0)
        n = await store.record_started(job.id, started_at=T0 + 1, model_id="flux_dev", prompt_used=prompt)
        await store.record_attempt_end(job.id, n, outcome="failed", retry_reason=prompt, finished_at=T0 + 2)
        await store.record_failed(job.id, error_kind="GenerationError", error_message=prompt,
                                  timings=Timings(), finished_at=T0 + 3)
    async with HistoryStore.open(tmp_path) as store:
        again = await store.get_job(job.id)
        attempts = await store.attempts(job.id)
        assert len(await store.recent_jobs()) == 1  # the table is still there
    assert again is not None
    assert again.params.prompt == again.params.negative_prompt == again.params.route_reason == prompt
    assert again.requester.display_name == again.origin.message_ref == again.model_asked == prompt
    assert again.error_message == prompt
    assert attempts[0].prompt_used == attempts[0].retry_reason == prompt


@pytest.mark.asyncio
async def test_queued_job_reads_back_whole_and_is_committed_at_once(store: HistoryStore) -> None:
    a = await queue(store, "first")
    b = await queue(store, "second")
    assert b.seq > a.seq
    assert len(a.id) == history.ID_LENGTH and set(a.id) <= set(history.ID_ALPHABET)
    assert a.status is JobStatus.QUEUED and a.attempt_count == 0 and a.image_path is None
    assert a.params == params("first") and a.requester == Requester("discord", "u1", "name-u1")
    assert a.origin == Origin("discord", "chan-1", "thread-1", "msg-0") and a.model_asked is None
    assert await store.get_job(a.id) == a
    # Another connection sees it while the store is still open: it was committed, not buffered.
    other = sqlite3.connect(store.db_path)
    try:
        assert other.execute("SELECT prompt FROM jobs WHERE id = ?", (a.id,)).fetchone() == ("first",)
    finally:
        other.close()


def test_new_job_id_avoids_ambiguous_characters() -> None:
    ids = {history.new_job_id() for _ in range(2000)}
    assert len(ids) > 1990
    assert not set("".join(ids)) & set("0o1l")


@pytest.mark.asyncio
async def test_id_collision_draws_a_fresh_id(store: HistoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr("engine.history.store.new_job_id", lambda: next(drawn))
    first = await queue(store)
    second = await queue(store)
    assert (first.id, second.id) == ("aaaaaa", "bbbbbb")
    with pytest.raises(DuplicateJobError, match="aaaaaa"):
        await queue(store, job_id="aaaaaa")
    with pytest.raises(ValueError, match="job_id"):
        await queue(store, job_id="../escape")


# -- a job's life -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_lifecycle_with_a_rewrite_retry(store: HistoryStore) -> None:
    job = await queue(store, "a portrait")
    n1 = await store.record_started(job.id, started_at=T0 + 5, model_id="realvis_xl", prompt_used="a portrait")
    running = await store.get_job(job.id)
    assert running is not None and running.status is JobStatus.RUNNING and running.started_at == T0 + 5
    await store.record_attempt_end(job.id, n1, outcome="retried", retry_reason="nsfw", finished_at=T0 + 9,
                                   verdicts={"nsfw": {"flagged": True, "score": 0.91},
                                             "black": {"flagged": False, "score": 0.0}})
    n2 = await store.record_started(job.id, started_at=T0 + 10, model_id="realvis_xl",
                                    prompt_used="a tasteful portrait")
    await store.record_attempt_end(job.id, n2, outcome="succeeded", finished_at=T0 + 14,
                                   verdicts={"nsfw": {"flagged": False, "score": 0.02}})
    path = await store.record_succeeded(job.id, png=PNG, timings=Timings(5.0, 1.0, 7.5, 14.0),
                                        finished_at=T0 + 14)

    assert (n1, n2) == (1, 2)
    assert path == store.data_dir / "images" / "2023" / "11" / "14" / f"{job.id}.png"
    assert path.read_bytes() == PNG
    assert [p.name for p in path.parent.iterdir()] == [f"{job.id}.png"]  # no temp file left
    done = await store.get_job(job.id)
    assert done is not None and done.status is JobStatus.SUCCEEDED and done.image_path == path
    assert done.started_at == T0 + 5 and done.finished_at == T0 + 14  # first start kept
    assert done.timings == Timings(5.0, 1.0, 7.5, 14.0) and done.attempt_count == 2
    raw = sqlite3.connect(store.db_path).execute("SELECT image_path FROM jobs").fetchone()[0]
    assert raw == f"images/2023/11/14/{job.id}.png"  # relative in the file
    a1, a2 = await store.attempts(job.id)
    assert (a1.outcome, a1.retry_reason, a1.finished_at) == ("retried", "nsfw", T0 + 9)
    assert a1.verdicts["nsfw"] == {"flagged": True, "score": 0.91}
    assert (a2.outcome, a2.prompt_used) == ("succeeded", "a tasteful portrait")

    with pytest.raises(JobFinishedError, match="succeeded"):
        await store.record_cancelled(job.id, finished_at=T0 + 20)
    with pytest.raises(JobFinishedError):
        await store.record_started(job.id, started_at=T0 + 21, model_id="flux_dev", prompt_used="x")


@pytest.mark.asyncio
async def test_final_records_close_open_attempts(store: HistoryStore) -> None:
    failed, cancelled, waiting = await queue(store), await queue(store), await queue(store)
    await store.record_started(failed.id, started_at=T0, model_id="flux_dev", prompt_used="p")
    await store.record_started(cancelled.id, started_at=T0, model_id="flux_dev", prompt_used="p")
    await store.record_failed(failed.id, error_kind="OutOfMemoryError", error_message="The GPU ran out",
                              timings=Timings(1, 2, 3, 6), finished_at=T0 + 6)
    await store.record_cancelled(cancelled.id, finished_at=T0 + 7)
    await store.record_cancelled(waiting.id, finished_at=T0 + 8)

    f, c, w = [await store.get_job(j.id) for j in (failed, cancelled, waiting)]
    assert f is not None and (f.status, f.error_kind, f.timings.total_s) == (JobStatus.FAILED, "OutOfMemoryError", 6)
    assert c is not None and w is not None and c.status is w.status is JobStatus.CANCELLED
    assert [a.outcome for a in await store.attempts(failed.id)] == ["failed"]
    assert [(a.outcome, a.finished_at) for a in await store.attempts(cancelled.id)] == [("interrupted", T0 + 7)]
    assert await store.queue() == []


@pytest.mark.asyncio
async def test_unknown_jobs_and_attempts_are_named(store: HistoryStore) -> None:
    with pytest.raises(UnknownJobError, match="`nope22`"):
        await store.record_started("nope22", started_at=T0, model_id="flux_dev", prompt_used="p")
    job = await queue(store)
    with pytest.raises(UnknownJobError, match="Attempt 3"):
        await store.record_attempt_end(job.id, 3, outcome="failed", finished_at=T0)
    with pytest.raises(ValueError, match="outcome 'exploded'"):
        await store.record_attempt_end(job.id, 1, outcome="exploded", finished_at=T0)
    with pytest.raises(UnknownJobError):
        await store.record_succeeded("nope22", png=PNG, timings=Timings(), finished_at=T0)
    assert not (store.data_dir / "images").exists()  # nothing written for an unknown job
    assert await store.get_job("nope22") is None


@pytest.mark.asyncio
async def test_update_params_records_the_fallback_model(store: HistoryStore) -> None:
    job = await queue(store, "a logo", model_id="logo_sdxl")
    await store.update_params(job.id, params("a logo", "flux_dev", steps=28, route_reason="fallback"))
    again = await store.get_job(job.id)
    assert again is not None and again.params.model_id == "flux_dev" and again.params.steps == 28
    assert again.params.route_reason == "fallback" and again.seq == job.seq
    with pytest.raises(UnknownJobError):
        await store.update_params("nope22", params())


@pytest.mark.asyncio
async def test_verdict_objects_with_flagged_and_score_are_accepted(store: HistoryStore) -> None:
    @dataclass
    class Verdict:
        flagged: bool
        score: float

    job = await queue(store)
    n = await store.record_started(job.id, started_at=T0, model_id="flux_dev", prompt_used="p")
    await store.record_attempt_end(job.id, n, outcome="retried", finished_at=T0,
                                   verdicts={"black": Verdict(True, float("nan")), "nsfw": Verdict(False, 0.25)})
    (attempt,) = await store.attempts(job.id)
    assert attempt.verdicts == {"black": {"flagged": True, "score": None},
                                "nsfw": {"flagged": False, "score": 0.25}}


# -- restarts ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_requeue_interrupted_keeps_arrival_order_and_marks_attempts(tmp_path: Path) -> None:
    async with HistoryStore.open(tmp_path) as store:
        running, waiting, done, later = [await queue(store, f"job {i}") for i in range(4)]
        await store.record_started(running.id, started_at=T0, model_id="flux_dev", prompt_used="job 0")
        await store.record_started(done.id, started_at=T0, model_id="flux_dev", prompt_used="job 2")
        await store.record_succeeded(done.id, png=PNG, timings=Timings(), finished_at=T0 + 1)
    # The process died with `running` on the GPU; a new one opens the same file.
    async with HistoryStore.open(tmp_path) as store:
        assert [j.id for j in await store.unfinished_jobs()] == [running.id, waiting.id, later.id]
        back = await store.requeue_interrupted()
        assert [j.id for j in back] == [running.id, waiting.id, later.id]
        assert all(j.status is JobStatus.QUEUED for j in back)
        (old,) = await store.attempts(running.id)
        assert old.outcome == "interrupted" and old.finished_at is None
        assert await store.record_started(running.id, started_at=T0 + 60, model_id="flux_dev",
                                          prompt_used="job 0") == 2
        assert [a.outcome for a in await store.attempts(running.id)] == ["interrupted", None]
        assert [a.outcome for a in await store.attempts(done.id)] == ["succeeded"]


@pytest.mark.asyncio
async def test_deliveries_map_messages_back_to_jobs_after_a_restart(tmp_path: Path) -> None:
    async with HistoryStore.open(tmp_path) as store:
        job, other = await queue(store), await queue(store)
        deliveries = Deliveries(store)
        await deliveries.record(job.id, platform="discord", channel_id="c1", message_id="m1",
                                kind="status", created_at=T0)
        await deliveries.record(job.id, platform="discord", channel_id="c1", message_id="m2",
                                kind="result", created_at=T0 + 1)
        await deliveries.record(other.id, platform="slack", channel_id="c1", message_id="m1",
                                kind="result", created_at=T0 + 2)
        with pytest.raises(UnknownJobError):
            await deliveries.record("nope22", platform="discord", channel_id="c1", message_id="m9",
                                    kind="status")
        with pytest.raises(ValueError, match="kind"):
            await deliveries.record(job.id, platform="discord", channel_id="c1", message_id="m9",
                                    kind="preview")
    async with HistoryStore.open(tmp_path) as store:
        deliveries = Deliveries(store)
        for message_id in ("m1", "m2"):
            found = await deliveries.job_by_message(platform="discord", channel_id="c1", message_id=message_id)
            assert found is not None and found.id == job.id
        slack = await deliveries.job_by_message(platform="slack", channel_id="c1", message_id="m1")
        assert slack is not None and slack.id == other.id
        assert await deliveries.job_by_message(platform="discord", channel_id="c2", message_id="m1") is None
        assert [(d.message_id, d.kind) for d in await deliveries.of_job(job.id)] == [("m1", "status"),
                                                                                    ("m2", "result")]
        # The same message edited to show another job: the last record wins.
        await deliveries.record(other.id, platform="discord", channel_id="c1", message_id="m1",
                                kind="result")
        moved = await deliveries.job_by_message(platform="discord", channel_id="c1", message_id="m1")
        assert moved is not None and moved.id == other.id


@pytest.mark.asyncio
async def test_a_seen_key_is_new_once_then_seen_until_its_ttl_passes_restarts_included(tmp_path: Path) -> None:
    async with HistoryStore.open(tmp_path) as store:
        seen = SeenKeys(store)
        assert await seen.seen_before("slack:event:Ev1", 60, now=T0) is False
        assert await seen.seen_before("slack:event:Ev1", 60, now=T0 + 1) is True
        assert await seen.seen_before("slack:event:Ev2", 600, now=T0 + 1) is False
        with pytest.raises(ValueError, match="ttl_s"):
            await seen.seen_before("slack:event:Ev3", 0)
    async with HistoryStore.open(tmp_path) as store:  # a restart
        seen = SeenKeys(store)
        assert await seen.seen_before("slack:event:Ev1", 60, now=T0 + 59) is True
        assert await seen.seen_before("slack:event:Ev1", 60, now=T0 + 61) is False  # forgotten: new again
        assert await seen.seen_before("slack:event:Ev2", 600, now=T0 + 61) is True  # each key keeps its own TTL
        assert [r["key"] for r in await store._rows("SELECT key FROM seen_keys ORDER BY key")] == [
            "slack:event:Ev1", "slack:event:Ev2"]


@pytest.mark.asyncio
async def test_eight_concurrent_callers_with_one_key_see_it_new_exactly_once(tmp_path: Path) -> None:
    # Four on each of two connections to one file (two processes would look the same to SQLite).
    async with HistoryStore.open(tmp_path) as one, HistoryStore.open(tmp_path) as two:
        answers = await asyncio.gather(*(SeenKeys(store).seen_before("slack:command:7.trigger", 3600)
                                         for store in (one, two) * 4))
    assert sorted(answers) == [False] + [True] * 7


@pytest.mark.asyncio
async def test_a_version_2_file_gains_seen_keys_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "promptpics.sqlite3"
    with sqlite3.connect(path) as con:
        for v, script in enumerate(schema.MIGRATIONS[:2]):
            con.executescript(script)
            con.execute(f"PRAGMA user_version = {v + 1}")
    async with HistoryStore.open(tmp_path) as store:
        job = await queue(store)
        assert await SeenKeys(store).seen_before("k", 1.0) is False
        assert (await store.get_job(job.id)) is not None
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


@pytest.mark.asyncio
async def test_recent_jobs_newest_first_with_filters(store: HistoryStore) -> None:
    ids = [(await queue(store, user=u, platform=p)).id
           for u, p in [("a", "discord"), ("b", "discord"), ("a", "slack"), ("a", "discord")]]
    assert [j.id for j in await store.recent_jobs()] == ids[::-1]
    assert [j.id for j in await store.recent_jobs(user_id="a", platform="discord")] == [ids[3], ids[0]]
    assert [j.id for j in await store.recent_jobs(platform="slack")] == [ids[2]]
    assert [j.id for j in await store.recent_jobs(limit=2)] == [ids[3], ids[2]]
    with pytest.raises(ValueError, match="limit"):
        await store.recent_jobs(limit=0)


@pytest.mark.asyncio
async def test_open_is_awaitable_and_a_closed_store_says_so(tmp_path: Path) -> None:
    store = await HistoryStore.open(tmp_path)
    job = await queue(store)
    await store.close()
    await store.close()  # twice is fine
    with pytest.raises(HistoryError, match="closed"):
        await store.get_job(job.id)
    async with await HistoryStore.open(tmp_path) as again:
        assert (await again.get_job(job.id)) == job
        assert again.db_path.read_bytes()[:16] == b"SQLite format 3\x00"
        con = sqlite3.connect(again.db_path)
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert con.execute("PRAGMA application_id").fetchone() == (history.APPLICATION_ID,)
        con.close()


# -- schema versions --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_version_1_file_opens_with_its_data(tmp_path: Path) -> None:
    make_v1_file(tmp_path / "promptpics.sqlite3")
    async with HistoryStore.open(tmp_path) as store:
        old = await store.get_job("old111")
        assert old is not None and old.params.prompt == "an old prompt" and old.params.model_id == "sd3_medium"
        await queue(store)
    con = sqlite3.connect(tmp_path / "promptpics.sqlite3")
    assert con.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    con.close()


ORIGIN_SERVER_VERSION = 3  # the schema version that added jobs.origin_server_id


@pytest.mark.asyncio
async def test_a_version_2_file_opens_and_its_old_jobs_have_no_server(tmp_path: Path) -> None:
    db = tmp_path / "promptpics.sqlite3"
    make_v1_file(db)
    con = sqlite3.connect(db)  # version 1 -> 2 as the version-2 code did it
    con.executescript(history.MIGRATIONS[1])
    con.execute("PRAGMA user_version = 2")
    con.commit()
    con.close()
    async with HistoryStore.open(tmp_path) as store:
        old = await store.get_job("old111")
        new = await store.record_queued(requester=Requester("discord", "42"), origin=Origin("discord", "c", server_id="g1"),
                                        model_asked=None, params=params("new"), created_at=T0)
        assert old is not None and old.origin == Origin("slack", "C1", "", "", "")
        assert (await store.get_job(new.id)).origin.server_id == "g1"  # type: ignore[union-attr]
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert con.execute("SELECT id, origin_server_id FROM jobs ORDER BY seq").fetchall() == [("old111", ""), (new.id, "g1")]
    con.close()


def test_origin_server_id_is_added_by_migration_3() -> None:
    added = [v + 1 for v, script in enumerate(history.MIGRATIONS) if "origin_server_id" in script]
    assert added == [ORIGIN_SERVER_VERSION] and SCHEMA_VERSION >= ORIGIN_SERVER_VERSION


@pytest.mark.asyncio
async def test_recent_jobs_of_a_server_keep_the_jobs_asked_in_no_server(store: HistoryStore) -> None:
    asked = {}
    for server in ("g1", "g2", ""):
        job = await store.record_queued(requester=Requester("discord", "42"), origin=Origin("discord", "c", server_id=server),
                                        model_asked=None, params=params(server or "none"), created_at=T0)
        asked[server] = job.id
    in_g1 = await store.recent_jobs(platform="discord", server_id="g1")
    everywhere = await store.recent_jobs(platform="discord")
    assert [j.id for j in in_g1] == [asked[""], asked["g1"]]
    assert len(everywhere) == 3


@pytest.mark.asyncio
async def test_migrations_run_forward_and_keep_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_v1_file(tmp_path / "promptpics.sqlite3")
    v2 = "ALTER TABLE jobs ADD COLUMN upscaled INTEGER NOT NULL DEFAULT 0;"
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, v2])
    async with HistoryStore.open(tmp_path) as store:
        old = await store.get_job("old111")
        assert old is not None and old.requester == Requester("slack", "U9", "Ann")
    con = sqlite3.connect(tmp_path / "promptpics.sqlite3")
    assert con.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
    assert con.execute("SELECT upscaled FROM jobs WHERE id = 'old111'").fetchone() == (0,)
    con.close()


@pytest.mark.asyncio
async def test_a_failing_migration_leaves_the_file_at_its_version(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "promptpics.sqlite3"
    make_v1_file(db)
    broken = "ALTER TABLE jobs ADD COLUMN upscaled INTEGER; CREATE TABLE jobs (x);"
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, broken])
    with pytest.raises(HistoryError, match=f"from schema version {SCHEMA_VERSION} to {SCHEMA_VERSION + 1} failed"):
        await HistoryStore.open(tmp_path)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)  # the good ones stay
    columns = [r[1] for r in con.execute("PRAGMA table_info(jobs)")]
    assert "upscaled" not in columns  # the first statement was rolled back too
    assert con.execute("SELECT id FROM jobs").fetchall() == [("old111",)]
    con.close()


@pytest.mark.asyncio
async def test_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    async with HistoryStore.open(tmp_path) as store:
        await queue(store)
    db = tmp_path / "promptpics.sqlite3"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    before = db.read_bytes()
    with pytest.raises(HistoryError) as caught:
        await HistoryStore.open(tmp_path)
    message = caught.value.user_message
    assert f"schema version {SCHEMA_VERSION + 1}" in message and f"version {SCHEMA_VERSION} " in message
    assert str(tmp_path) not in message  # the path is for the log, not the chat
    assert db.read_bytes() == before


@pytest.mark.asyncio
async def test_a_corrupt_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    db = tmp_path / "promptpics.sqlite3"
    db.write_bytes(random.Random(7).randbytes(8192))
    before = db.read_bytes()
    with pytest.raises(HistoryError, match="not a readable SQLite database"):
        await HistoryStore.open(tmp_path)
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["promptpics.sqlite3"]


@pytest.mark.asyncio
async def test_another_applications_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "promptpics.sqlite3"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE notes (body TEXT)")
    con.commit()
    con.close()
    before = db.read_bytes()
    with pytest.raises(HistoryError, match="no PromptPics schema version"):
        await HistoryStore.open(tmp_path)
    assert db.read_bytes() == before


# -- locks and full disks ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_file_locked_at_open_gives_history_error_after_the_bounded_wait(tmp_path: Path) -> None:
    db = tmp_path / "promptpics.sqlite3"
    make_v1_file(db)  # rollback-journal mode: an exclusive lock keeps readers out too
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(HistoryError, match="locked by another process for more than 0.2 s"):
            await HistoryStore.open(tmp_path, busy_timeout_s=0.2)
        assert 0.15 <= time.monotonic() - started < 30.0  # waited, then gave up (a loaded machine is slow)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.asyncio
async def test_a_write_while_locked_gives_history_error_and_the_store_recovers(tmp_path: Path) -> None:
    async with HistoryStore.open(tmp_path, busy_timeout_s=0.2) as store:
        holder = sqlite3.connect(store.db_path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            started = time.monotonic()
            with pytest.raises(HistoryError, match="second PromptPics"):
                await queue(store)
            assert 0.15 <= time.monotonic() - started < 30.0  # waited, then gave up (a loaded machine is slow)
            assert await store.queue() == []  # WAL: reading still works meanwhile
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        job = await queue(store)
        assert [j.id for j in await store.queue()] == [job.id]


@pytest.mark.asyncio
async def test_disk_full_while_saving_the_image_raises_storage_error(store: HistoryStore,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    job = await queue(store)
    await store.record_started(job.id, started_at=T0, model_id="flux_dev", prompt_used="p")

    def full_disk(path: Path, data: bytes) -> None:
        path.write_bytes(data[:10])  # a partial temp file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "_write_and_sync", full_disk)
    with pytest.raises(StorageError) as caught:
        await store.record_succeeded(job.id, png=PNG, timings=Timings(), finished_at=T0 + 1)
    assert isinstance(caught.value, EngineError)
    assert "disk full?" in caught.value.user_message and job.id in caught.value.user_message
    assert "/" not in caught.value.user_message.replace("disk full?", "")
    assert "No space left" in caught.value.reason
    assert [p for p in (store.data_dir / "images").rglob("*") if p.is_file()] == []  # temp removed
    still = await store.get_job(job.id)
    assert still is not None and still.status is JobStatus.RUNNING and still.image_path is None

    monkeypatch.undo()  # space freed: the same job can still finish
    path = await store.record_succeeded(job.id, png=PNG, timings=Timings(), finished_at=T0 + 2)
    assert path.read_bytes() == PNG


# -- statistics and retention -----------------------------------------------------------------


async def run_job(store: HistoryStore, model_id: str, generate_s: float, *, fail: bool = False,
                  verdicts: list[dict[str, Any] | None] | None = None,
                  retry_reasons: list[str | None] | None = None) -> str:
    """A job with one attempt per verdict; every attempt but the last is 'retried'."""
    job = await queue(store, model_id=model_id)
    verdicts = verdicts or [None]
    reasons = retry_reasons or [None] * len(verdicts)
    for i, (verdict, reason) in enumerate(zip(verdicts, reasons)):
        n = await store.record_started(job.id, started_at=T0, model_id=model_id, prompt_used="p")
        last = i == len(verdicts) - 1
        outcome = ("failed" if fail else "succeeded") if last else "retried"
        await store.record_attempt_end(job.id, n, outcome=outcome, verdicts=verdict, retry_reason=reason,
                                       finished_at=T0 + 1)
    timings = Timings(0.5, 1.0, generate_s, generate_s + 1.5)
    if fail:
        await store.record_failed(job.id, error_kind="GenerationError", error_message="x", timings=timings,
                                  finished_at=T0 + 2)
    else:
        await store.record_succeeded(job.id, png=PNG, timings=timings, finished_at=T0 + 2)
    return job.id


@pytest.mark.asyncio
async def test_model_stats_on_known_numbers(store: HistoryStore) -> None:
    for seconds in (10.0, 1.0, 4.0, 2.0, 3.0):
        await run_job(store, "flux_dev", seconds)
    await run_job(store, "flux_dev", 99.0, fail=True)  # failures do not count in the times
    await queue(store, model_id="flux_dev")  # still waiting: counted, nothing else
    flagged = {"nsfw": {"flagged": True, "score": 0.9}, "black": {"flagged": False, "score": 0.0}}
    clean = {"nsfw": {"flagged": False, "score": 0.1}, "black": {"flagged": False, "score": 0.0}}
    await run_job(store, "realvis_xl", 6.0, verdicts=[flagged, clean], retry_reasons=["nsfw", None])
    black = {"black": {"flagged": True, "score": 1.0}}
    await run_job(store, "logo_sdxl", 8.0, fail=True, verdicts=[black, black], retry_reasons=["black", None])

    stats = {s.model_id: s for s in await store.model_stats()}
    assert list(stats) == ["flux_dev", "logo_sdxl", "realvis_xl"]
    flux = stats["flux_dev"]
    assert (flux.count, flux.succeeded, flux.failed) == (7, 5, 1)
    assert flux.mean_generate_s == pytest.approx(4.0)
    assert flux.p95_generate_s == pytest.approx(8.8)  # sorted 1,2,3,4,10: rank 3.8 -> 4 + 0.8 * 6
    assert (flux.nsfw_flagged, flux.black_flagged, flux.fixed_by_rewrite) == (0, 0, 0)
    real = stats["realvis_xl"]
    assert (real.count, real.succeeded, real.nsfw_flagged, real.fixed_by_rewrite) == (1, 1, 1, 1)
    assert real.mean_generate_s == real.p95_generate_s == pytest.approx(6.0)
    logo = stats["logo_sdxl"]
    assert (logo.failed, logo.black_flagged, logo.fixed_by_rewrite) == (1, 2, 0)  # retried, not fixed
    assert logo.mean_generate_s is None and logo.p95_generate_s is None


@pytest.mark.asyncio
async def test_prune_images_deletes_old_files_and_keeps_rows(store: HistoryStore) -> None:
    now = T0 + 30 * DAY
    old_id = await run_job(store, "flux_dev", 1.0)  # finished at T0 + 2: 30 days ago
    new = await queue(store)
    await store.record_started(new.id, started_at=now - DAY, model_id="flux_dev", prompt_used="p")
    new_path = await store.record_succeeded(new.id, png=PNG, timings=Timings(), finished_at=now - DAY)
    old_path = (await store.get_job(old_id)).image_path  # type: ignore[union-attr]
    assert old_path is not None and old_path.exists()

    assert await store.prune_images(7, now=now) == 1
    old = await store.get_job(old_id)
    assert old is not None and old.image_path is None and old.status is JobStatus.SUCCEEDED
    assert not old_path.exists() and not old_path.parent.exists()  # the empty day folder went too
    assert new_path.exists() and (await store.get_job(new.id)).image_path == new_path  # type: ignore[union-attr]
    assert await store.prune_images(7, now=now) == 0
    assert await store.prune_images(0, now=now) == 1
    assert not new_path.exists()
    with pytest.raises(ValueError, match="older_than_days"):
        await store.prune_images(-1)


@pytest.mark.asyncio
async def test_concurrent_writers_on_one_store_do_not_interleave(store: HistoryStore) -> None:
    jobs = await asyncio.gather(*(queue(store, f"p{i}") for i in range(20)))
    assert sorted(j.seq for j in jobs) == [j.seq for j in await store.queue()]
    assert len({j.id for j in jobs}) == 20
