"""Many GPU workers draining one queue (engine/scheduler/multi.py): each rule by hand, then
properties over random traces for 1-4 workers - bounds hold exactly, every job runs once, on a
worker its model fits, and a free worker idles only under the second-copy rule."""

from __future__ import annotations

import dataclasses
import random
from collections import OrderedDict
from typing import Any

import pytest

from engine.scheduler import (
    AffinityScheduler,
    FifoScheduler,
    QueuedJob,
    RoundRobin,
    TimingBook,
    WorkerView,
    apply_pick,
    fair_order,
    pick_for_worker,
    plan,
    plan_workers,
)
from engine.scheduler.multi import SECOND_COPY_LOADS
from tests.test_plan import MODELS
from tests.test_plan import book as book_from
from tests.test_plan import random_queue



def jobs(*spec: tuple[str, str]) -> list[QueuedJob]:
    """``("flux", "ann"), ...`` -> queued jobs j0, j1, ... with round-robin tags."""
    rr = RoundRobin()
    return [QueuedJob(f"j{i}", model, user, i, float(i), rr.tag(user)) for i, (model, user) in enumerate(spec)]


def book(generate: float = 10.0, load: float = 20.0) -> TimingBook:
    b = TimingBook()
    for m in MODELS:
        b.record(m, generate_s=generate, load_s=load)
    return b


def w(name: str, *resident: str, **kw: Any) -> WorkerView:
    return WorkerView(name, frozenset(resident), **kw)


# -- each rule, by hand ----------------------------------------------------------------------------


def test_resident_comes_first_and_counts_everyone_it_overtakes() -> None:
    queue = jobs(("sdxl", "a"), ("flux", "b"), ("sd3", "c"))
    pick = pick_for_worker(AffinityScheduler(), queue, w("a", "sd3"), [w("b", "flux")], 0.0, book())
    assert pick is not None and (pick.job_id, pick.passed_over, pick.reason) == ("j2", ("j0", "j1"), "resident")


def test_parked_in_this_workers_ram_beats_a_disk_load() -> None:
    queue = jobs(("sdxl", "a"), ("sd3", "b"))
    pick = pick_for_worker(AffinityScheduler(), queue, w("a", parked=frozenset({"sd3"})), [], 0.0, book())
    assert pick is not None and (pick.job_id, pick.reason) == ("j1", "parked")


def test_a_model_warm_nowhere_is_loaded_before_a_second_copy_of_a_warm_one() -> None:
    queue = jobs(("flux", "a"), ("sd3", "b"))
    others = [w("b", busy_model="flux", busy_left_s=5.0)]
    pick = pick_for_worker(AffinityScheduler(), queue, w("a"), others, 0.0, book())
    assert pick is not None and (pick.job_id, pick.passed_over, pick.reason) == ("j1", ("j0",), "load")


def test_a_second_copy_is_loaded_only_when_the_backlog_outlasts_three_loads() -> None:
    # 3 flux jobs x 10 s on the one holder, busy 5 s more: 35 s of backlog; a copy needs 3 loads of it
    queue = jobs(("flux", "a"), ("flux", "b"), ("flux", "c"))
    busy = [w("b", "flux", busy_model="flux", busy_left_s=5.0)]
    assert SECOND_COPY_LOADS == 3.0
    long_load = pick_for_worker(AffinityScheduler(), queue, w("a"), busy, 0.0, book(load=11.7))
    short_load = pick_for_worker(AffinityScheduler(), queue, w("a"), busy, 0.0, book(load=11.6))
    assert long_load is None  # waiting for the holder is as quick as a copy: this worker idles
    assert short_load is not None and (short_load.job_id, short_load.reason) == ("j0", "second_copy")


def test_the_backlog_is_split_among_the_holders_and_a_free_holder_adds_no_wait() -> None:
    queue = jobs(("flux", "a"), ("flux", "b"), ("flux", "c"), ("flux", "d"))
    two_holders = [w("b", "flux", busy_model="flux", busy_left_s=5.0), w("c", parked=frozenset({"flux"}))]
    assert pick_for_worker(AffinityScheduler(), queue, w("a"), two_holders, 0.0, book(load=6.7)) is None  # 40/2 < 3 x 6.7
    pick = pick_for_worker(AffinityScheduler(), queue, w("a"), two_holders, 0.0, book(load=6.6))
    assert pick is not None and pick.reason == "second_copy"


