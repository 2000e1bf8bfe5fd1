"""Benchmark, many workers: one trace replayed over N simulated GPU workers (each its own
``SimCard`` and its own REAL residency manager), three ways. Run through bench/scheduler.py:

    python bench/scheduler.py --workers 4 [--json] [--seed 1] [--jobs 200] [--gpu-gb 48] ...
    python bench/scheduler.py --scaling [--json]

    ours         one global queue and fair order; a worker that frees up asks the REAL
                 ``pick_for_worker`` (engine/scheduler/multi.py) for its job
    warm_first   Ray Serve's model-multiplexing routing, as documented and as its request router
                 does it (ray/serve/_private/request_router: "apply_multiplex_routing"): each request
                 is assigned AT ARRIVAL to a replica that reports the model loaded and is under
                 ``max_ongoing_requests`` (5, Serve's default), the one with the shortest queue;
                 failing that (after Serve's 1-2 s matching timeout, negligible here) to the
                 replicas with the fewest models loaded, then any, shortest queue first. Each
                 worker runs its own FIFO queue.
    warm_sticky  a stickier variant, shown for honesty: "warm" also counts the model last
                 assigned to a worker (not loaded yet), and no queue cap: each model sticks to
                 one worker (few loads, long waits: what Serve users report for busy models)
    round_robin  assigned at arrival in turn; each worker runs its own FIFO queue

The trace is bench/scheduler.py's, its arrival rate times N, so the N cards together stay at
``--utilisation``. Throughput (``throughput_per_hour``) is images per hour of GPU work, loads and
generation summed over the workers, as the single-worker table counts it;
``wall_throughput_per_hour`` is images per GPU-hour of wall time, idle included (at 80 %
utilisation, the arrival rate for any policy that keeps up). ``--scaling`` compares 1 worker with
4 on traces of the same length in time: the 4-worker one has 4x the users (each as active as
before), 4x the jobs, so 4x the arrival rate; its throughput is total images per hour of wall
time, NOT per GPU.

The cost model, the placements and the card are bench/scheduler.py's; only the device is
simulated. Every worker's residency decisions use ``needed_soon`` from its own share of the plan
(``plan_workers``; one worker: ``plan``, as the engine does), or, for the baselines, from the
models next in its own FIFO queue.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scheduler import Arrival, JobRecord, Placement, SimCard, _FakeCuda, make_trace, placements

from engine.config import ResidencySettings
from engine.residency import ResidencyManager
from engine.scheduler import (
    QueuedJob,
    RoundRobin,
    Scheduler,
    TimingBook,
    WorkerView,
    apply_pick,
    needed_soon,
    pick_for_worker,
    plan,
    plan_workers,
)


@dataclass
class Worker:
    """One simulated GPU worker: its card, its residency manager, what it runs and (baselines) its own queue."""

    name: str
    card: SimCard
    rm: ResidencyManager
    free_at: float = 0.0
    running: str | None = None
    fifo: list[Arrival] = field(default_factory=list)
    last_assigned: str | None = None

    def view(self, now: float) -> WorkerView:
        resident, parked = self.rm.placement_sets()
        busy = self.free_at > now
        return WorkerView(self.name, resident, parked, None, self.running if busy else None,
                          self.free_at - now if busy else 0.0)

    def backlog(self, now: float) -> int:
        return len(self.fifo) + (self.free_at > now)


def make_workers(n: int, gpu_gb: float, ram_gb: float, reserve_gb: float, plan_: dict[str, Placement]) -> list[Worker]:
    out = []
    for k in range(n):
        card = SimCard(gpu_gb, plan_, seed_rule=False, can_park=ram_gb > 0)
        rm = ResidencyManager(_FakeCuda(), None, ops=card,
                              settings=ResidencySettings(reserve_gb=reserve_gb, cpu_ram_gb=ram_gb))
        out.append(Worker(f"w{k}", card, rm))
    return out


def run_on(worker: Worker, model_id: str, t: float, soon: list[str], book: TimingBook, config: Any,
           plan_: dict[str, Placement]) -> float:
    """The GPU thread's step on ``worker`` at ``t``: residency, then the run. Returns when it ends."""
    card = worker.card
    card.now = t
    before = card.load_s
    worker.rm.acquire_blocking(config.model(model_id), needed_soon=soon)
    generate_s = plan_[model_id].generate_s
    book.record(model_id, generate_s=generate_s, load_s=card.load_s - before)
    card.generate_s += generate_s
    worker.free_at, worker.running = card.now + generate_s, model_id
    return worker.free_at


