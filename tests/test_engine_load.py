"""The engine under a busy server: caps that hold under concurrency, one owner per data folder,
one queue plan per change, nothing waiting on a stopped thread, nothing kept after it ends."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest

import engine.core.plan
import engine.jobs as engine_jobs
from engine import (
    DataFolderBusyError,
    Engine,
    EngineClosedError,
    EngineError,
    JobFailed,
    JobQueued,
    JobRequest,
    QueueFullError,
    QueueMoved,
    RequestError,
    Requester,
)
from engine.history import HistoryStore
from engine.scheduler import UserQueueFullError
from tests.conftest import REPO, make_tiny_config
from tests.test_scheduler import GatedEngine, ask

WAIT = 60  # a safety net for a loaded machine; every wait below ends on an event long before


def capped(tiny_models: Any, data_dir: Path, *, per_user: int, total: int) -> Any:
    config = make_tiny_config(tiny_models, data_dir, max_queued_jobs=total)
    return config.model_copy(update={"scheduler": config.scheduler.model_copy(update={"max_queued_per_user": per_user})})


async def gather(*aws: Any) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*aws, return_exceptions=True), WAIT)


# -- admission: caps hold exactly under concurrency ------------------------------------------------


async def test_eight_concurrent_submits_from_one_user_get_exactly_the_per_user_cap(tiny_models: Any,
                                                                                    tmp_path: Path) -> None:
    gated = GatedEngine(capped(tiny_models, tmp_path / "data", per_user=2, total=3))
    async with gated.engine as engine:
        busy = await gated.started(ask("flux_dev", "first"))
        outcomes = await gather(*(engine.submit(ask("flux_dev", "ann")) for _ in range(8)))
        accepted = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(accepted) == 2 and len(refused) == 6
        assert all(isinstance(e, UserQueueFullError) for e in refused)
        # the next user still finds the seat the cap kept free; the one after finds the queue full
        bob = await engine.submit(ask("flux_dev", "bob"))
        with pytest.raises(QueueFullError, match=r"queue is full \(3 jobs waiting\)"):
            await engine.submit(ask("flux_dev", "cid"))
        assert len(engine.queue_snapshot()) == 1 + 3
        gated.gate.set()
        assert all([(await h.result()).png for h in (busy, *accepted, bob)])


async def test_concurrent_routed_submits_from_many_users_fill_the_queue_exactly(tiny_models: Any,
                                                                                tmp_path: Path) -> None:
    """No model given: every submit awaits the router, then the history, before it is queued."""
    gated = GatedEngine(capped(tiny_models, tmp_path / "data", per_user=5, total=3))
    async with gated.engine as engine:
        busy = await gated.started(ask("flux_dev", "first"))
        requests = [JobRequest(f"a portrait photo of person {i}", steps=1, width=64, height=64,
                               requester=Requester("discord", f"u{i}", f"u{i}")) for i in range(8)]
        outcomes = await gather(*(engine.submit(r) for r in requests))
        accepted = [o for o in outcomes if not isinstance(o, BaseException)]
        assert len(accepted) == 3
        assert all(type(o) is QueueFullError for o in outcomes if isinstance(o, BaseException))
        gated.gate.set()
        assert all([(await h.result()).png for h in (busy, *accepted)])


async def test_a_refused_or_failed_submit_gives_its_seat_back(tiny_models: Any, tmp_path: Path) -> None:
    gated = GatedEngine(capped(tiny_models, tmp_path / "data", per_user=2, total=5))
    async with gated.engine as engine:
        busy = await gated.started(ask("flux_dev", "first"))
        bad = dataclasses.replace(ask("flux_dev", "ann"), steps=5000)
        for outcome in await gather(*(engine.submit(bad) for _ in range(4))):
            assert isinstance(outcome, RequestError)
        real_record = engine.history.record_queued

        async def disk_trouble(**kwargs: Any) -> Any:
            raise OSError("disk trouble")

        engine.history.record_queued = disk_trouble  # type: ignore[method-assign]
        with pytest.raises(OSError):
            await engine.submit(ask("flux_dev", "ann"))
        engine.history.record_queued = real_record  # type: ignore[method-assign]
        kept = [await engine.submit(ask("flux_dev", "ann")) for _ in range(2)]  # both seats are free again
        with pytest.raises(UserQueueFullError):
            await engine.submit(ask("flux_dev", "ann"))
        gated.gate.set()
        assert all([(await h.result()).png for h in (busy, *kept)])


# -- one owner per data folder ---------------------------------------------------------------------


async def test_a_second_engine_on_the_same_data_folder_is_refused_and_the_first_keeps_running(
        tiny_models: Any, tmp_path: Path) -> None:
    config = make_tiny_config(tiny_models, tmp_path / "data")
    gated = GatedEngine(config)
    async with gated.engine as engine:
        busy = await gated.started(ask("flux_dev", "first"))
        queued = await engine.submit(ask("flux_dev", "second"))
        with pytest.raises(DataFolderBusyError) as refused:
            async with Engine(config):
                raise AssertionError("a second engine started on a folder that is in use")
        assert f"pid {os.getpid()}" in refused.value.user_message
        assert "stop it first or use another data_dir" in refused.value.user_message
        # read-only access beside it works
        async with HistoryStore.open(config.data_dir) as reader:
            assert {j.id for j in await reader.unfinished_jobs()} == {busy.id, queued.id}
        gated.gate.set()
        assert (await busy.result()).png and (await queued.result()).png
        jobs = {j.id: j for j in await engine.history.recent_jobs(limit=10)}
        assert {jobs[busy.id].status.value, jobs[queued.id].status.value} == {"succeeded"}
        assert all(j.attempt_count == 1 for j in jobs.values())  # nobody ran them twice
    async with Engine(config) as again:  # released on close
        assert again.resumed == []


def _cli(args: list[str], data_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROMPTPICS_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PROMPTPICS_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "bot", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
async def test_a_second_process_gets_one_line_and_exit_2_while_read_only_commands_work(
        tiny_models: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "tiny-models").symlink_to(tiny_models.root.parent)  # the CLI's tiny profile finds them built
    gated = GatedEngine(make_tiny_config(tiny_models, data_dir))
    async with gated.engine as engine:
        busy = await gated.started(ask("flux_dev", "first"))
        second = await asyncio.to_thread(_cli, ["--profile", "tiny", "imagine", "a lighthouse", "--seed", "7"], data_dir)
        assert second.returncode == 2, second.stderr
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert lines == [f"promptpics: another PromptPics process (pid {os.getpid()}, started at "
                         f"{lines[0].split('started at ')[1].split(')')[0]}) is running on this data folder "
                         f"({data_dir.resolve()}); stop it first or use another data_dir"], second.stderr
        history = await asyncio.to_thread(_cli, ["history", "--json"], data_dir)
        assert history.returncode == 0, history.stderr
        assert busy.id in history.stdout
        gated.gate.set()
        assert (await busy.result()).png
        job = await engine.history.get_job(busy.id)
        assert job is not None and job.status.value == "succeeded" and job.attempt_count == 1


# -- stopping: nothing waits on a stopped thread, nothing is dropped ---------------------------------


async def test_admin_calls_and_submits_after_close_fail_at_once(tiny_config: Any) -> None:
    engine = Engine(tiny_config)
    async with engine:
        pass
    for call in (engine.preload("flux_dev"), engine.pin("flux_dev"), engine.unload("flux_dev"),
                 engine.submit(ask("flux_dev"))):
        with pytest.raises(EngineClosedError, match="shutting down"):
            await asyncio.wait_for(call, WAIT)


async def test_a_submit_caught_mid_write_by_close_is_kept_and_answered(tiny_models: Any, tmp_path: Path) -> None:
    config = make_tiny_config(tiny_models, tmp_path / "data")
    engine = Engine(config)
    await engine.__aenter__()
    writing, go_on = asyncio.Event(), asyncio.Event()
    real_record = engine.history.record_queued

    async def slow_record(**kwargs: Any) -> Any:
        writing.set()
        await go_on.wait()
        return await real_record(**kwargs)

    engine.history.record_queued = slow_record  # type: ignore[method-assign]
    submit = asyncio.ensure_future(engine.submit(ask("flux_dev", "late")))
    await asyncio.wait_for(writing.wait(), WAIT)
    closing = asyncio.ensure_future(engine.aclose())
    await asyncio.sleep(0)  # aclose runs up to its wait for the submit in flight
    assert not closing.done()
    go_on.set()
    handle = await asyncio.wait_for(submit, WAIT)
    events = [e async for e in handle.events()]
    assert isinstance(events[-1], JobFailed) and events[-1].error_kind == "EngineStopped"
    await asyncio.wait_for(closing, WAIT)
    async with Engine(config) as again:  # kept: it runs after the next start
        assert [h.id for h in again.resumed] == [handle.id]
        assert (await again.resumed[0].result()).png


# -- resume: nsfw_allowed kept, handles released ------------------------------------------------------


async def test_resumed_jobs_keep_nsfw_allowed_and_their_handles_are_released(tiny_models: Any,
                                                                             tmp_path: Path) -> None:
    config = make_tiny_config(tiny_models, tmp_path / "data")
    gated = GatedEngine(config)
    async with gated.engine as engine:
        await gated.started(ask("flux_dev", "first"))
        adult = await engine.submit(dataclasses.replace(ask("flux_dev", "ann"), nsfw_allowed=True))
        plain = await engine.submit(ask("flux_dev", "bob"))
        gated.gate.set()  # the first finishes as the engine stops; the two queued ones are kept
    seen: dict[str, bool] = {}

    def factory(c: Any, device: Any, dtype: Any) -> Any:
        from engine.core import default_runner_blocking

        real = default_runner_blocking(c, device, dtype)
        run = real.run_blocking

        def run_blocking(job_id: str, params: Any, on_step: Any, cancel: Any, nsfw_allowed: bool = False,
                         *rest: Any) -> Any:
            seen[job_id] = nsfw_allowed
            return run(job_id, params, on_step, cancel, nsfw_allowed, *rest)

        real.run_blocking = run_blocking  # type: ignore[method-assign]
        return real

    async with Engine(config, runner_factory=factory) as again:
        resumed = again.resumed
        assert {h.id for h in resumed} >= {adult.id, plain.id}
        refs = [weakref.ref(h) for h in resumed]
        for h in resumed:
            await asyncio.wait_for(h.result(), WAIT)
        del resumed, h
        assert again.resumed == [] and again._jobs == {}
        gc.collect()
        assert [r for r in refs if r() is not None] == []  # the engine keeps no handle once a job ended
        assert seen[adult.id] is True and seen[plain.id] is False
    async with HistoryStore.open(config.data_dir) as history:
        assert (await history.get_job(adult.id)).nsfw_allowed is True  # type: ignore[union-attr]


# -- one plan per change ----------------------------------------------------------------------------


async def test_the_queue_plan_is_computed_once_per_change_and_published_once(tiny_models: Any, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    gated = GatedEngine(capped(tiny_models, tmp_path / "data", per_user=200, total=200))
    builds: list[int] = []
    real_build = engine.core.plan.build_plan

    def counting_build(*args: Any, **kwargs: Any) -> Any:
        builds.append(len(args[2]))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(engine.core.plan, "build_plan", counting_build)
    async with gated.engine as eng:
        feed = eng.subscribe()
        busy = await gated.started(ask("flux_dev", "first"))
        handles = await gather(*(eng.submit(ask(("flux_dev", "realvis_xl")[i % 2], f"u{i % 7}")) for i in range(60)))
        assert not [h for h in handles if isinstance(h, BaseException)]
        await asyncio.sleep(0)  # the coalesced QueueMoved goes out on the next loop turn
        builds.clear()
        for h in handles:  # reading ETAs and the listing computes nothing new
            eng.eta(h.id)
        snapshot = eng.queue_snapshot()
        assert builds == [] and [e.position for e in snapshot] == list(range(61))
        moves = []
        while not feed.empty():
            event = feed.get_nowait()
            if isinstance(event, QueueMoved):
                moves.append(event)
        assert moves, "no QueueMoved was published"
        last = moves[-1]
        assert [p.position for p in last.places] == list(range(1, 61))
        assert [p.job_id for p in last.places] == [e.job_id for e in snapshot[1:]]
        assert len(moves) <= 2 + 60  # at most one per change: the first job queued and started, 60 more queued
        gated.gate.set()
        for h in handles:
            assert (await asyncio.wait_for(h.result(), WAIT)).png
        assert (await busy.result()).png
        # each job start planned the queue once, with the queue as it was then
        assert len(builds) <= 2 * 61, builds


async def test_a_job_queued_event_carries_the_plans_position(tiny_models: Any, tmp_path: Path) -> None:
    gated = GatedEngine(make_tiny_config(tiny_models, tmp_path / "data"))
    async with gated.engine as eng:
        busy = await gated.started(ask("flux_dev", "first"))
        a = await eng.submit(ask("realvis_xl", "ann"))
        b = await eng.submit(ask("flux_dev", "bob"))  # flux is loaded: affinity plans it first
        queued = {e.job_id: e for h in (a, b) async for e in _first(h) if isinstance(e, JobQueued)}
        assert (queued[a.id].position, queued[b.id].position) == (1, 1)
        assert [e.job_id for e in eng.queue_snapshot()] == [busy.id, b.id, a.id]
        gated.gate.set()
        for h in (busy, a, b):
            assert (await h.result()).png


async def _first(handle: Any) -> Any:
    async for event in handle.events():
        yield event
        return


# -- the router's warm-up never holds a submit -------------------------------------------------------


async def test_prompts_skip_the_embedding_stage_while_its_model_loads(tiny_config: Any) -> None:
    import threading

    from engine.router import ENGINE_INDEX_WAIT_S, CascadeRouter

    release = threading.Event()

    def slow_loader(source: str, tokens: int, dtype: str) -> Any:
        assert release.wait(WAIT), "never released"
        from tests.test_router import StubEncoder

        return StubEncoder()

    config = tiny_config.model_copy(update={"router": tiny_config.router.model_copy(update={"stages": ("embeddings",)})})
    router = CascadeRouter(config, encoder_loader=slow_loader, index_wait_s=ENGINE_INDEX_WAIT_S)
    try:
        decision = await asyncio.wait_for(router.route("a quiet street at night"), WAIT)
        assert not release.is_set()  # answered while the model was still loading
        assert "the embedding stage was skipped: still loading" in decision.reason
        assert decision.stage == "default"
    finally:
        release.set()
        await router.aclose()


def test_the_engines_router_does_not_wait_for_the_embedding_model(tiny_config: Any) -> None:
    from engine.router import ENGINE_INDEX_WAIT_S, build_router

    router = build_router(tiny_config)
    assert router._index_wait_s == ENGINE_INDEX_WAIT_S <= 0.5  # type: ignore[attr-defined]


def test_the_load_benchmark_reports_every_key() -> None:
    """Only a small run here (the figures come from the full run in docs/PERFORMANCE.md)."""
    out = subprocess.run([sys.executable, "bench/load.py", "--json", "--users", "6", "--jobs", "24", "--duration", "4",
                          "--rush", "1"], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("accepted", "completed", "lost", "duplicates", "cap_violations", "loop_lag_ms", "job_start_loop_ms",
                "submit_ms"):
        assert key in report
    assert report["lost"] == report["duplicates"] == report["cap_violations"] == 0


async def test_a_submit_cancelled_while_its_job_is_recorded_still_queues_and_runs_it(tiny_models: Any,
                                                                                     tmp_path: Path) -> None:
    config = make_tiny_config(tiny_models, tmp_path / "data")
    async with Engine(config) as engine:
        feed = engine.subscribe()
        writing = asyncio.Event()
        real_record = engine.history.record_queued

        async def watched_record(**kwargs: Any) -> Any:
            writing.set()
            return await real_record(**kwargs)

        engine.history.record_queued = watched_record  # type: ignore[method-assign]
        submit = asyncio.ensure_future(engine.submit(ask("flux_dev", "gone")))
        await asyncio.wait_for(writing.wait(), WAIT)
        submit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submit
        finished = None
        while finished is None:  # the job was recorded, so it is queued, run and announced
            event = await asyncio.wait_for(feed.get(), WAIT)
            if isinstance(event, JobFailed | engine_jobs.JobFinished):
                finished = event
        assert isinstance(finished, engine_jobs.JobFinished)
        stored = await engine.history.get_job(finished.job_id)
        assert stored is not None and stored.status.value == "succeeded"