def test_a_job_at_its_bound_runs_here_even_when_its_model_is_warm_elsewhere() -> None:
    queue = jobs(("flux", "a"), ("sd3", "b"))
    queue[0] = dataclasses.replace(queue[0], passed_over=4, first_passed_at=0.0)
    others = [w("b", "flux", busy_model="sd3", busy_left_s=1.0)]
    s = AffinityScheduler(max_passed_over=2, max_extra_wait_s=1e9)  # 2 passes per worker: 4 over two
    pick = pick_for_worker(s, queue, w("a", "sd3"), others, 1.0, book(load=1e6))
    assert pick is not None and (pick.job_id, pick.reason) == ("j0", "bound")  # not j1, although sd3 is resident
    below = AffinityScheduler(max_passed_over=3, max_extra_wait_s=1e9)
    pick = pick_for_worker(below, queue, w("a", "sd3"), others, 1.0, book(load=1e6))
    assert pick is not None and (pick.job_id, pick.reason) == ("j1", "resident")


def test_a_job_is_never_sent_to_a_card_its_model_does_not_fit() -> None:
    queue = jobs(("logo", "a"), ("sd3", "b"))
    small = w("a", fits=frozenset({"sd3", "flux"}))
    pick = pick_for_worker(AffinityScheduler(), queue, small, [], 0.0, book())
    assert pick is not None and (pick.job_id, pick.passed_over, pick.reason) == ("j1", ("j0",), "load")
    assert pick_for_worker(FifoScheduler(), queue, small, [], 0.0, book()).job_id == "j1"  # type: ignore[union-attr]
    assert pick_for_worker(FifoScheduler(), queue[:1], small, [], 0.0, book()) is None


def test_a_bound_job_that_does_not_fit_blocks_what_is_behind_it_but_not_what_is_ahead() -> None:
    queue = jobs(("sd3", "a"), ("logo", "b"), ("flux", "c"))
    queue[1] = dataclasses.replace(queue[1], passed_over=2, first_passed_at=0.0)  # K x 2 workers
    small = w("a", "flux", fits=frozenset({"sd3", "flux"}))
    s = AffinityScheduler(max_passed_over=1, max_extra_wait_s=1e9)
    pick = pick_for_worker(s, queue, small, [w("b", "logo", busy_model="logo", busy_left_s=3.0)], 0.0, book())
    assert pick is not None and (pick.job_id, pick.reason) == ("j0", "load")  # flux j2 is behind the bound
    assert pick_for_worker(s, queue[1:], small, [], 0.0, book()) is None


def test_fifo_takes_the_first_fitting_job_by_arrival() -> None:
    queue = jobs(("sdxl", "a"), ("flux", "b"))
    pick = pick_for_worker(FifoScheduler(), queue[::-1], w("a", "flux"), [w("b")], 0.0, book())
    assert pick is not None and (pick.job_id, pick.reason) == ("j0", "fifo")


def test_two_workers_each_run_their_resident_model_without_a_load() -> None:
    queue = jobs(("flux", "a"), ("sd3", "b"), ("flux", "c"), ("sd3", "d"))
    planned = plan_workers(AffinityScheduler(), queue, [w("a", "flux"), w("b", "sd3")], 0.0, book())
    assert [(p.job_id, p.worker, p.start_s, p.loads) for p in planned] == [
        ("j0", "a", 0.0, False), ("j1", "b", 0.0, False), ("j2", "a", 10.0, False), ("j3", "b", 10.0, False)]


def test_the_plan_loads_a_second_copy_for_a_long_backlog() -> None:
    queue = jobs(*[("flux", f"u{i}") for i in range(6)])
    planned = plan_workers(AffinityScheduler(), queue, [w("a", "flux"), w("b", "sd3")], 0.0, book(load=12.0))
    assert {p.worker for p in planned} == {"a", "b"}  # 50 s of backlog behind the first: more than 3 loads
    assert max(p.eta_s for p in planned) < 60.0  # one worker alone would take 6 x 10 s


