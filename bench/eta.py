"""Benchmark: how right the ETA given at submit is, on a replayed mixed trace through the real Engine.

    python bench/eta.py [--mode sim|tiny] [--history-jobs N] [--jobs N] [--gap S] [--seed 3] [--scale 0.05]

Two ways to replay, the same measurement:

``sim`` (the default, the figure in docs/PERFORMANCE.md): the real Engine (submit, scheduler,
plan, ETAs, SQLite history, restart) in front of a *simulated GPU*: a runner whose jobs take
what the production models take on one H200-class GPU, in wall-clock sleeps scaled by
``--scale`` (0.05: a 20 s job takes 1 s; errors are reported back in GPU seconds). The cost
model it simulates, per model: seconds per step per megapixel, a fixed part per job (text
encoders, VAE decode, safety checks, PNG) and a load time from disk:

    flux_dev     0.18 s/step/MP (measured: 0.106 s/step at 768x768, bench/previews.py --real-step)
    realvis_xl   0.092 s/step/MP (measured: 0.054 s/step at 768x768 with CFG)
    sd3_medium   0.12 s/step/MP (assumed), logo_sdxl (HiDream, sequential offload) 3.4 (assumed)
    fixed        1.2 / 0.6 / 0.9 / 4.0 s; loads 25 / 8 / 12 / 60 s; three models fit, HiDream alone

with per-job noise (log-normal, sigma 0.1 on the step time, 0.2 on loads) and a safety retry
(the whole generation again) for 4% of jobs. Requests: 8 users, flux 45% / sdxl 30% / sd3 20%
/ HiDream 5%, each model's default steps for 70% of jobs and 8 to 50 otherwise, 768x768 for
60% and 512 or 768 px sides otherwise. First ``--history-jobs`` run one by one and are recorded;
then the engine is restarted on the same data folder (ETAs seeded from that history) and
``--jobs`` arrive at exponential gaps (mean ``--gap`` GPU seconds), so a queue builds up.

``tiny``: the tiny twins on this CPU, no simulation: real pipelines, but seconds-long jobs
whose timing swings with whatever else the machine runs.

At each submit, four estimates of the seconds until the image are taken at the same instant
and compared with when the image came:

- ``engine ETA``: this issue's, the ``JobQueued.eta_s`` the status message shows: per-job cost
  (steps x megapixels per model, fitted on recorded jobs), the running job's own pace, the
  scheduler's order and expected loads; none while a model on the way has no record.
- ``per-model mean``: the same plan, each job priced at its model's mean (the TimingBook alone).
- ``old engine``: the engine before this issue: the TimingBook unseeded (defaults 10 s/20 s
  until jobs finish in this process), ``expected - elapsed`` for the running job.
- ``old status message``: what status messages showed before the engine gave ETAs: the bot's
  former EtaBook (history means, queue order, the running job counted half done), kept below
  as ``OldStatusBook`` because the bot no longer has it.

Reports, per estimate: coverage (jobs given an ETA), mean absolute error, mean signed error
(+ = the image came earlier than said), and p50/p90 relative error ``|eta - actual| / actual``;
and the engine ETA's last refresh before each job started (as the queue moved), against the
time from that refresh.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MIX = (("flux_dev", 0.4), ("realvis_xl", 0.3), ("sd3_medium", 0.2), ("logo_sdxl", 0.1))  # the tiny replay


# -- the simulated GPU -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SimModel:
    share: float
    per_step_mp: float  # seconds per step per megapixel
    fixed: float  # seconds per job besides the steps
    load: float  # seconds from disk
    exclusive: bool = False


SIM = {
    "flux_dev": SimModel(0.45, 0.18, 1.2, 25.0),
    "realvis_xl": SimModel(0.30, 0.092, 0.6, 8.0),
    "sd3_medium": SimModel(0.20, 0.12, 0.9, 12.0),
    "logo_sdxl": SimModel(0.05, 3.4, 4.0, 60.0, exclusive=True),
}
SIM_CAPACITY = 3  # models resident at once (HiDream: alone)
RETRY_SHARE = 0.04


class SimResidency:
    """What the engine asks of the residency manager, for the simulated GPU."""

    def __init__(self) -> None:
        self.ready: list[str] = []  # least recently used first

    def snapshot(self) -> tuple[Any, ...]:
        from engine.residency import ResidentModel

        return tuple(ResidentModel(m, "gpu", 0, 0.0, 0.0) for m in list(self.ready))

    def placement_sets(self) -> tuple[frozenset[str], frozenset[str]]:
        return frozenset(self.ready), frozenset()

    def set_needed_soon(self, models: Any) -> None:
        return None

    def unload_all_blocking(self) -> None:
        self.ready.clear()

    def status(self) -> None:
        return None


class SimRunner:
    """``JobRunner`` as the engine calls it; sleeps what the real models would take, scaled."""

    def __init__(self, scale: float, seed: int) -> None:
        self.residency = SimResidency()
        self.scale = scale
        self.rng = random.Random(seed)
        self.png = _tiny_png()

    def _sleep(self, seconds: float) -> float:
        time.sleep(seconds * self.scale)
        return seconds

    def run_blocking(self, job_id: str, params: Any, on_step: Any, cancel: Any, nsfw_allowed: bool = False,
                     on_attempt: Any = None, on_preview: Any = None) -> Any:
        from engine.core import RunOutput

        model = SIM[params.model_id]
        started = time.perf_counter()
        ready = self.residency.ready
        if params.model_id in ready:
            ready.remove(params.model_id)
            load_s = 0.0
        else:
            if model.exclusive or any(SIM[m].exclusive for m in ready):
                ready.clear()
            del ready[: max(0, len(ready) - SIM_CAPACITY + 1)]
            self._sleep(model.load * self.rng.lognormvariate(0, 0.2))
            load_s = time.perf_counter() - started
        ready.append(params.model_id)
        generating = time.perf_counter()
        step_s = model.per_step_mp * params.width * params.height / 1e6 * self.rng.lognormvariate(0, 0.1)
        for _ in range(2 if self.rng.random() < RETRY_SHARE else 1):  # a safety retry: all again
            self._sleep(model.fixed * 0.3)  # text encoders
            for step in range(1, params.steps + 1):
                self._sleep(step_s)
                on_step(step, params.steps)
            self._sleep(model.fixed * 0.7)  # VAE decode, safety checks, PNG
        return RunOutput(self.png, params.width, params.height, load_s, time.perf_counter() - generating, params)


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "gray").save(buffer, format="PNG")
    return buffer.getvalue()


def sim_request(rng: random.Random, n: int, config: Any) -> Any:
    from engine import JobRequest, Requester

    model = rng.choices(list(SIM), [m.share for m in SIM.values()])[0]
    steps = config.model(model).steps if rng.random() < 0.7 else rng.choice([8, 12, 16, 20, 28, 40, 50])
    width, height = rng.choice([(768, 768)] * 6 + [(768, 512), (512, 768), (512, 512), (640, 768)])
    user = f"user{rng.randrange(8)}"
    return JobRequest(f"trace job {n}", model=model, steps=steps, width=width, height=height, seed=n,
                      requester=Requester("bench", user, user))


def sim_config(data_dir: Path) -> Any:
    from engine.config import load_config

    config = load_config(REPO / "config.toml", env={})
    return config.model_copy(update={"device": "cpu", "data_dir": data_dir})


def tiny_config(device: str, data_dir: Path) -> Any:
    from engine.config import load_config, with_tiny_models
    from engine.tiny import ensure_tiny_models

    config = load_config(REPO / "config.toml", env={})
    config = config.model_copy(update={"device": device,
        "data_dir": data_dir,
        "limits": config.limits.model_copy(update={"min_image_side": 64})})
    return with_tiny_models(config, ensure_tiny_models(Path(tempfile.gettempdir()) / "promptpics-bench-tiny"))


def make_request(rng: random.Random, n: int) -> Any:
    from engine import JobRequest, Requester

    model = rng.choices([m for m, _ in MIX], [w for _, w in MIX])[0]
    if model == "logo_sdxl":  # the tiny HiDream is slow on a CPU: keep it short
        steps, side = rng.choice([2, 3]), 64
    else:
        steps, side = rng.choice([2, 4, 8, 12, 16]), rng.choice([64, 128, 192, 256])
    user = f"user{rng.randrange(6)}"
    return JobRequest(f"trace job {n}", model=model, steps=steps, width=side, height=side, seed=n,
                      requester=Requester("bench", user, user))


def old_engine_eta(engine: Any, job_id: str, book: Any) -> float | None:
    """The engine's queue_snapshot ETA before this issue, with ``book`` an unseeded TimingBook."""
    from engine.scheduler import plan

    now = time.perf_counter()
    running, busy = next(iter(engine._running.values()), None), 0.0
    if running is not None and running.started_mono is not None:
        busy = max(0.0, book.expected_generate_s(running.params.model_id) - (now - running.started_mono))
    resident, parked = engine._workers[0].placement_sets()
    if running is not None:
        resident |= {running.params.model_id}
    for p in plan(engine._scheduler, [j.view() for j in engine._queue], resident, now, book, parked=parked,
                  busy_for_s=busy):
        if p.job_id == job_id:
            return p.eta_s
    return None


