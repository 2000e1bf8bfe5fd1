"""The scheduler: FIFO, model affinity, the fairness bounds over random traces, round-robin,
the per-user cap, ETAs - and the same ordering end to end through the engine (engine/core/)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

from engine.config import SchedulerSettings, validate_table
from engine.errors import ConfigError, QueueFullError
from engine.scheduler import (
    AffinityScheduler,
    FifoScheduler,
    QueuedJob,
    RoundRobin,
    TimingBook,
    UserQueueFullError,
    apply_pick,
    check_user_cap,
    fair_order,
    make_scheduler,
    needed_soon,
    plan,
)


def jobs(*spec: tuple[str, str], start: int = 0) -> list[QueuedJob]:
    """``("flux", "ann"), ...`` -> queued jobs j0, j1, ... with round-robin tags."""
    rr = RoundRobin()
    return [QueuedJob(f"j{i}", model, user, i, float(i), rr.tag(user)) for i, (model, user) in enumerate(spec, start)]


# -- the two policies --------------------------------------------------------------------------


def test_fifo_runs_in_arrival_order_whatever_is_resident() -> None:
    queue = jobs(("sdxl", "a"), ("flux", "b"), ("flux", "c"))
    pick = FifoScheduler().pick(queue, {"flux"}, 0.0)
    assert (pick.job_id, pick.passed_over) == ("j0", ())


def test_affinity_prefers_a_resident_model_and_counts_who_it_overtakes() -> None:
    queue = jobs(("sdxl", "a"), ("sd3", "b"), ("flux", "c"), ("sdxl", "d"))
    pick = AffinityScheduler().pick(queue, {"flux"}, 0.0)
    assert (pick.job_id, pick.passed_over, pick.reason) == ("j2", ("j0", "j1"), "resident")
    after = apply_pick(queue, pick, now=5.0)
    assert [(j.job_id, j.passed_over, j.first_passed_at) for j in after] == [
        ("j0", 1, 5.0), ("j1", 1, 5.0), ("j3", 0, None)]


def test_affinity_prefers_a_model_parked_in_ram_over_a_disk_load() -> None:
    queue = jobs(("sdxl", "a"), ("sd3", "b"))
    assert AffinityScheduler().pick(queue, set(), 0.0, parked={"sd3"}).job_id == "j1"
    assert AffinityScheduler().pick(queue, set(), 0.0).job_id == "j0"  # nothing cheap: the fair head loads


def test_a_job_at_its_pass_over_bound_is_not_overtaken_again() -> None:
    queue = jobs(("sdxl", "a"), ("flux", "b"), ("flux", "c"))
    queue[0] = dataclasses.replace(queue[0], passed_over=2, first_passed_at=0.0)
    pick = AffinityScheduler(max_passed_over=2, max_extra_wait_s=1e9).pick(queue, {"flux"}, 1.0)
    assert (pick.job_id, pick.reason) == ("j0", "bound")


def test_a_job_waiting_past_the_time_bound_is_not_overtaken_again() -> None:
    queue = jobs(("sdxl", "a"), ("flux", "b"))
    queue[0] = dataclasses.replace(queue[0], passed_over=1, first_passed_at=10.0)
    s = AffinityScheduler(max_passed_over=100, max_extra_wait_s=60)
    assert s.pick(queue, {"flux"}, 69.0).job_id == "j1"
    assert s.pick(queue, {"flux"}, 70.0).job_id == "j0"


def test_jobs_ahead_of_a_blocked_job_may_still_run_first() -> None:
    # j1 is at its bound; j0 is ahead of it in fair order, so running j0 does not pass j1 over
    queue = jobs(("sd3", "a"), ("sdxl", "b"), ("flux", "c"))
    queue[1] = dataclasses.replace(queue[1], passed_over=3, first_passed_at=0.0)
    pick = AffinityScheduler(max_passed_over=3).pick(queue, {"sd3", "flux"}, 1.0)
    assert pick.job_id == "j0" and pick.passed_over == ()


def test_make_scheduler_follows_the_settings() -> None:
    assert make_scheduler(SchedulerSettings(policy="fifo")).name == "fifo"
    s = make_scheduler(SchedulerSettings(max_passed_over=3, max_extra_wait_s=7))
    assert isinstance(s, AffinityScheduler) and (s.max_passed_over, s.max_extra_wait_s) == (3, 7)


# -- round-robin -------------------------------------------------------------------------------


def test_one_users_burst_cannot_starve_another_user() -> None:
    rr = RoundRobin()
    burst = [QueuedJob(f"a{i}", "flux", "ann", i, 0.0, rr.tag("ann")) for i in range(20)]
    rr.started(burst[0].fair_tag)  # ann's first job runs
    queue = burst[1:]
    bob = QueuedJob("b0", "flux", "bob", 20, 1.0, rr.tag("bob"))
    queue.append(bob)
    order = [j.job_id for j in fair_order(queue)]
    assert order.index("b0") <= 1  # one of ann's at most, not nineteen
    for scheduler in (AffinityScheduler(), FifoScheduler()):
        picks = drain(scheduler, queue, resident={"flux"})
        if scheduler.name == "affinity":
            assert picks.index("b0") <= 1
        else:
            assert picks[-1] == "b0"  # FIFO makes bob wait for the whole burst


def test_round_robin_gives_no_credit_for_idle_time() -> None:
    rr = RoundRobin()
    tags = [rr.tag("ann") for _ in range(3)]
    for t in tags:
        rr.started(t)
    assert rr.tag("bob") == rr.tag("carl") == tags[-1] + 1
    assert rr.last == {"bob": 4.0, "carl": 4.0}  # ann's entry went once she was caught up


def drain(scheduler: Any, queue: list[QueuedJob], resident: set[str]) -> list[str]:
    out, left, t = [], list(queue), 0.0
    while left:
        pick = scheduler.pick(left, resident, t)
        out.append(pick.job_id)
        left = apply_pick(left, pick, t)
        t += 1
    return out


# -- the fairness bounds as properties over random traces --------------------------------------


def simulate(seed: int, scheduler: Any, *, capacity: int, models: int = 4, users: int = 6, n: int = 120) -> dict[str, Any]:
    """A random trace on a card that holds ``capacity`` models (LRU); loads cost 5x a run.
    Passes are counted here independently of ``apply_pick``."""
    rng = random.Random(seed)
    rr = RoundRobin()
    duration = {f"m{k}": rng.uniform(1, 8) for k in range(models)}
    arrivals, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(1 / 4)
        arrivals.append((t, f"j{i}", f"m{rng.randrange(models)}", f"u{min(rng.randrange(users * 2), users - 1)}"))
    resident: OrderedDict[str, None] = OrderedDict()
    queue: list[QueuedJob] = []
    passes = {a[1]: 0 for a in arrivals}
    passes_after_t = dict(passes)  # passed over although T seconds had gone by since the first time
    first_passed: dict[str, float] = {}
    started: dict[str, float] = {}
    longest = 0.0
    bound_hits = 0  # picks made while some job was at a bound: the bounds were tested, not idle
    now, i = 0.0, 0
    while i < n or queue:
        if not queue:
            now = max(now, arrivals[i][0])
        while i < n and arrivals[i][0] <= now:
            at, jid, model, user = arrivals[i]
            queue.append(QueuedJob(jid, model, user, i, at, rr.tag(user)))
            i += 1
        pick = scheduler.pick(queue, set(resident), now)
        order = fair_order(queue)
        chosen = next(j for j in queue if j.job_id == pick.job_id)
        if isinstance(scheduler, AffinityScheduler):  # FIFO knows no fair order: it passes nobody over
            bound_hits += any(passes[j.job_id] >= scheduler.max_passed_over or (
                j.job_id in first_passed and now - first_passed[j.job_id] >= scheduler.max_extra_wait_s) for j in queue)
            overtaken = order[: order.index(chosen)]
            assert set(pick.passed_over) == {j.job_id for j in overtaken}
            for ahead in overtaken:
                passes[ahead.job_id] += 1
                if ahead.job_id in first_passed and now - first_passed[ahead.job_id] >= scheduler.max_extra_wait_s:
                    passes_after_t[ahead.job_id] += 1
                first_passed.setdefault(ahead.job_id, now)
        queue = apply_pick(queue, pick, now)
        rr.started(chosen.fair_tag)
        started[chosen.job_id] = now
        cost = duration[chosen.model_id]
        if chosen.model_id not in resident:
            cost += 5 * duration[chosen.model_id]
            resident[chosen.model_id] = None
            while len(resident) > capacity:
                resident.popitem(last=False)
        resident.move_to_end(chosen.model_id)
        longest = max(longest, cost)
        now += cost
    return {"passes": passes, "passes_after_t": passes_after_t, "bound_hits": bound_hits, "first_passed": first_passed, "started": started, "longest": longest,
            "order": sorted(started, key=started.__getitem__), "arrival": {a[1]: a[0] for a in arrivals},
            "model": {a[1]: a[2] for a in arrivals}}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("k,t", [(0, 0.0), (2, 30.0), (8, 300.0), (1000, 40.0)])
def test_affinity_never_passes_a_job_over_more_than_k_times_nor_longer_than_t(seed: int, k: int, t: float) -> None:
    run = simulate(seed, AffinityScheduler(k, t), capacity=1 + seed % 2)
    assert len(run["started"]) == 120  # nothing starves
    assert max(run["passes"].values()) <= k
    assert max(run["passes_after_t"].values()) == 0  # once T has run out, nothing behind it starts first


@pytest.mark.parametrize("k,t", [(2, 1e9), (1000, 40.0)])
def test_the_random_traces_do_reach_each_bound(k: int, t: float) -> None:
    assert sum(simulate(seed, AffinityScheduler(k, t), capacity=1)["bound_hits"] for seed in range(12)) > 0


@pytest.mark.parametrize("seed", range(6))
def test_with_k_zero_affinity_is_plain_round_robin(seed: int) -> None:
    zero = simulate(seed, AffinityScheduler(0, 0.0), capacity=1)
    assert max(zero["passes"].values()) == 0


@pytest.mark.parametrize("seed", range(6))
def test_fifo_starts_jobs_in_arrival_order(seed: int) -> None:
    run = simulate(seed, FifoScheduler(), capacity=1)
    assert run["order"] == sorted(run["arrival"], key=run["arrival"].__getitem__)


@pytest.mark.parametrize("seed", range(6))
def test_affinity_loads_less_than_fifo_on_a_one_model_card(seed: int) -> None:
    def loads(scheduler: Any) -> int:
        run = simulate(seed, scheduler, capacity=1, n=80)
        models = [run["model"][jid] for jid in run["order"]]
        return 1 + sum(1 for a, b in zip(models, models[1:]) if a != b)

    assert loads(AffinityScheduler()) < loads(FifoScheduler())


# -- the per-user cap --------------------------------------------------------------------------


def test_the_per_user_cap_refuses_with_a_message_that_states_it() -> None:
    queue = jobs(("flux", "discord:1"), ("flux", "discord:1"), ("flux", "discord:2"))
    check_user_cap(queue, "discord:2", 2)
    with pytest.raises(UserQueueFullError, match="You already have 2 jobs waiting") as caught:
        check_user_cap(queue, "discord:1", 2)
    assert isinstance(caught.value, QueueFullError) and caught.value.limit == 2
    assert "2" in caught.value.user_message


# -- ETA and what is needed soon ---------------------------------------------------------------


def test_plan_gives_positions_and_etas_from_recorded_timings() -> None:
    book = TimingBook(default_generate_s=10, default_load_s=20)
    book.record("flux", generate_s=4.0, load_s=0.0)
    book.record("sdxl", generate_s=2.0, load_s=6.0)
    queue = jobs(("sdxl", "a"), ("flux", "b"), ("flux", "c"))
    planned = plan(AffinityScheduler(), queue, {"flux"}, 100.0, book, busy_for_s=3.0)
    assert [(p.job_id, p.position, p.start_s, p.eta_s, p.loads) for p in planned] == [
        ("j1", 1, 3.0, 7.0, False), ("j2", 2, 7.0, 11.0, False), ("j0", 3, 11.0, 19.0, True)]
    fifo = plan(FifoScheduler(), queue, {"flux"}, 100.0, book)
    assert [p.job_id for p in fifo] == ["j0", "j1", "j2"] and fifo[-1].eta_s == 6 + 2 + 6 + 4 + 4  # flux's load unknown: the mean of the known ones
    assert needed_soon(planned) == ("flux", "sdxl")
    assert len(plan(AffinityScheduler(), queue, {"flux"}, 0.0, book, limit=2)) == 2


def test_timing_book_blends_and_falls_back_to_the_mean() -> None:
    book = TimingBook(weight=0.5)
    book.record("flux", generate_s=4.0, load_s=10.0)
    book.record("flux", generate_s=8.0, load_s=0.0)  # resident run: says nothing about loading
    book.record("sdxl", generate_s=2.0)
    assert book.expected_generate_s("flux") == 6.0 and book.expected_load_s("flux") == 10.0
    assert book.expected_generate_s("new") == 4.0 and book.expected_load_s("new") == 10.0


# -- configuration -----------------------------------------------------------------------------


def test_scheduler_config_is_validated() -> None:
    assert validate_table(SchedulerSettings, {}, "scheduler.") == SchedulerSettings()
    assert validate_table(SchedulerSettings, {"policy": "fifo", "max_passed_over": 0}, "scheduler.").max_passed_over == 0
    with pytest.raises(ConfigError, match=r"`scheduler.policy` is 'random', but it must be one of 'affinity', 'fifo'"):
        validate_table(SchedulerSettings, {"policy": "random"}, "scheduler.")
    with pytest.raises(ConfigError, match=r"`scheduler.max_queued_per_user` is 0, but it must be at least 1"):
        validate_table(SchedulerSettings, {"max_queued_per_user": 0}, "scheduler.")
    with pytest.raises(ConfigError, match=r"`scheduler.max_extra_wait_s` is -5"):
        validate_table(SchedulerSettings, {"max_extra_wait_s": -5}, "scheduler.")
    with pytest.raises(ConfigError, match=r"`scheduler.max_passed_over` is 2.5, but it must be a whole number"):
        validate_table(SchedulerSettings, {"max_passed_over": 2.5}, "scheduler.")
    with pytest.raises(ConfigError, match=r"`scheduler.k`.*not a known key"):
        validate_table(SchedulerSettings, {"k": 3}, "scheduler.")


# -- end to end on the real engine with tiny models ------------------------------------------------


def tiny(tiny_models: Any, tmp_path: Path, **scheduler: Any) -> Any:
    from tests.conftest import make_tiny_config

    config = make_tiny_config(tiny_models, tmp_path / "data")
    return config.model_copy(update={"scheduler": config.scheduler.model_copy(update={**scheduler}),
        "residency": config.residency.model_copy(update={"gpu_budget_gb": 1e-6})})  # one model at a time


class GatedEngine:
    """An Engine whose GPU thread holds its first job until ``open()``, so a queue builds up
    behind it deterministically (the real runner and residency manager do the rest)."""

    def __init__(self, config: Any) -> None:
        from engine import Engine
        from engine.core import JobRunner
        from engine.residency import ResidencyManager

        self.gate = threading.Event()

        def factory(c: Any, device: Any, dtype: Any) -> Any:
            return _GatedRunner(JobRunner(c, ResidencyManager(device, dtype, settings=c.residency)), self.gate)

        self.engine = Engine(config, runner_factory=factory)

    async def started(self, request: Any) -> Any:
        from engine import JobStarted

        handle = await self.engine.submit(request)
        async for event in handle.events():
            if isinstance(event, JobStarted):
                return handle
        raise AssertionError("the first job never started")


class _GatedRunner:
    def __init__(self, real: Any, gate: threading.Event) -> None:
        self.residency, self._real, self._gate = real.residency, real, gate

    def run_blocking(self, *args: Any) -> Any:
        assert self._gate.wait(30), "the test never opened the gate"
        return self._real.run_blocking(*args)


def ask(model: str, user: str = "local", platform: str = "cli") -> Any:
    from engine import JobRequest, Requester

    return JobRequest("a fox", model=model, steps=1, width=64, height=64, requester=Requester(platform, user, user))


async def run_mixed_queue(config: Any) -> tuple[list[str], list[str], int]:
    """A FLUX job holds the GPU while four more queue (users a-d): realvis, flux, realvis, flux."""
    from engine import JobStarted

    gated = GatedEngine(config)
    async with gated.engine as engine:
        feed = engine.subscribe()
        first = await gated.started(ask("flux_dev", "z"))
        handles = [await engine.submit(ask(m, u)) for m, u in
                   (("realvis_xl", "a"), ("flux_dev", "b"), ("realvis_xl", "c"), ("flux_dev", "d"))]
        names = {h.id: f"{h.params.model_id}/{u}" for h, u in zip(handles, "abcd")}
        planned = [names[e.job_id] for e in engine.queue_snapshot() if e.job_id in names]
        gated.gate.set()
        results = [await h.result() for h in [first, *handles]]
        started = []
        while not feed.empty():
            event = feed.get_nowait()
            if isinstance(event, JobStarted) and event.job_id in names:
                started.append(names[event.job_id])
    return started, planned, sum(1 for r in results if r.timings.load_s > 0)


async def test_the_engine_runs_a_mixed_queue_by_affinity_with_fewer_loads(tiny_models: Any, tmp_path: Path) -> None:
    affinity, planned, affinity_loads = await run_mixed_queue(tiny(tiny_models, tmp_path / "a"))
    fifo, _, fifo_loads = await run_mixed_queue(tiny(tiny_models, tmp_path / "f", policy="fifo"))
    assert fifo == ["realvis_xl/a", "flux_dev/b", "realvis_xl/c", "flux_dev/d"]
    assert affinity == ["flux_dev/b", "flux_dev/d", "realvis_xl/a", "realvis_xl/c"] == planned
    assert (affinity_loads, fifo_loads) == (2, 5)


async def test_the_engine_refuses_past_the_per_user_cap_and_shows_etas(tiny_models: Any, tmp_path: Path) -> None:
    gated = GatedEngine(tiny(tiny_models, tmp_path, max_queued_per_user=2))
    async with gated.engine as engine:
        busy = await gated.started(ask("flux_dev"))
        waiting = [await engine.submit(ask("flux_dev", "ann", "discord")) for _ in range(2)]
        with pytest.raises(QueueFullError, match="You already have 2 jobs waiting"):
            await engine.submit(ask("flux_dev", "ann", "discord"))
        other = await engine.submit(ask("sd3_medium", "ann", "slack"))  # another platform, another person
        snapshot = engine.queue_snapshot()
        assert [e.position for e in snapshot] == [0, 1, 2, 3]
        etas = [e.eta_s for e in snapshot]
        assert all(e is not None for e in etas) and etas == sorted(etas)
        gated.gate.set()
        assert all([(await h.result()).png for h in (busy, *waiting, other)])


async def test_preload_pin_and_unload_while_jobs_are_queued(tiny_models: Any, tmp_path: Path) -> None:
    config = tiny(tiny_models, tmp_path)
    gated = GatedEngine(config.model_copy(update={"residency": config.residency.model_copy(update={"gpu_budget_gb": 0})}))
    async with gated.engine as engine:
        busy = await gated.started(ask("flux_dev"))
        queued = [await engine.submit(ask(m)) for m in ("sd3_medium", "flux_dev")]
        preload = asyncio.ensure_future(engine.preload("realvis_xl", pin=True))
        unload = asyncio.ensure_future(engine.unload("flux_dev"))
        await asyncio.sleep(0)
        gated.gate.set()
        assert await preload >= 0.0 and await unload is True  # both ran between two jobs
        assert all([(await h.result()).png for h in (busy, *queued)])
        status = engine.residency_status()
        assert status is not None and status.pinned == ("realvis_xl",)
        assert {r.model_id for r in engine.resident_models()} == {"realvis_xl", "sd3_medium", "flux_dev"}
        await engine.pin("realvis_xl", False)
        assert engine.residency_status().pinned == ()  # type: ignore[union-attr]