def test_a_job_no_worker_can_run_stays_out_of_the_plan() -> None:
    queue = jobs(("logo", "a"), ("flux", "b"), ("sd3", "c"))
    small = [w("a", fits=frozenset({"flux", "sd3"})), w("b", "sd3", fits=frozenset({"flux", "sd3"}))]
    planned = plan_workers(AffinityScheduler(max_passed_over=100), queue, small, 0.0, book())
    assert sorted(p.job_id for p in planned) == ["j1", "j2"]


def test_the_plan_ends_even_when_every_worker_would_idle_for_good() -> None:
    # b lists flux as resident but cannot run it (views that disagree): a waits for b, b never takes it
    queue = jobs(("flux", "a"))
    workers = [w("a"), w("b", "flux", fits=frozenset({"sd3"}))]
    assert pick_for_worker(AffinityScheduler(), queue, workers[0], workers[1:], 0.0, book(load=1e6)) is None
    planned = plan_workers(AffinityScheduler(), queue, workers, 0.0, book(load=1e6))
    assert [(p.job_id, p.worker, p.loads) for p in planned] == [("j0", "a", True)]


def test_another_policy_picks_among_the_jobs_that_fit_as_if_alone() -> None:
    class OwnAffinity(AffinityScheduler):
        """Not the shipped type: pick_for_worker hands it the fitting jobs, no second-copy rule."""

    queue = jobs(("logo", "a"), ("flux", "b"), ("sd3", "c"))
    pick = pick_for_worker(OwnAffinity(), queue, w("a", "sd3", fits=frozenset({"flux", "sd3"})),
                           [w("b", "sd3")], 0.0, book())
    assert pick is not None and (pick.job_id, pick.passed_over, pick.reason) == ("j2", ("j1",), "resident")


# -- one worker is the single-worker policy (random queues and books: tests/test_plan.py's) ----------


def test_one_worker_alone_picks_exactly_what_the_policy_picks() -> None:
    for seed in range(300):
        rng = random.Random(seed)
        now = 1000.0
        queue = random_queue(rng, rng.randint(1, 60), now)
        resident = frozenset(rng.sample(MODELS, rng.randint(0, 2)))
        parked = frozenset(rng.sample(MODELS, rng.randint(0, 2))) - resident
        alone = WorkerView("w", resident, parked)
        for s in (AffinityScheduler(rng.choice([0, 1, 3, 8]), rng.choice([0.0, 5.0, 60.0, 300.0])), FifoScheduler()):
            assert pick_for_worker(s, queue, alone, [], now, book_from(rng)) == s.pick(queue, resident, now, parked), seed


def test_plan_workers_with_one_worker_is_replay_plan() -> None:
    for seed in range(80):
        rng = random.Random(seed)
        now = 1000.0
        queue = random_queue(rng, rng.randint(0, 80), now)
        resident = frozenset(rng.sample(MODELS, rng.randint(0, 2)))
        parked = frozenset(rng.sample(MODELS, rng.randint(0, 2))) - resident
        busy_model = rng.choice(sorted(resident)) if resident and rng.random() < 0.5 else None
        busy = rng.uniform(0, 20) if busy_model else 0.0
        timings = book_from(rng)
        one = WorkerView("w", resident, parked, busy_model=busy_model, busy_left_s=busy)
        for s in (AffinityScheduler(rng.choice([0, 1, 3, 8]), rng.choice([0.0, 5.0, 60.0, 300.0])), FifoScheduler()):
            single = plan(s, queue, resident, now, timings, parked=parked, busy_for_s=busy)
            multi = plan_workers(s, queue, [one], now, timings)
            assert [dataclasses.replace(p, worker="") for p in multi] == single, seed
            assert {p.worker for p in multi} <= {"w"}


