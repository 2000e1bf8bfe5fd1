"""HistoryStore under a real server's load: cancellation at every await of a write, and nsfw_allowed kept.

aiosqlite runs each statement on its own thread, so cancelling the coroutine that awaits one does
not stop it. ``CancelAt`` cancels the task at its k-th suspension, with whatever it awaited (a
statement, the store's lock, a thread) already under way; each write is tried for k = 0, 1, 2, ...
until it runs to its end without meeting the cancel. After each try the write happened whole or
not at all, the connection is out of any transaction, and the next write works.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from engine import history
from engine.history import SCHEMA_VERSION, Deliveries, HistoryStore
from engine.history.database import to_the_end
from engine.jobs import GenerationParams, JobStatus, Origin, Requester, Timings

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
T0 = 1_700_000_000.0


class CancelAt:
    """Await ``coro``, cancelling the task that runs it at its suspensions k .. k + times - 1 (0-based).

    ``when="in_flight"`` asks for the cancel as the coroutine yields, so what it awaited is still
    running; ``when="done"`` asks once that has finished, so its result is lost on the way back.
    """

    def __init__(self, coro: Coroutine[Any, Any, Any], k: int, *, times: int = 1, when: str = "in_flight") -> None:
        self.coro, self.k, self.times, self.when = coro, k, times, when
        self.suspensions = 0
        self.cancels = 0

    def __await__(self) -> Generator[Any, Any, Any]:
        inner = self.coro.__await__()
        send: Any = None
        throw: BaseException | None = None
        while True:
            try:
                yielded = inner.send(send) if throw is None else inner.throw(throw)
            except StopIteration as stop:
                return stop.value
            if self.k <= self.suspensions < self.k + self.times:
                self._cancel(yielded)
            self.suspensions += 1
            try:
                send, throw = (yield yielded), None
            except BaseException as exc:  # what the task throws in (the cancel) goes on inward
                send, throw = None, exc

    def _cancel(self, yielded: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.cancels += 1
        if self.when == "done" and isinstance(yielded, asyncio.Future) and self.suspensions == self.k:
            # Added before the task's own wake-up callback: the cancel lands after the result.
            yielded.add_done_callback(lambda _: task.cancel())
        else:
            task.cancel()


async def run_cancelled_at(make: Callable[[], Coroutine[Any, Any, Any]], k: int, *, times: int,
                           when: str) -> tuple[CancelAt, asyncio.Task[Any]]:
    wrapper = CancelAt(make(), k, times=times, when=when)

    async def body() -> Any:
        return await wrapper

    task = asyncio.create_task(body())
    await asyncio.wait([task])
    return wrapper, task


def params(prompt: str = "a neon fox in the rain") -> GenerationParams:
    return GenerationParams(prompt=prompt, negative_prompt="", model_id="flux_dev", steps=24, guidance=4.5,
                            width=512, height=512, seed=7, route_reason="general scene")


async def queue(store: HistoryStore, prompt: str = "a neon fox", *, nsfw_allowed: bool | None = None,
                job_id: str | None = None) -> Any:
    extra = {} if nsfw_allowed is None else {"nsfw_allowed": nsfw_allowed}
    return await store.record_queued(job_id, requester=Requester("discord", "u1", "Ann"),
                                     origin=Origin("discord", "c1", "", "m1"), model_asked=None,
                                     params=params(prompt), created_at=T0, **extra)


@pytest_asyncio.fixture
async def store(tmp_path: Path):
    async with HistoryStore.open(tmp_path / "data", busy_timeout_s=2.0) as s:
        yield s


def assert_settled(store: HistoryStore) -> None:
    db = store._db
    assert db is not None
    assert not db.in_transaction
    assert not store._lock.locked()


def image_files(store: HistoryStore) -> list[Path]:
    root = store.data_dir / history.IMAGES_DIR
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# -- one write per operation, each checked for "whole or nothing" ----------------------------


class Op:
    """A write to cancel: ``prepare`` sets up a fresh job, ``check`` says whether the write happened."""

    name = ""

    async def prepare(self, store: HistoryStore, i: int) -> str:
        return (await queue(store, f"{self.name} {i}")).id

    def write(self, store: HistoryStore, job_id: str) -> Coroutine[Any, Any, Any]:
        raise NotImplementedError

    async def check(self, store: HistoryStore, job_id: str) -> bool:
        raise NotImplementedError


class Queued(Op):
    name = "queued"

    async def prepare(self, store: HistoryStore, i: int) -> str:
        return f"q{i}"

    def write(self, store: HistoryStore, job_id: str) -> Coroutine[Any, Any, Any]:
        return queue(store, "queued", job_id=job_id, nsfw_allowed=True)

    async def check(self, store: HistoryStore, job_id: str) -> bool:
        job = await store.get_job(job_id)
        assert job is None or (job.status is JobStatus.QUEUED and job.nsfw_allowed)
        return job is not None


class Started(Op):
    name = "started"

    def write(self, store: HistoryStore, job_id: str) -> Coroutine[Any, Any, Any]:
        return store.record_started(job_id, started_at=T0 + 1, model_id="flux_dev", prompt_used="p")

    async def check(self, store: HistoryStore, job_id: str) -> bool:
        job, attempts = await store.get_job(job_id), await store.attempts(job_id)
        assert job is not None
        state = (job.status, job.attempt_count, job.started_at, len(attempts))
        assert state in ((JobStatus.QUEUED, 0, None, 0), (JobStatus.RUNNING, 1, T0 + 1, 1))
        return job.status is JobStatus.RUNNING


class Succeeded(Op):
    name = "succeeded"

    async def prepare(self, store: HistoryStore, i: int) -> str:
        job_id = await super().prepare(store, i)
        await store.record_started(job_id, started_at=T0 + 1, model_id="flux_dev", prompt_used="p")
        return job_id

    def write(self, store: HistoryStore, job_id: str) -> Coroutine[Any, Any, Any]:
        return store.record_succeeded(job_id, png=PNG, timings=Timings(1, 2, 3, 6), finished_at=T0 + 9)

    async def check(self, store: HistoryStore, job_id: str) -> bool:
        job, attempts = await store.get_job(job_id), await store.attempts(job_id)
        assert job is not None
        mine = [p for p in image_files(store) if job_id in p.name]  # temp files carry the id too
        if job.status is JobStatus.SUCCEEDED:
            assert job.image_path is not None and mine == [job.image_path]
            assert job.image_path.read_bytes() == PNG and attempts[0].outcome == "succeeded"
            assert job.timings == Timings(1, 2, 3, 6)
            return True
        assert job.status is JobStatus.RUNNING and job.image_path is None
        assert mine == [], "an image was left behind for a job that did not succeed"
        assert attempts[0].outcome is None and job.timings == Timings()
        return False


class Requeued(Succeeded):  # prepared the same way: a RUNNING job with an open attempt
    name = "requeued"

    def write(self, store: HistoryStore, job_id: str) -> Coroutine[Any, Any, Any]:
        return store.requeue_interrupted()

    async def check(self, store: HistoryStore, job_id: str) -> bool:
        job, attempts = await store.get_job(job_id), await store.attempts(job_id)
        assert job is not None
        state = (job.status, attempts[0].outcome)
        assert state in ((JobStatus.RUNNING, None), (JobStatus.QUEUED, "interrupted"))
        return job.status is JobStatus.QUEUED


class Delivered(Op):
    name = "delivered"

    def write(self, store: HistoryStore, job_id: str) -> Coroutine[Any, Any, Any]:
        return Deliveries(store).record(job_id, platform="discord", channel_id="c1", message_id=f"m-{job_id}",
                                        kind="result", created_at=T0)

    async def check(self, store: HistoryStore, job_id: str) -> bool:
        found = await Deliveries(store).job_by_message(platform="discord", channel_id="c1", message_id=f"m-{job_id}")
        assert found is None or found.id == job_id
        return found is not None


OPS = [Queued(), Started(), Succeeded(), Requeued(), Delivered()]
WAYS = [("in_flight", 1), ("done", 1), ("in_flight", 3)]


@pytest.mark.asyncio
@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
@pytest.mark.parametrize(("when", "times"), WAYS, ids=[f"{w}x{t}" for w, t in WAYS])
async def test_a_write_cancelled_at_any_await_is_whole_or_absent_and_the_next_write_works(
        store: HistoryStore, op: Op, when: str, times: int) -> None:
    happened = set()
    k = 0
    while True:
        job_id = await op.prepare(store, k)
        wrapper, task = await run_cancelled_at(lambda: op.write(store, job_id), k, times=times, when=when)
        assert_settled(store)
        done = await op.check(store, job_id)
        if not task.cancelled():
            assert task.exception() is None, f"k={k}: {task.exception()!r}"
            assert done, f"k={k}: the write returned but is not in the history"
        happened.add(done)
        after = await queue(store, f"after {k}")  # the store is still usable
        assert (await store.get_job(after.id)) == after
        assert_settled(store)
        if wrapper.cancels == 0:  # it ran to its end before reaching suspension k
            break
        k += 1
    assert k >= 3, "the write never suspended: the test proves nothing"
    assert happened == {False, True}  # early cancels undo it, late ones let it finish


@pytest.mark.asyncio
async def test_cancels_during_the_rollback_are_held_until_the_connection_is_clean(store: HistoryStore) -> None:
    job = await queue(store)
    k = 0
    while True:
        # Cancel at every suspension from k on: the rollback itself is cancelled again and again.
        wrapper, task = await run_cancelled_at(
            lambda: store.record_started(job.id, started_at=T0, model_id="flux_dev", prompt_used="p"),
            k, times=10**6, when="in_flight")
        assert_settled(store)
        assert task.cancelled() == (wrapper.cancels > 0)
        stored = await store.get_job(job.id)
        assert stored is not None and stored.attempt_count == len(await store.attempts(job.id))
        if wrapper.cancels == 0:
            break
        k += 1
    assert k >= 3
    await queue(store, "after")
    assert_settled(store)


@pytest.mark.asyncio
async def test_eight_concurrent_writes_some_cancelled_leave_the_store_usable(store: HistoryStore) -> None:
    wrappers = [CancelAt(queue(store, f"p{i}", job_id=f"c{i}"), k=i // 2 if i % 2 else 10**6) for i in range(8)]

    async def body(w: CancelAt) -> Any:
        return await w

    tasks = [asyncio.create_task(body(w)) for w in wrappers]
    await asyncio.wait(tasks)
    assert_settled(store)
    for i, (w, task) in enumerate(zip(wrappers, tasks)):
        job = await store.get_job(f"c{i}")
        if i % 2 == 0:
            assert task.result() == job, f"c{i}: an uncancelled write was lost"
        else:
            assert w.cancels == 1 and task.cancelled()
            assert job is None or job.params.prompt == f"p{i}"
    assert sum(t.cancelled() for t in tasks) == 4
    jobs = await asyncio.gather(*(queue(store, f"again {i}") for i in range(8)))
    assert [j.id for j in jobs] == [j.id for j in await store.queue()][-8:]
    assert_settled(store)


@pytest.mark.asyncio
async def test_a_write_cancelled_while_begin_waits_for_another_process_leaves_no_transaction(tmp_path: Path) -> None:
    async with HistoryStore.open(tmp_path, busy_timeout_s=2.0) as store:
        holder = sqlite3.connect(store.db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            task = asyncio.create_task(queue(store, "waits", job_id="waits"))
            await asyncio.sleep(0.2)  # BEGIN IMMEDIATE is now waiting on aiosqlite's thread
            task.cancel()
            await asyncio.wait([task])
            assert task.cancelled()
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        job = await queue(store, "next")  # once, this failed: "cannot start a transaction within a transaction"
        assert [j.id for j in await store.queue()] == [job.id]
        assert_settled(store)
        other = sqlite3.connect(store.db_path, timeout=0.1)
        other.execute("BEGIN IMMEDIATE")  # nobody kept the write lock
        other.execute("ROLLBACK")
        other.close()


@pytest.mark.asyncio
async def test_a_held_back_cancellation_still_ends_as_the_callers_timeout() -> None:
    finished = []

    async def slow() -> int:
        await asyncio.to_thread(time.sleep, 0.3)
        finished.append(time.monotonic())
        return 1

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            assert await to_the_end(slow()) == 1  # held to its end, then the cancel lands
            await asyncio.sleep(5)
    assert finished and time.monotonic() - started < 2


# -- nsfw_allowed -----------------------------------------------------------------------------


NSFW_ALLOWED_VERSION = 2  # the schema version that added jobs.nsfw_allowed


def make_previous_version_file(path: Path) -> None:
    """A file as the code before ``nsfw_allowed`` left it (schema version 1), one job."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    for script in history.MIGRATIONS[:NSFW_ALLOWED_VERSION - 1]:
        con.executescript(script)
    con.execute(f"PRAGMA user_version = {NSFW_ALLOWED_VERSION - 1}")
    con.execute(
        "INSERT INTO jobs (id, status, created_at, requester_platform, requester_user_id, requester_name,"
        " origin_platform, origin_channel_id, origin_thread_id, origin_message_ref, prompt,"
        " negative_prompt, model_asked, model_used, route_reason, steps, guidance, width, height, seed)"
        " VALUES ('old111', 'queued', ?, 'slack', 'U9', 'Ann', 'slack', 'C1', '', '', 'an old prompt',"
        " '', NULL, 'sd3_medium', 'poster', 30, 6.0, 512, 512, 7)", (T0,))
    con.commit()
    con.close()