def per_model_eta(engine: Any, job_id: str) -> float | None:
    """The same plan as the engine ETA, each job at its model's mean (seeded TimingBook)."""
    from engine.scheduler import plan

    now = time.perf_counter()
    running = next(iter(engine._running.values()), None)
    resident, parked = engine._workers[0].placement_sets()
    if running is not None:  # its model is ready once it finishes
        resident |= {running.params.model_id}
    return next((p.eta_s for p in plan(engine._scheduler, [j.view() for j in engine._queue], resident, now,
                                       engine._timings, parked=parked, busy_for_s=engine._left_s(running, now))
                 if p.job_id == job_id), None)


async def record_history(config: Any, jobs: int, rng: random.Random, request: Any, factory: Any) -> None:
    from engine import Engine

    async with Engine(config, runner_factory=factory) as engine:
        for n in range(jobs):
            await (await engine.submit(request(rng, n))).result()


class OldStatusBook:
    """The bot's former EtaBook (removed when the engine's ETAs replaced it), kept as a baseline:
    seconds per model seeded from the history's means, smoothed over finished jobs; a job's ETA
    is the sum over the queue ahead in queue order, the running job counted half done."""

    def __init__(self, smoothing: float = 0.3) -> None:
        self._seconds: dict[str, float] = {}
        self._smoothing = smoothing

    def seed(self, stats: Any) -> None:
        for s in stats:
            if s.mean_generate_s is not None:
                self._seconds.setdefault(s.model_id, s.mean_generate_s)

    def observe(self, model_id: str, seconds: float) -> None:
        old = self._seconds.get(model_id)
        self._seconds[model_id] = seconds if old is None else old + self._smoothing * (seconds - old)

    def finish_times(self, entries: Any) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        total: float | None = 0.0
        for e in entries:
            each = self._seconds.get(e.model_id)
            if total is not None and each is not None:
                total += each / 2 if e.position == 0 else each
            else:
                total = None
            out[e.job_id] = total
        return out