def test_plan_workers_positions_are_a_permutation_in_start_order() -> None:
    for seed in range(60):
        rng = random.Random(seed)
        queue = random_queue(rng, rng.randint(0, 80), 1000.0)
        workers = [WorkerView(f"w{k}", frozenset(rng.sample(MODELS, rng.randint(0, 2))),
                              busy_model=rng.choice([None, *MODELS]), busy_left_s=rng.uniform(0, 30))
                   for k in range(rng.randint(1, 4))]
        planned = plan_workers(AffinityScheduler(rng.choice([0, 2, 8]), 300.0), queue, workers, 1000.0,
                               book_from(rng))
        assert sorted(p.job_id for p in planned) == sorted(j.job_id for j in queue)
        assert [p.position for p in planned] == list(range(1, len(planned) + 1))
        assert all(0 <= p.start_s < p.eta_s for p in planned)
        assert [p.start_s for p in planned] == sorted(p.start_s for p in planned)
        limit = rng.randint(0, 5)
        assert plan_workers(AffinityScheduler(), queue, workers, 1000.0, TimingBook(), limit=limit) == \
            plan_workers(AffinityScheduler(), queue, workers, 1000.0, TimingBook())[:limit]


# -- properties over random traces, with a small event simulation -----------------------------------


def simulate(seed: int, scheduler: Any, n_workers: int, n: int = 100) -> dict[str, Any]:
    """A random trace over ``n_workers`` cards, each holding one or two models (LRU), some too
    small for some models; loads cost 3x a run. Passes, bounds and the idle rule are checked
    here from their definitions, not from the scheduler's own helpers."""
    rng = random.Random(seed)
    rr = RoundRobin()
    generate = {m: rng.uniform(1, 8) for m in MODELS}
    timings = TimingBook()
    for m in MODELS:
        timings.record(m, generate_s=generate[m], load_s=3 * generate[m])
    fits: list[frozenset[str] | None] = [None if rng.random() < 0.5 else frozenset(rng.sample(MODELS, 2))
                                         for _ in range(n_workers)]
    runnable = set(MODELS) if any(f is None for f in fits) else set().union(*[f for f in fits if f is not None])
    models = sorted(runnable)  # the engine refuses a job whose model fits no card
    capacity = [rng.randint(1, 2) for _ in range(n_workers)]
    ready: list[OrderedDict[str, None]] = [OrderedDict() for _ in range(n_workers)]
    free_at = [0.0] * n_workers
    running: list[str | None] = [None] * n_workers
    arrivals, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(n_workers / 5)
        arrivals.append((t, f"j{i}", rng.choice(models), f"u{min(rng.randrange(12), 5)}"))
    k, bound_t = getattr(scheduler, "max_passed_over", 0), getattr(scheduler, "max_extra_wait_s", 0.0)
    passes: dict[str, int] = {a[1]: 0 for a in arrivals}
    first_passed: dict[str, float] = {}
    late_passes = 0  # passes of a job whose T had run out
    started: dict[str, tuple[float, int]] = {}
    reasons: dict[str, int] = {}
    queue: list[QueuedJob] = []
    now, i = 0.0, 0

    def view(wk: int) -> WorkerView:
        busy = free_at[wk] > now
        return WorkerView(f"w{wk}", frozenset(ready[wk]), frozenset(), fits[wk], running[wk] if busy else None,
                          free_at[wk] - now if busy else 0.0)

    def at_bound(job: QueuedJob) -> bool:  # the pass bound scales with the workers: K x N
        return passes[job.job_id] >= k * n_workers or (job.job_id in first_passed and now - first_passed[job.job_id] >= bound_t)

    while i < n or queue:
        while i < n and arrivals[i][0] <= now:
            at, jid, model, user = arrivals[i]
            queue.append(QueuedJob(jid, model, user, i, at, rr.tag(user)))
            i += 1
        progressed = True
        while progressed and queue:
            progressed = False
            for wk in (x for x in range(n_workers) if free_at[x] <= now):
                me, others = view(wk), [view(x) for x in range(n_workers) if x != wk]
                pick = pick_for_worker(scheduler, queue, me, others, now, timings)
                if pick is None:
                    if isinstance(scheduler, AffinityScheduler):
                        check_idle_is_the_second_copy_rule(queue, me, others, timings, at_bound)
                    else:
                        assert not any(me.can_run(j.model_id) for j in queue)  # FIFO idles only when nothing fits
                    reasons["idle"] = reasons.get("idle", 0) + 1
                    continue
                job = next(j for j in queue if j.job_id == pick.job_id)
                assert me.can_run(job.model_id), "sent to a card its model does not fit"
                assert job.job_id not in started
                if isinstance(scheduler, AffinityScheduler):
                    order = fair_order(queue)
                    ahead = order[: order.index(job)]
                    assert set(pick.passed_over) == {j.job_id for j in ahead}
                    for j in ahead:
                        late_passes += j.job_id in first_passed and now - first_passed[j.job_id] >= bound_t
                        passes[j.job_id] += 1
                        first_passed.setdefault(j.job_id, now)
                reasons[pick.reason] = reasons.get(pick.reason, 0) + 1
                queue = apply_pick(queue, pick, now)
                rr.started(job.fair_tag)
                started[job.job_id] = (now, wk)
                cost = generate[job.model_id]
                if job.model_id not in ready[wk]:
                    cost += 3 * generate[job.model_id]
                    ready[wk][job.model_id] = None
                    while len(ready[wk]) > capacity[wk]:
                        ready[wk].popitem(last=False)
                ready[wk].move_to_end(job.model_id)
                free_at[wk], running[wk] = now + cost, job.model_id
                progressed = True
        upcoming = [f for f in free_at if f > now] + ([arrivals[i][0]] if i < n else [])
        assert upcoming or not queue, "every worker idles, none is busy, nothing arrives: the queue is stuck"
        if upcoming:
            now = min(upcoming)
    return {"passes": passes, "late_passes": late_passes, "started": started, "reasons": reasons, "n": n,
            "arrival": {a[1]: a[0] for a in arrivals}}