def simulate_ours(trace: list[Arrival], scheduler: Scheduler, workers: list[Worker], config: Any,
                  plan_: dict[str, Placement]) -> list[JobRecord]:
    """One global queue; each worker that is free asks ``pick_for_worker``, in name order, until none takes a job."""
    book, rr = TimingBook(), RoundRobin()
    queue: list[QueuedJob] = []
    records: list[JobRecord] = []
    started_seqs: list[int] = []
    i, t = 0, 0.0
    while i < len(trace) or queue:
        while i < len(trace) and trace[i].at <= t:
            a = trace[i]
            queue.append(QueuedJob(a.job_id, a.model_id, a.user, i, a.at, rr.tag(a.user)))
            i += 1
        took = True
        while took and queue:
            took = False
            for worker in (w for w in workers if w.free_at <= t):
                others = [w.view(t) for w in workers if w is not worker]
                pick = pick_for_worker(scheduler, queue, worker.view(t), others, t, book)
                if pick is None:
                    continue
                job = next(j for j in queue if j.job_id == pick.job_id)
                queue = apply_pick(queue, pick, t)
                rr.started(job.fair_tag)
                soon = _needed_soon_ours(scheduler, queue, worker, job, workers, t, book)
                finished = run_on(worker, job.model_id, t, soon, book, config, plan_)
                overtaken = sum(1 for s in started_seqs if s > job.seq)
                started_seqs.append(job.seq)
                records.append(JobRecord(job.job_id, job.user_id, job.model_id, job.arrived_at, t, finished,
                                         job.passed_over, overtaken))
                took = True
        t = _next_event(t, workers, trace, i, stuck=bool(queue))
    return records


def _needed_soon_ours(scheduler: Scheduler, queue: list[QueuedJob], worker: Worker, job: QueuedJob,
                      workers: list[Worker], t: float, book: TimingBook) -> list[str]:
    """What this worker's share of the plan needs next, its new job running (the engine's step)."""
    resident, parked = worker.rm.placement_sets()
    if len(workers) == 1:
        return list(needed_soon(plan(scheduler, queue, resident | {job.model_id}, t, book, parked=parked, limit=8)))
    views = [w.view(t) for w in workers]
    views[workers.index(worker)] = WorkerView(worker.name, resident | {job.model_id}, parked, None, job.model_id,
                                              book.expected_generate_s(job.model_id))
    planned = plan_workers(scheduler, queue, views, t, book, limit=8 * len(workers))
    return list(needed_soon([p for p in planned if p.worker == worker.name]))


def simulate_assigned(trace: list[Arrival], workers: list[Worker], assign: Callable[[Arrival, list[Worker], float], Worker],
                      config: Any, plan_: dict[str, Placement]) -> list[JobRecord]:
    """The baselines: each job goes to a worker as it arrives; each worker runs its own queue in order."""
    book = TimingBook()
    records: list[JobRecord] = []
    started_seqs: list[int] = []
    seq = {a.job_id: k for k, a in enumerate(trace)}
    i, t = 0, 0.0
    while i < len(trace) or any(w.fifo for w in workers):
        while i < len(trace) and trace[i].at <= t:
            worker = assign(trace[i], workers, t)
            worker.fifo.append(trace[i])
            worker.last_assigned = trace[i].model_id
            i += 1
        for worker in (w for w in workers if w.free_at <= t and w.fifo):
            a = worker.fifo.pop(0)
            soon = list(dict.fromkeys(b.model_id for b in worker.fifo[:8]))
            finished = run_on(worker, a.model_id, t, soon, book, config, plan_)
            overtaken = sum(1 for s in started_seqs if s > seq[a.job_id])
            started_seqs.append(seq[a.job_id])
            records.append(JobRecord(a.job_id, a.user, a.model_id, a.at, t, finished, 0, overtaken))
        t = _next_event(t, workers, trace, i, stuck=any(w.fifo for w in workers))
    return records


