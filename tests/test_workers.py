"""Several GPU workers under one engine, in one process (two ``LocalWorker``s on tiny twins): the
dispatcher's affinity across workers, the history saying which worker ran what, a worker lost
under a job (the job back in its place, once; the crash-loop guard), eight submits at once,
cancel, the queue listing and the admin calls per worker. Ray's own workers: test_cluster_ray.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from engine import Config, Engine, Totals, JobCancelled, JobFailed, JobFinished, JobProgressed, JobRequest, JobStarted, JobStatus, RequestError
from engine.cluster import WorkerLostError
from engine.cluster.local import LocalWorker
from engine.errors import EngineError, JobCancelledError


def job(prompt: str, model: str, *, steps: int = 2, user: str = "local") -> JobRequest:
    from engine.jobs import Requester

    return JobRequest(prompt, model=model, steps=steps, width=64, height=64, seed=1,
                      requester=Requester("cli", user))


class Watched(LocalWorker):
    """A LocalWorker that counts what it runs and checks it never runs two jobs at once."""

    def __init__(self, name: str) -> None:
        super().__init__(name, thread_name=f"promptpics-{name}")
        self.ran: list[str] = []
        self.busy = 0
        self.overlapped = False

    async def run(self, job_id: str, params: Any, **kw: Any) -> Any:
        self.busy += 1
        self.overlapped |= self.busy > 1
        try:
            out = await super().run(job_id, params, **kw)
            self.ran.append(params.model_id)
            return out
        finally:
            self.busy -= 1


class Dying(Watched):
    """Dies under its first ``deaths`` jobs at the first step (the real runner stops there; the
    attempt it opened stays open, as a killed process leaves it), then works."""

    def __init__(self, name: str, deaths: int) -> None:
        super().__init__(name)
        self.deaths = deaths

    async def run(self, job_id: str, params: Any, *, cancel: threading.Event, on_step: Callable[[int, int], None],
                  **kw: Any) -> Any:
        if self.deaths <= 0:
            return await super().run(job_id, params, cancel=cancel, on_step=on_step, **kw)
        self.deaths -= 1
        killed = threading.Event()

        def step(n: int, total: int) -> None:
            on_step(n, total)
            killed.set()  # the process "dies" here: the runner stops at the next step check

        try:
            await super().run(job_id, params, cancel=killed, on_step=step, **kw)
        except JobCancelledError:
            pass
        raise WorkerLostError(self.info.name, "killed by the test")


class Held(Watched):
    """Holds each job at its first step until ``gate`` opens or the job is cancelled."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.gate = threading.Event()

    async def run(self, job_id: str, params: Any, *, cancel: threading.Event, on_step: Callable[[int, int], None],
                  **kw: Any) -> Any:
        def step(n: int, total: int) -> None:
            on_step(n, total)
            while not (self.gate.is_set() or cancel.is_set()):
                cancel.wait(0.01)

        return await super().run(job_id, params, cancel=cancel, on_step=step, **kw)


async def test_two_workers_each_keep_their_model_and_the_history_says_which_ran_what(tiny_config: Config) -> None:
    w0, w1 = Watched("w0"), Watched("w1")
    async with Engine(tiny_config, workers=[w0, w1]) as engine:
        handles = [await engine.submit(job(f"p{i}", "flux_dev" if i % 2 == 0 else "realvis_xl")) for i in range(4)]
        results = await asyncio.gather(*(h.result() for h in handles))
        assert all(r.png for r in results)
        attempts = {h.id: await engine.history.attempts(h.id) for h in handles}
    assert not (w0.overlapped or w1.overlapped), "a worker ran two jobs at once"
    ran_on = {h.id: attempts[h.id][-1].worker for h in handles}
    assert set(ran_on.values()) == {"w0", "w1"}, "both workers render"
    # each model stayed with the worker that loaded it: no model was loaded on both
    by_model = {m: {ran_on[h.id] for h in handles if h.params.model_id == m} for m in ("flux_dev", "realvis_xl")}
    assert all(len(workers) == 1 for workers in by_model.values()), by_model
    assert sorted(w0.ran + w1.ran) == sorted(h.params.model_id for h in handles)  # each ran once