def check_idle_is_the_second_copy_rule(queue: list[QueuedJob], me: WorkerView, others: list[WorkerView],
                                       timings: TimingBook, at_bound: Any) -> None:
    """A free worker idles only when every allowed job it could run has its model warm on another
    worker, whose backlog is no longer than a load, and no job at a bound fits here."""
    allowed = []
    for job in fair_order(queue):
        allowed.append(job)
        if at_bound(job):
            assert not me.can_run(job.model_id), "idled while a job at its bound fits here"
            break
    for job in (j for j in allowed if me.can_run(j.model_id)):
        holders = [o for o in others if job.model_id in o.resident | o.parked or o.busy_model == job.model_id]
        assert holders, f"idled while {job.job_id}'s model is warm nowhere"
        assert job.model_id not in me.resident | me.parked
        work = sum(timings.expected_generate_s(job.model_id) for j in queue if j.model_id == job.model_id)
        wait = min(o.busy_left_s for o in holders) if all(o.busy_model for o in holders) else 0.0
        assert work / len(holders) + wait <= SECOND_COPY_LOADS * timings.expected_load_s(job.model_id)


@pytest.mark.parametrize("n_workers", [1, 2, 3, 4])
@pytest.mark.parametrize("k,t", [(0, 0.0), (2, 30.0), (8, 300.0), (1000, 40.0)])
def test_affinity_over_many_workers_keeps_every_bound_and_runs_every_job_once(n_workers: int, k: int, t: float) -> None:
    for seed in range(15):
        run = simulate(seed, AffinityScheduler(k, t), n_workers)
        assert len(run["started"]) == run["n"]
        assert max(run["passes"].values()) <= k * n_workers, seed
        assert run["late_passes"] == 0, seed


@pytest.mark.parametrize("n_workers", [1, 2, 3, 4])
def test_fifo_over_many_workers_starts_fitting_jobs_in_arrival_order(n_workers: int) -> None:
    for seed in range(10):
        run = simulate(seed, FifoScheduler(), n_workers)
        assert len(run["started"]) == run["n"]
        if n_workers == 1:
            order = sorted(run["started"], key=lambda j: run["started"][j])
            assert order == sorted(run["arrival"], key=run["arrival"].__getitem__)


def test_the_random_traces_exercise_every_rule() -> None:
    seen: dict[str, int] = {}
    for seed in range(15):
        for n_workers in (2, 3, 4):
            for s in (AffinityScheduler(2, 30.0), AffinityScheduler(1000, 40.0)):
                for reason, count in simulate(seed, s, n_workers)["reasons"].items():
                    seen[reason] = seen.get(reason, 0) + count
    assert {"resident", "load", "second_copy", "bound", "idle"} <= {r for r, c in seen.items() if c > 0}, seen