def _next_event(t: float, workers: list[Worker], trace: list[Arrival], i: int, *, stuck: bool) -> float:
    upcoming = [w.free_at for w in workers if w.free_at > t] + ([trace[i].at] if i < len(trace) else [])
    if not upcoming and stuck:
        raise RuntimeError("jobs wait, no worker is busy and nothing arrives: a worker idled for good")
    return min(upcoming, default=t)


SERVE_MAX_ONGOING = 5  # Ray Serve's default max_ongoing_requests per replica


def warm_first(a: Arrival, workers: list[Worker], t: float) -> Worker:
    """Serve's multiplexed routing: replicas with the model loaded and room, then the replicas with
    the fewest models, then any; the shortest queue among them (Serve samples two: this is kinder)."""
    room = [w for w in workers if w.backlog(t) < SERVE_MAX_ONGOING]
    loaded = [w for w in room if a.model_id in w.rm.placement_sets()[0]]
    if loaded:
        return min(loaded, key=lambda w: w.backlog(t))
    fewest = min((len(w.rm.placement_sets()[0]) for w in room), default=0)
    emptiest = [w for w in room if len(w.rm.placement_sets()[0]) == fewest]
    return min(emptiest or room or workers, key=lambda w: w.backlog(t))


def warm_sticky(a: Arrival, workers: list[Worker], t: float) -> Worker:
    warm = [w for w in workers if a.model_id in w.rm.placement_sets()[0] or w.last_assigned == a.model_id]
    return min(warm or workers, key=lambda w: w.backlog(t))


def round_robin() -> Callable[[Arrival, list[Worker], float], Worker]:
    turn = itertools.count()
    return lambda a, workers, t: workers[next(turn) % len(workers)]


def summarise_workers(records: list[JobRecord], workers: list[Worker], *, per_gpu: bool = True) -> dict[str, Any]:
    waits = sorted(r.started - r.arrived for r in records)
    makespan = max(r.finished for r in records) - min(r.arrived for r in records)
    busy_s = sum(w.card.load_s + w.card.generate_s for w in workers)
    return {
        "loads": sum(w.card.loads for w in workers),
        "ram_copies": sum(w.card.copies for w in workers),
        "load_s_total": round(sum(w.card.load_s for w in workers), 1),
        # per GPU: images per hour of GPU work (loads + generation), as the single-worker table
        # counts it; else (--scaling) images per hour of wall time, all workers together
        "throughput_per_hour": round(len(records) * 3600 / (busy_s if per_gpu else makespan), 1),
        "wall_throughput_per_hour": round(len(records) * 3600 / (makespan * (len(workers) if per_gpu else 1)), 1),
        "wait_mean_s": round(statistics.fmean(waits), 1),
        "wait_p95_s": round(waits[min(len(waits) - 1, math.ceil(0.95 * len(waits)) - 1)], 1),
        "wait_max_s": round(waits[-1], 1),
        "max_passed_over": max(r.passed_over for r in records),
        "max_overtaken_by_later_arrivals": max(r.overtaken for r in records),
        "makespan_s": round(makespan, 1),
        "images": len(records),
    }


def run_workers(args: argparse.Namespace, scheduler: Scheduler, config: Any) -> dict[str, Any]:
    """``--workers N``: ours against warm_first and round_robin on one trace at N x the arrival rate."""
    n = args.workers
    plan_ = placements(args.gpu_gb, args.reserve_gb)
    trace = make_trace(args.seed, args.jobs, args.users, args.utilisation * n, plan_, args.favourite)
    cards = dict(gpu_gb=args.gpu_gb, ram_gb=args.ram_gb, reserve_gb=args.reserve_gb, plan_=plan_)
    out: dict[str, Any] = {}
    workers = make_workers(n, **cards)
    out["ours"] = summarise_workers(simulate_ours(trace, scheduler, workers, config, plan_), workers)
    for name, assign in (("warm_first", warm_first), ("warm_sticky", warm_sticky), ("round_robin", round_robin())):
        workers = make_workers(n, **cards)
        out[name] = summarise_workers(simulate_assigned(trace, workers, assign, config, plan_), workers)
    o, w = out["ours"], out["warm_first"]
    out["targets"] = {
        "loads_vs_warm_first": round(o["loads"] / max(1, w["loads"]), 2),
        "throughput_vs_warm_first": round(o["throughput_per_hour"] / w["throughput_per_hour"], 2),
        "met": o["loads"] <= 0.6 * w["loads"] and o["throughput_per_hour"] >= 1.15 * w["throughput_per_hour"]
               and o["wait_max_s"] <= w["wait_max_s"],
    }
    out["setup"] = _setup(args, plan_) | {"workers": n, "throughput": "images per hour of GPU work (loads + generation)"}
    return out