async def test_a_job_whose_worker_dies_goes_back_and_finishes_once(tiny_config: Config) -> None:
    dying, healthy = Dying("w0", deaths=1), Watched("w1")
    async with Engine(tiny_config, workers=[dying, healthy]) as engine:
        handle = await engine.submit(job("a lighthouse", "flux_dev", steps=3))
        events = [e async for e in handle.events()]
        result = events[-1]
        attempts = await engine.history.attempts(handle.id)
        stored = await engine.history.get_job(handle.id)
    assert type(result).__name__ == "JobFinished"
    assert [(a.outcome, a.worker) for a in attempts][0] == ("interrupted", "w0")
    assert [a.outcome for a in attempts] == ["interrupted", "succeeded"]
    assert stored is not None and stored.status is JobStatus.SUCCEEDED
    assert sum(isinstance(e, JobStarted) for e in events) == 2  # started, lost, queued again, started


async def test_a_job_present_at_two_worker_deaths_fails_with_a_sentence(tiny_config: Config) -> None:
    async with Engine(tiny_config, workers=[Dying("w0", deaths=5)]) as engine:
        handle = await engine.submit(job("a lighthouse", "flux_dev", steps=3))
        final = [e async for e in handle.events()][-1]
        attempts = await engine.history.attempts(handle.id)
        stored = await engine.history.get_job(handle.id)
    assert isinstance(final, JobFailed) and final.error_kind == "WorkerLost"
    assert "2 times" in final.message and "not tried again" in final.message
    assert [a.outcome for a in attempts] == ["interrupted", "interrupted"]
    assert stored is not None and stored.status is JobStatus.FAILED


async def test_eight_submits_at_once_on_two_workers_each_run_exactly_once(tiny_config: Config) -> None:
    w0, w1 = Watched("w0"), Watched("w1")
    models = ["flux_dev", "realvis_xl", "sd3_medium", "flux_dev"]
    async with Engine(tiny_config, workers=[w0, w1]) as engine:
        handles = await asyncio.gather(*(engine.submit(job(f"p{i}", models[i % 4], user=f"u{i % 3}"))
                                         for i in range(8)))
        await asyncio.gather(*(h.result() for h in handles))
        attempts = [await engine.history.attempts(h.id) for h in handles]
    assert len({h.id for h in handles}) == 8
    assert all([a.outcome for a in rows] == ["succeeded"] for rows in attempts)
    assert len(w0.ran) + len(w1.ran) == 8 and not (w0.overlapped or w1.overlapped)


async def test_the_queue_lists_every_running_job_with_its_worker_and_cancel_reaches_it(tiny_config: Config) -> None:
    held = [Held("w0"), Held("w1")]
    async with Engine(tiny_config, workers=held) as engine:
        long = [await engine.submit(job(f"long {i}", m, steps=3)) for i, m in enumerate(("flux_dev", "realvis_xl"))]
        waiting = await engine.submit(job("after", "sd3_medium"))
        for h in long:
            async for event in h.events():
                if isinstance(event, JobProgressed):
                    break
        snapshot = engine.queue_snapshot()
        states = engine.workers()
        assert sorted((e.position, e.worker) for e in snapshot) == [(0, "w0"), (0, "w1"), (1, "")]
        assert {s.info.name: s.job_id for s in states} == {"w0": long[0].id, "w1": long[1].id} or \
            {s.info.name: s.job_id for s in states} == {"w0": long[1].id, "w1": long[0].id}
        assert engine.eta(waiting.id) is None or engine.eta(waiting.id) >= 0
        for h in long:
            assert await engine.cancel(h.id)
        finals = [[e async for e in h.events()][-1] for h in long]
        assert all(isinstance(f, JobCancelled) and f.while_running for f in finals)
        for worker in held:
            worker.gate.set()
        assert (await waiting.result()).png