def test_nsfw_allowed_is_added_by_migration_2() -> None:
    assert SCHEMA_VERSION == len(history.MIGRATIONS) >= NSFW_ALLOWED_VERSION
    added = [v + 1 for v, script in enumerate(history.MIGRATIONS) if "nsfw_allowed" in script]
    assert added == [NSFW_ALLOWED_VERSION]


@pytest.mark.asyncio
async def test_an_older_file_migrates_and_its_jobs_read_back_nsfw_not_allowed(tmp_path: Path) -> None:
    db = tmp_path / "promptpics.sqlite3"
    make_previous_version_file(db)
    async with HistoryStore.open(tmp_path) as store:
        old = await store.get_job("old111")
        assert old is not None and old.nsfw_allowed is False and old.params.prompt == "an old prompt"
        new = await queue(store, "adult channel", nsfw_allowed=True)
        assert new.nsfw_allowed is True
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert con.execute("SELECT id, nsfw_allowed FROM jobs ORDER BY seq").fetchall() == [
        ("old111", 0), (new.id, 1)]
    con.close()


@pytest.mark.asyncio
async def test_nsfw_allowed_round_trips_and_survives_a_restart_and_requeue(tmp_path: Path) -> None:
    async with HistoryStore.open(tmp_path) as store:
        adult = await queue(store, "adult", nsfw_allowed=True)
        plain = await queue(store, "plain")  # the keyword defaults to False
        await store.record_started(adult.id, started_at=T0, model_id="flux_dev", prompt_used="adult")
    async with HistoryStore.open(tmp_path) as store:  # a restart: the running job is taken back
        back = await store.requeue_interrupted()
        assert [(j.id, j.status, j.nsfw_allowed) for j in back] == [
            (adult.id, JobStatus.QUEUED, True), (plain.id, JobStatus.QUEUED, False)]


def test_stored_job_keeps_its_old_constructor() -> None:
    fields = history.StoredJob.__dataclass_fields__
    assert list(fields)[-1] == "nsfw_allowed" and fields["nsfw_allowed"].default is False