async def replay(config: Any, jobs: int, gap: float, rng: random.Random, request: Any, factory: Any) -> dict[str, Any]:
    from engine import Engine, JobFinished, JobStarted
    from engine.jobs import FINAL_EVENTS
    from engine.scheduler import TimingBook

    estimates: dict[str, dict[str, float | None]] = {}
    submitted_at: dict[str, float] = {}
    finished_at: dict[str, float] = {}
    started_at: dict[str, float] = {}
    refreshed: dict[str, tuple[float | None, float]] = {}  # job -> (ETA, when), the last before it started
    status_book, old_book = OldStatusBook(), TimingBook()
    async with Engine(config, runner_factory=factory) as engine:
        status_book.seed(await engine.history.model_stats())
        events = engine.subscribe()
        done = asyncio.Event()

        async def watch() -> None:
            while True:
                event = await events.get()
                now = time.perf_counter()
                if isinstance(event, JobStarted):  # the queue moved: what the others' status would now say
                    started_at.setdefault(event.job_id, now)
                    for j in list(engine._queue):
                        if j.id in submitted_at:
                            refreshed[j.id] = (engine.eta(j.id), now)
                if isinstance(event, JobFinished):
                    finished_at[event.job_id] = now
                    t = event.result.timings
                    status_book.observe(event.result.params.model_id, t.load_s + t.generate_s)
                    old_book.record(event.result.params.model_id, generate_s=t.generate_s, load_s=t.load_s)
                if isinstance(event, FINAL_EVENTS) and event.job_id in submitted_at and \
                        len(finished_at) == jobs:
                    done.set()

        watcher = asyncio.create_task(watch())
        handles = []
        for n in range(jobs):
            await asyncio.sleep(rng.expovariate(1 / gap))
            handle = await engine.submit(request(rng, 1000 + n))
            now = time.perf_counter()
            submitted_at[handle.id] = now
            queued = await handle.events().__anext__()
            estimates[handle.id] = {
                "engine ETA": queued.eta_s,
                "per-model mean": per_model_eta(engine, handle.id),
                "old engine": old_engine_eta(engine, handle.id, old_book),
                "old status message": status_book.finish_times(engine.queue_snapshot()).get(handle.id),
            }
            handles.append(handle)
        for handle in handles:
            await handle.result()
        await asyncio.sleep(0.05)
        watcher.cancel()
    actual = {j: finished_at[j] - submitted_at[j] for j in submitted_at if j in finished_at}
    after_refresh = [(eta, finished_at[j] - when) for j, (eta, when) in refreshed.items()
                     if eta is not None and j in finished_at]
    # jobs that arrived later and still started first (round-robin over users, model affinity):
    # what no ETA given at submit can know
    overtaken = {j: sum(1 for k in submitted_at if submitted_at[k] > submitted_at[j]
                        and started_at.get(k, float("inf")) < started_at.get(j, float("inf"))) for j in submitted_at}
    return {"estimates": estimates, "actual": actual, "after_refresh": after_refresh, "overtaken": overtaken}