def run_scaling(args: argparse.Namespace, scheduler: Scheduler, config: Any) -> dict[str, Any]:
    """``--scaling``: our policy on 1 worker against 4 workers with 4x the users, jobs and arrival rate."""
    plan_ = placements(args.gpu_gb, args.reserve_gb)
    cards = dict(gpu_gb=args.gpu_gb, ram_gb=args.ram_gb, reserve_gb=args.reserve_gb, plan_=plan_)
    out: dict[str, Any] = {}
    for n in (1, 4):
        trace = make_trace(args.seed, args.jobs * n, args.users * n, args.utilisation * n, plan_, args.favourite)
        workers = make_workers(n, **cards)
        out[f"workers_{n}"] = summarise_workers(simulate_ours(trace, scheduler, workers, config, plan_), workers,
                                                per_gpu=False)
    out["scaling"] = round(out["workers_4"]["throughput_per_hour"] / out["workers_1"]["throughput_per_hour"], 2)
    out["setup"] = _setup(args, plan_) | {
        "throughput": "total images per hour of wall time (not per GPU)",
        "workers_4_trace": "4x the users (each as active), 4x the jobs, 4x the arrival rate"}
    return out


def _setup(args: argparse.Namespace, plan_: dict[str, Placement]) -> dict[str, Any]:
    return {"seed": args.seed, "jobs": args.jobs, "users": args.users, "utilisation": args.utilisation,
            "gpu_gb": args.gpu_gb, "ram_gb": args.ram_gb, "reserve_gb": args.reserve_gb,
            "placements": {m: p.placement for m, p in plan_.items()}}


def print_workers(out: dict[str, Any]) -> None:
    s = out["setup"]
    print(f"SIMULATED: {s['workers']} workers, {s['gpu_gb']} GB cards, seed {s['seed']}, {s['jobs']} jobs, "
          f"{s['users']} users, utilisation {s['utilisation']} per card; throughput = {s['throughput']}")
    cols = ["loads", "ram_copies", "throughput_per_hour", "wait_mean_s", "wait_p95_s", "wait_max_s",
            "max_passed_over", "max_overtaken_by_later_arrivals"]
    print("| policy | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name in ("ours", "warm_first", "warm_sticky", "round_robin"):
        print(f"| {name} | " + " | ".join(str(out[name][c]) for c in cols) + " |")
    t = out["targets"]
    print(f"ours vs warm_first: {t['loads_vs_warm_first']}x the loads (target <= 0.6), "
          f"{t['throughput_vs_warm_first']}x the throughput (target >= 1.15), max wait {out['ours']['wait_max_s']} s "
          f"against {out['warm_first']['wait_max_s']} s: targets {'met' if t['met'] else 'NOT met'}")


def print_scaling(out: dict[str, Any]) -> None:
    s = out["setup"]
    print(f"SIMULATED: {s['gpu_gb']} GB cards, seed {s['seed']}; throughput = {s['throughput']}; "
          f"the 4-worker trace: {s['workers_4_trace']}")
    for name in ("workers_1", "workers_4"):
        r = out[name]
        print(f"{name}: {r['images']} images, {r['throughput_per_hour']} images/hour, loads {r['loads']}, "
              f"wait p95 {r['wait_p95_s']} s, max {r['wait_max_s']} s")
    print(f"4 workers / 1 worker: {out['scaling']}x (target >= 3.5x)")


if __name__ == "__main__":
    from scheduler import main

    main()