async def test_admin_calls_name_a_worker_or_pick_one(tiny_config: Config) -> None:
    async with Engine(tiny_config, workers=[Watched("w0"), Watched("w1")]) as engine:
        await engine.preload("realvis_xl", worker="w1")
        loaded = {s.info.name: {m.model_id for m in s.resident} for s in engine.workers()}
        assert loaded == {"w0": set(), "w1": {"realvis_xl"}}
        assert await engine.preload("realvis_xl") == 0.0  # already on w1: not loaded twice
        with pytest.raises(RequestError, match="`worker` is 'w7', but it must be one of the workers: w0, w1"):
            await engine.preload("flux_dev", worker="w7")
        await engine.pin("realvis_xl")  # held by w1: pinned there
        assert [m.pinned for m in engine.workers()[1].resident] == [True]
        assert await engine.unload("realvis_xl") is True
        assert {m.model_id for m in engine.resident_models()} == set()
        with pytest.raises(RequestError, match="`model` is 'realvis_xl', but it is loaded on no worker"):
            await engine.pin("realvis_xl")  # several workers, held by none: said, not silently dropped
        await engine.pin("realvis_xl", pinned=False)  # nothing to unpin: fine


class Small(Watched):
    """A card that holds only some models (a heterogeneous cluster)."""

    def __init__(self, name: str, *models: str) -> None:
        super().__init__(name)
        self.models = models

    def fits(self, model_id: str) -> bool:
        return model_id in self.models


async def test_a_job_goes_only_to_a_card_its_model_fits_and_one_that_fits_none_is_refused(tiny_config: Config) -> None:
    small, big = Small("w0", "flux_dev"), Small("w1", "flux_dev", "realvis_xl")
    async with Engine(tiny_config, workers=[small, big]) as engine:
        handles = [await engine.submit(job(f"p{i}", "realvis_xl")) for i in range(3)]
        await asyncio.gather(*(h.result() for h in handles))
        with pytest.raises(RequestError, match="`model` is 'sd3_medium', but no GPU worker's card can hold it"):
            await engine.submit(job("a poster", "sd3_medium"))
        assert engine.queue_snapshot() == []
    assert small.ran == [] and big.ran == ["realvis_xl"] * 3


def test_a_long_queue_on_several_workers_plans_the_front_and_keeps_every_place() -> None:
    from engine.core.plan import WORKERS_PLAN_DEPTH, CostBook, build_plan_workers
    from engine.jobs import GenerationParams
    from engine.scheduler import AffinityScheduler, QueuedJob, RoundRobin, WorkerView

    rr, book = RoundRobin(), CostBook()
    models = ["flux_dev", "realvis_xl", "sd3_medium"]
    queue = [QueuedJob(f"j{i}", models[i % 3], f"u{i % 7}", i, 0.0, rr.tag(f"u{i % 7}")) for i in range(200)]
    params = {j.job_id: GenerationParams("p", "", j.model_id, 20, 4.5, 512, 512, 1) for j in queue}
    for m in models:
        book.record_job(params[f"j{models.index(m)}"], generate_s=5.0, load_s=20.0)
    workers = [WorkerView("w0", frozenset({"flux_dev"})), WorkerView("w1", frozenset({"realvis_xl"}))]
    plan = build_plan_workers("k", AffinityScheduler(), queue, params, workers, 0.0, book)
    assert sorted(p.position for p in plan.planned) == list(range(1, 201))
    assert {p.job_id for p in plan.planned} == {j.job_id for j in queue}
    assert {p.worker for p in plan.planned[:WORKERS_PLAN_DEPTH]} == {"w0", "w1"}
    front, back = plan.planned[0].job_id, plan.planned[-1].job_id
    assert plan.eta(front, 0.0, True) is not None and plan.eta(back, 0.0, True) is None
    assert plan.rough_eta(back, 0.0) >= plan.rough_eta(front, 0.0)


class DiesThenHolds(Dying):
    """Dies under its first job (a worker loss), then holds every job at its first step until cancelled."""

    def __init__(self, name: str) -> None:
        super().__init__(name, deaths=1)

    async def run(self, job_id: str, params: Any, *, cancel: threading.Event, on_step: Callable[[int, int], None],
                  **kw: Any) -> Any:
        holding = self.deaths <= 0  # died once already: this run is held until the bot stops

        def step(n: int, total: int) -> None:
            on_step(n, total)
            if holding:
                cancel.wait()

        return await super().run(job_id, params, cancel=cancel, on_step=step, **kw)