def summarise(name: str, pairs: list[tuple[float, float]], total: int) -> str:
    if not pairs:
        return f"| {name} | 0/{total} | - | - | - | - |"
    errors = [eta - actual for eta, actual in pairs]
    relative = sorted(abs(e) / actual for e, (_, actual) in zip(errors, pairs))
    mae = statistics.mean(abs(e) for e in errors)
    bias = statistics.mean(errors)
    p50 = relative[len(relative) // 2]
    p90 = relative[min(len(relative) - 1, int(round(0.9 * (len(relative) - 1))))]
    return f"| {name} | {len(pairs)}/{total} | {mae:.2f} | {bias:+.2f} | {p50:.0%} | {p90:.0%} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("sim", "tiny"), default="sim")
    parser.add_argument("--history-jobs", type=int, default=None, help="sim: 60, tiny: 16")
    parser.add_argument("--jobs", type=int, default=None, help="sim: 150, tiny: 40")
    parser.add_argument("--gap", type=float, default=None, help="mean seconds between arrivals (sim: 8, tiny: 0.35)")
    parser.add_argument("--scale", type=float, default=0.05, help="sim: wall seconds per simulated GPU second")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="tiny: where the twins run")
    args = parser.parse_args()
    sim = args.mode == "sim"
    history_jobs = args.history_jobs if args.history_jobs is not None else (60 if sim else 16)
    jobs = args.jobs if args.jobs is not None else (150 if sim else 40)
    gap = args.gap if args.gap is not None else (8.0 if sim else 0.35)
    scale = args.scale if sim else 1.0

    import logging

    logging.basicConfig(level=logging.WARNING)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="promptpics-eta-") as folder:
        if sim:
            config = sim_config(Path(folder) / "data")
            runner = SimRunner(scale, args.seed)
            factory: Any = lambda c, device, dtype: runner  # one GPU across the restart: the models stay loaded
            request: Any = lambda r, n: sim_request(r, n, config)
        else:
            config = tiny_config(args.device, Path(folder) / "data")
            factory, request = None, make_request
        started = time.perf_counter()
        asyncio.run(record_history(config, history_jobs, rng, request, factory))
        out = asyncio.run(replay(config, jobs, gap * scale, rng, request, factory))
        wall = time.perf_counter() - started

    unit = 1 / scale  # back to GPU seconds
    estimates = {j: {k: None if v is None else v * unit for k, v in e.items()} for j, e in out["estimates"].items()}
    actual = {j: a * unit for j, a in out["actual"].items()}
    after_refresh = [(eta * unit, a * unit) for eta, a in out["after_refresh"]]
    total = len(actual)
    what = f"simulated H200-class GPU, time scale {scale}" if sim else f"tiny twins on {args.device}"
    print(f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPU cores, {what}, {time.strftime('%Y-%m-%d')}; "
          f"load average {os.getloadavg()[0]:.1f}; {history_jobs} jobs of history, then a restart and {total} "
          f"replayed (seed {args.seed}, mean gap {gap} s); submit to image: mean {statistics.mean(actual.values()):.1f} s, "
          f"max {max(actual.values()):.1f} s; {wall:.0f} s of wall time\n")
    print("| estimate | jobs with an ETA | MAE (s) | mean error (s) | p50 rel. error | p90 rel. error |")
    print("|---|---|---|---|---|---|")
    names = list(next(iter(estimates.values())))
    for name in names:
        pairs = [(e[name], actual[j]) for j, e in estimates.items() if e[name] is not None and j in actual]
        print(summarise(name, pairs, total))
    print(summarise("engine ETA, last refresh before start", after_refresh, len(after_refresh)))
    overtaken = out["overtaken"]
    for label, keep in (("not overtaken", lambda n: n == 0), ("overtaken by later arrivals", lambda n: n > 0)):
        pairs = [(e["engine ETA"], actual[j]) for j, e in estimates.items()
                 if e["engine ETA"] is not None and j in actual and keep(overtaken[j])]
        print(summarise(f"engine ETA, jobs {label}", pairs, len(pairs)))
    common = [j for j, e in estimates.items() if j in actual and all(v is not None for v in e.values())]
    if len(common) < total:
        print(f"\nOn the {len(common)} jobs every estimate covers:\n")
        print("| estimate | jobs | MAE (s) | mean error (s) | p50 rel. error | p90 rel. error |")
        print("|---|---|---|---|---|---|")
        for name in names:
            print(summarise(name, [(estimates[j][name], actual[j]) for j in common], len(common)))  # type: ignore[misc]


if __name__ == "__main__":
    main()