async def test_the_crash_loop_guard_counts_worker_losses_across_a_restart_and_not_the_stop(tiny_config: Config) -> None:
    first = DiesThenHolds("w0")
    async with Engine(tiny_config, workers=[first]) as engine:
        handle = await engine.submit(job("a lighthouse", "flux_dev", steps=3))
        started = 0
        async for event in handle.events():  # lost once, queued again, started again and held: stop the bot
            started += isinstance(event, JobStarted)
            if started == 2 and isinstance(event, JobProgressed):
                break
    again = Engine(tiny_config, workers=[Dying("w0", deaths=1)])
    events = again.subscribe()  # before the start: the taken-back job may end before we could ask for it
    async with again:
        while not isinstance(final := await events.get(), JobFailed | JobFinished) or final.job_id != handle.id:
            pass
        attempts = await again.history.attempts(handle.id)
    # the stop in between was not a loss; the second loss, after the restart, is the second one
    assert isinstance(final, JobFailed) and final.error_kind == "WorkerLost" and "2 times" in final.message
    assert [a.outcome for a in attempts] == ["interrupted", "interrupted", "interrupted"]
    assert [a.finished_at is not None for a in attempts] == [True, False, True]


async def test_the_router_llm_runs_on_a_free_worker_and_stays_there_while_it_can(tiny_config: Config) -> None:
    from tests.held_runner import llm_home

    held = [Held("w0"), Held("w1")]
    async with Engine(tiny_config, workers=held) as engine:
        # what Ray modes use (each worker its own process there; here two threads of this one)
        _, thread, llm, tag = await engine._llm_on_a_worker(llm_home, "first")
        assert (thread, llm, tag) == ("promptpics-w0", "ChatLLM", "first")  # all free: the first
        busy = await engine.submit(job("held", "flux_dev"))
        async for event in busy.events():
            if isinstance(event, JobProgressed):
                break
        runs_on = {j.worker for j in engine._running.values()}
        free = ({"w0", "w1"} - runs_on).pop()
        assert (await engine._llm_on_a_worker(llm_home, "busy"))[1] == f"promptpics-{free}"  # not behind the job
        for worker in held:
            worker.gate.set()
        await busy.result()
        # both free again: it stays where the LLM was loaded last
        assert (await engine._llm_on_a_worker(llm_home, "sticky"))[1] == f"promptpics-{free}"
    with pytest.raises(EngineError, match="no GPU worker is up"):
        await engine._llm_on_a_worker(llm_home, "after the stop")


async def test_the_dashboard_and_the_metrics_count_every_worker_s_memory(tiny_config: Config) -> None:
    from web.dashboard import queue_snapshot
    from web.metrics import Snapshot

    async with Engine(tiny_config, workers=[Watched("w0"), Watched("w1")]) as engine:
        await engine.preload("realvis_xl", worker="w0")
        await engine.preload("realvis_xl", worker="w1")  # a second copy: both hold it
        await engine.preload("sd3_medium", worker="w1")
        snap = queue_snapshot(engine)
        metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in Snapshot(Totals({}, {}, [], []), [], engine).collect() for s in family.samples}
    per_worker = {w: sum(r["bytes"] for r in snap["resident"] if r["worker"] == w) for w in ("w0", "w1")}
    assert sorted((r["model"], r["worker"]) for r in snap["resident"]) == [
        ("realvis_xl", "w0"), ("realvis_xl", "w1"), ("sd3_medium", "w1")]
    assert snap["workers"] == 2 and per_worker["w0"] > 0 and per_worker["w1"] > per_worker["w0"]
    used = {w: metrics[("promptpics_worker_gpu_memory_used_bytes", (("worker", w),))] for w in ("w0", "w1")}
    assert metrics[("promptpics_gpu_memory_used_bytes", ())] == used["w0"] + used["w1"] == snap["gpu_used_bytes"]
    assert metrics[("promptpics_model_resident", (("model", "realvis_xl"), ("where", "cpu")))] == 2
    assert metrics[("promptpics_model_resident", (("model", "sd3_medium"), ("where", "cpu")))] == 1
