"""Benchmark: FIFO against model affinity, replaying one mixed trace through the REAL scheduler
(engine/scheduler/) and the REAL residency manager (engine/residency/) on a simulated card.

    python bench/scheduler.py [--seed 1] [--jobs 200] [--users 10] [--utilisation 0.8]
                              [--gpu-gb 48] [--ram-gb 0] [--placement bf16|auto] [--json]
    python bench/scheduler.py --workers N | --scaling [--json] ...   (bench/scheduler_workers.py)

Only the device is simulated: a ``DeviceOps`` whose loads, copies and runs advance a clock by the
cost model below instead of moving tensors. Every decision - which job runs, what is evicted,
parked, reloaded, when an out-of-memory retry happens - is made by the production code.

The policies compared (``--json`` has one object per row, keyed by its name):

    fifo        arrival order + the seed's residency rule (keep everything; a load that does
                not fit runs out of memory, which unloads every other model and retries once).
                A failed load is charged nothing, which flatters this baseline.
    fifo_budget arrival order + the new residency manager (budget, cost rule, RAM tier)
    affinity    the affinity scheduler + the new residency manager (the default configuration)

The trace (reproducible from ``--seed``): Poisson arrivals; ``--users`` users with Zipf-like
activity (the busiest sends about a third of the jobs: a burst the round-robin must absorb);
each job's model follows the global mix below (``--favourite F``: each user sends a fraction F
of their jobs to one favourite model, a less mixed queue). ``--utilisation``: arrival rate x
mean generate seconds, i.e. how busy the card would be if it never had to load a model.
Per-user queue caps are off here (refusals would hide waits).

Throughput is images per hour of GPU time (loads, copies and generation; idle time waiting for
arrivals left out): what the card sustains on this mix while the queue is not empty. The
wall-clock rate (jobs / (last finish - first arrival)) is reported too, as
``wall_throughput_per_hour``; it is capped by the arrival rate for any policy that keeps up.
A wait is the time from submission until the GPU thread takes the job (its load included in
the next figure, latency).

Cost model, RTX 4090-class compute (AD102; the default 48 GB card is the RTX 6000 Ada / L40S,
the same chip with twice the memory), 768x768, bf16, default steps. Sources:
  [P] docs/PERFORMANCE.md: H200 seconds per denoising step of each full-size denoiser, and its
      parameter bytes; the other components' bytes are their published parameter counts x 2.
  [C] public 4090 figures: FLUX.1-dev fp16 1024x1024 about 0.7 s/step (1.4 it/s; ownrig.com
      "10-15 s per image"), SDXL 1024x1024 about 8-10 it/s (SD.Next / Tom's Hardware
      benchmarks; ownrig.com: 2-3 s per image on a 5090); SD3 Medium and FLUX from
      gigagpu.com's 5090 comparison (6.8 s and 8.2 s at 1024x1024, 28 steps). 768x768 is
      about 0.6x the work of 1024x1024. The transformers' per-step time is taken as 4x the
      H200's [P] (4090: 165 dense bf16 TFLOP/s against the H200's 989, at better utilisation).
  [D] loading from disk: 2.5 GB/s + 2 s per pipeline (safetensors plus pipeline construction).
      Measured here (bench/residency_gpu.py, H200 host): the 23.8 GB FLUX transformer in 14.1 s
      cold (1.7 GB/s) and 3.8 s from the page cache; FlashPack's diffusers PR #12999: 3.7 s warm.
  [R] the RAM tier keeps page-locked copies (engine/residency/): the first parking of a model
      pins its buffers (1.4 GB/s, measured), every copy after that runs at 25 GB/s + 0.2 s
      (pinned copies over PCIe 4.0 x16; the H200 host measured 50-55 GB/s over PCIe 5).

Per card, each model gets the placement an admin would configure: whole on the GPU if it fits
the budget, else model CPU offload if its largest component fits, else sequential offload
(HiDream on a 24-32 GB card). Offload adds the PCIe streaming of its weights to every image.

``--placement auto``: ``fifo_budget`` and ``affinity`` run with the placement planner's plan
(engine/placement/: quantisation and offload per model for this card); ``fifo`` stays the seed's
baseline, FIFO with the bf16 placements above, on the same trace. Quantised costs, none measured
(no GPU was lent; bench/quant_gpu.py is ready to measure them):
  [Q] seconds per step x engine.placement.STEP_FACTOR (fp8 1.01, int8 1.10: diffusers-torchao's
      H100/A100 tables, no compile; nf4 1.30: an assumption on the slow side), sizes from
      engine/placement/catalogue.py (8-bit 0.52 of bf16, nf4 0.28);
  [L] a quantised load reads the bf16 files (as [D]) and quantises at 2 GB/s of bf16 weights:
      diffusers' torchao path quantises on the CPU while it loads; measured here, int8
      weight-only of 1.07 GB of bf16 Linear weights (torchao 0.18, Xeon) runs at 0.17 GB/s on
      one thread and 0.29 GB/s on two, so 2 GB/s assumes a 16-core host at ~75 % scaling.
      Parking a quantised model goes through pageable memory at 1.8 GB/s (measured for
      pipe.to("cpu"), engine/residency/device.py): torchao's tensor subclasses cannot be copied
      into the pinned buffers.
  [K] the quantised cache (engine/pipelines/quant_cache.py, on by default): the first load of a
      model quantises as [L] and then writes its int8/fp8 parts at 2 GB/s (an NVMe write; an
      assumption); every later load reads those parts' quantised bytes at [D]'s rate and
      quantises only nf4 parts. Each policy's run starts with an empty cache. ``--no-quant-cache``
      charges every load as [L].

Besides loads, ``gb_to_card`` counts the weight bytes moved onto the card: each load's and RAM
copy's, plus what offload streams for every image (model offload: every weight once; sequential
offload: every weight, and the transformer again at every step). A model under sequential
offload is never "loaded" but moves the most bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.config import ModelSpec, ResidencySettings, load_config  # noqa: E402
from engine.errors import OutOfMemoryError  # noqa: E402
from engine.pipelines import LoadedPipeline  # noqa: E402
from engine.placement import STEP_FACTOR, plan_placements  # noqa: E402
from engine.placement.catalogue import quantised_gb as quantised_part_gb  # noqa: E402
from engine.residency import GiB, ResidencyManager  # noqa: E402
from engine.scheduler import (  # noqa: E402
    AffinityScheduler,
    FifoScheduler,
    QueuedJob,
    RoundRobin,
    Scheduler,
    TimingBook,
    apply_pick,
    needed_soon,
    plan,
)

GB = 1e9  # the cost model speaks decimal GB, as the sources do
DISK_GBPS, DISK_FIXED_S = 2.5, 2.0
PCIE_GBPS, PCIE_FIXED_S = 25.0, 0.2  # pinned host memory <-> GPU
PIN_ALLOC_GBPS = 1.4  # page-locking new host buffers, once per model
RELEASE_S = 0.2  # gc + empty_cache
QUANTISE_GBPS = 2.0  # [L] bf16 weights quantised per second while loading (from 0.17 GB/s a core, measured)
CACHE_WRITE_GBPS = 2.0  # [K] writing the quantised parts to the cache (assumption)
PAGEABLE_GBPS = 1.8  # [L] pipe.to("cpu") / back, pageable memory (measured, H200 host)
FAMILY = {"flux_dev": "flux", "realvis_xl": "sdxl", "sd3_medium": "sd3", "logo_sdxl": "hidream"}


@dataclass(frozen=True)
class ModelCost:
    """One model on the 4090-class card: component bytes, seconds per step, steps, extras."""

    components_gb: dict[str, float]
    s_per_step: float  # denoising, on the card, weights resident
    steps: int
    extra_s: float  # text encoders + VAE decode
    share: float  # of the global mix

    @property
    def total_gb(self) -> float:
        return sum(self.components_gb.values())

    @property
    def largest_gb(self) -> float:
        return max(self.components_gb.values())


T5, CLIP_L, CLIP_G, VAE = 9.52, 0.25, 1.39, 0.17  # bf16 GB: 4.76B, 123M, 695M, 84M parameters
COSTS = {
    # FLUX.1-dev: 11.9B transformer [P]; 4x H200 0.102 s/step [P], matching ~0.42 s/step at 768 from [C]
    "flux_dev": ModelCost({"transformer": 23.8, "t5": T5, "clip": CLIP_L, "vae": VAE}, 0.41, 24, 0.8, 0.40),
    # RealVisXL (SDXL): 2.57B UNet [P]; ~12 it/s at 768x768 with CFG [C]
    "realvis_xl": ModelCost({"unet": 5.13, "clip_l": CLIP_L, "clip_g": CLIP_G, "vae": VAE}, 0.085, 24, 0.5, 0.30),
    # SD3 Medium: 2B transformer [P]; 4x H200 0.030 s/step [P]
    "sd3_medium": ModelCost({"transformer": 4.06, "t5": T5, "clip_l": CLIP_L, "clip_g": CLIP_G, "vae": VAE},
                            0.12, 30, 0.6, 0.20),
    # HiDream-I1 Full: 17B transformer [P] + Llama-3.1-8B; 4x H200 0.220 s/step [P]
    "logo_sdxl": ModelCost({"transformer": 34.21, "llama": 16.06, "t5": T5, "clip_l": CLIP_L, "clip_g": CLIP_G,
                            "vae": VAE}, 0.88, 20, 1.5, 0.10),
}


# -- the card ---------------------------------------------------------------------------------


@dataclass
class Placement:
    placement: str  # "gpu", "model-offload", "sequential-offload"
    device_gb: float  # what it holds on the card while ready
    generate_s: float
    quantised_gb: float = 0.0  # bf16 GB quantised while loading ([L])
    total_gb: float = 0.0  # every weight once loaded (0: the bf16 total)
    label: str = ""
    cacheable_bf16_gb: float = 0.0  # [K] the int8/fp8 parts, bf16 GB ...
    cacheable_gb: float = 0.0  # ... and quantised: what the cache holds and a cached load reads
    stream_gb: float = 0.0  # moved onto the card by offload for every image


def auto_placements(gpu_gb: float, reserve_gb: float, ram_gb: float, exclusive: list[str],
                    shares: dict[str, float] | None = None) -> dict[str, Placement]:
    """The placement planner's plan for this card (``shares``: the trace's jobs per model), with its cost model ([Q], [L])."""
    plan_ = plan_placements(FAMILY, gpu_gb, reserve_gb=reserve_gb, ram_gb=ram_gb, exclusive=exclusive, shares=shares)
    out = {}
    for mid, p in plan_.models.items():
        c = COSTS[mid]
        denoise = c.s_per_step * STEP_FACTOR[p.denoiser] * c.steps + c.extra_s
        parts = {"transformer", "unet", *p.text_encoders}
        quants = {name: _quant_of(p, name) for name in _parts_gb(mid) if name in parts}
        quantised = sum(gb for name, gb in _parts_gb(mid).items() if quants.get(name, "bf16") != "bf16")
        cacheable = {name: gb for name, gb in _parts_gb(mid).items() if quants.get(name) in ("int8", "fp8")}
        cache = dict(cacheable_bf16_gb=sum(cacheable.values()),
                     cacheable_gb=sum(quantised_part_gb(gb, quants[name]) for name, gb in cacheable.items()))
        label = f"{p.denoiser}/{'+'.join(q for q in p.text_encoders.values() if q != 'bf16') or '-'}/{p.offload}"
        if p.offload == "none":
            out[mid] = Placement("gpu", p.gb, denoise, quantised, p.total_gb, label, **cache)
        elif p.offload == "model":
            out[mid] = Placement("model-offload", p.gb, denoise + p.total_gb / PCIE_GBPS, quantised, p.total_gb, label,
                                 **cache, stream_gb=p.total_gb)
        else:
            transformer = c.components_gb.get("transformer", c.largest_gb)
            out[mid] = Placement("sequential-offload", 0.0, denoise + (c.total_gb + transformer * c.steps) / PCIE_GBPS,
                                 0.0, c.total_gb, label, stream_gb=c.total_gb + transformer * c.steps)
    return out


def _parts_gb(mid: str) -> dict[str, float]:
    from engine.placement import COMPONENTS_GB

    return dict(COMPONENTS_GB[FAMILY[mid]])


def _quant_of(p: Any, name: str) -> str:
    return p.denoiser if name in ("transformer", "unet") else p.text_encoders.get(name, "bf16")


def placements(gpu_gb: float, reserve_gb: float) -> dict[str, Placement]:
    budget = (gpu_gb - reserve_gb) * GiB / GB
    out = {}
    for mid, c in COSTS.items():
        denoise = c.s_per_step * c.steps + c.extra_s
        stream_s = c.total_gb / PCIE_GBPS
        if c.total_gb <= budget:
            out[mid] = Placement("gpu", c.total_gb, denoise)
        elif c.largest_gb <= budget:  # each part crosses once
            out[mid] = Placement("model-offload", c.largest_gb, denoise + stream_s, stream_gb=c.total_gb)
        else:
            transformer = c.components_gb.get("transformer", c.largest_gb)  # streamed every step
            out[mid] = Placement("sequential-offload", 0.0, denoise + stream_s + transformer / PCIE_GBPS * c.steps,
                                 stream_gb=c.total_gb + transformer * c.steps)
    return out


@dataclass
class SimCard:
    """``DeviceOps`` on a simulated card: every operation advances ``now`` by its cost."""

    total_gb: float
    plan: dict[str, Placement]
    seed_rule: bool  # no budget: the card's size is found out by running out of memory
    can_park: bool
    quant_cache: bool = True  # [K]
    keeps_host_copy: bool = True
    pinned: set[str] = field(default_factory=set)  # models with page-locked RAM buffers
    now: float = 0.0
    on_card: dict[str, float] = field(default_factory=dict)
    loads: int = 0
    load_s: float = 0.0
    copies: int = 0
    ooms: int = 0
    generate_s: float = 0.0
    gb_to_card: float = 0.0
    cached: set[str] = field(default_factory=set)  # [K] models whose parts the cache holds

    def _fit(self, mid: str, phase: str) -> None:
        need = self.plan[mid].device_gb
        if sum(self.on_card.values()) + need > self.total_gb * GiB / GB:
            self.ooms += 1
            raise OutOfMemoryError(mid, phase)
        self.on_card[mid] = need

    def _spend(self, seconds: float) -> None:
        self.now += seconds
        self.load_s += seconds

    def load(self, spec: ModelSpec, device: Any, dtype: Any) -> LoadedPipeline:
        self._fit(spec.id, "loading")
        c, p = COSTS[spec.id], self.plan[spec.id]
        self.loads += 1
        self.gb_to_card += p.device_gb
        if self.quant_cache and p.cacheable_gb and spec.id in self.cached:  # [K] read back
            read_gb = c.total_gb - p.cacheable_bf16_gb + p.cacheable_gb
            self._spend(read_gb / DISK_GBPS + DISK_FIXED_S + (p.quantised_gb - p.cacheable_bf16_gb) / QUANTISE_GBPS)
        else:
            self._spend(c.total_gb / DISK_GBPS + DISK_FIXED_S + p.quantised_gb / QUANTISE_GBPS)
            if self.quant_cache and p.cacheable_gb:  # [K] written once
                self._spend(p.cacheable_gb / CACHE_WRITE_GBPS)
                self.cached.add(spec.id)
        return LoadedPipeline(spec, None, device, dtype, p.placement, int((p.total_gb or c.total_gb) * GB), 0.0)

    def release(self, loaded: LoadedPipeline) -> None:
        self.on_card.pop(loaded.spec.id, None)
        self.pinned.discard(loaded.spec.id)
        self._spend(RELEASE_S)

    def park(self, loaded: LoadedPipeline) -> None:
        gb = self.on_card.pop(loaded.spec.id, 0.0)
        if loaded.placement == "gpu" and self.plan[loaded.spec.id].quantised_gb:
            self._spend(gb / PAGEABLE_GBPS)  # [L] no pinned copy for tensor subclasses
        elif loaded.placement == "gpu":
            if loaded.spec.id not in self.pinned:
                self.pinned.add(loaded.spec.id)
                self._spend(gb / PIN_ALLOC_GBPS)
            self._spend(gb / PCIE_GBPS + PCIE_FIXED_S)

    def forget_host_copy(self, loaded: LoadedPipeline) -> None:
        self.pinned.discard(loaded.spec.id)

    def unpark(self, loaded: LoadedPipeline) -> None:
        self._fit(loaded.spec.id, "loading")
        self.copies += 1
        self.gb_to_card += self.plan[loaded.spec.id].device_gb
        if loaded.placement == "gpu" and self.plan[loaded.spec.id].quantised_gb:
            self._spend(self.plan[loaded.spec.id].device_gb / PAGEABLE_GBPS)
        elif loaded.placement == "gpu":
            self._spend(self.plan[loaded.spec.id].device_gb / PCIE_GBPS + PCIE_FIXED_S)

    def offload(self, loaded: LoadedPipeline) -> bool:
        return False  # the cost model never runs out of memory while generating

    def free_bytes(self) -> int | None:
        return None if self.seed_rule else int((self.total_gb * GiB / GB - sum(self.on_card.values())) * GB)

    def allocated_bytes(self) -> int | None:
        return int(sum(self.on_card.values()) * GB)

    def clear_cache(self) -> None:
        pass

    def expected_bytes(self, spec: ModelSpec, dtype: Any) -> int | None:
        return int(self.plan[spec.id].device_gb * GB)

    def device_bytes(self, loaded: LoadedPipeline, measured: int | None) -> int:
        return int(self.plan[loaded.spec.id].device_gb * GB)


# -- the trace --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    job_id: str
    at: float
    user: str
    model_id: str


def make_trace(seed: int, jobs: int, users: int, utilisation: float, plan_: dict[str, Placement],
               favourite_share: float = 0.0) -> list[Arrival]:
    rng = random.Random(seed)
    models = list(COSTS)
    mix = [COSTS[m].share for m in models]
    activity = [1 / (k + 1) for k in range(users)]  # Zipf: user 0 sends the most
    favourite = {f"u{k}": rng.choices(models, mix)[0] for k in range(users)}
    mean_generate = sum(COSTS[m].share * plan_[m].generate_s for m in models)
    rate = utilisation / mean_generate
    t, out = 0.0, []
    for i in range(jobs):
        t += rng.expovariate(rate)
        user = f"u{rng.choices(range(users), activity)[0]}"
        model = favourite[user] if rng.random() < favourite_share else rng.choices(models, mix)[0]
        out.append(Arrival(f"j{i:04d}", t, user, model))
    return out


# -- one run ----------------------------------------------------------------------------------


@dataclass
class JobRecord:
    job_id: str
    user: str
    model_id: str
    arrived: float
    started: float
    finished: float
    passed_over: int
    overtaken: int  # jobs that arrived later but started first


def simulate(trace: list[Arrival], scheduler: Scheduler, *, seed_rule: bool, gpu_gb: float, ram_gb: float,
             reserve_gb: float, config: Any, plan_: dict[str, Placement] | None = None,
             quant_cache: bool = True) -> tuple[list[JobRecord], SimCard]:
    plan_ = plan_ or placements(gpu_gb, reserve_gb)
    card = SimCard(gpu_gb, plan_, seed_rule, can_park=ram_gb > 0 and not seed_rule, quant_cache=quant_cache)
    settings = ResidencySettings(reserve_gb=reserve_gb, cpu_ram_gb=0.0 if seed_rule else ram_gb)
    rm = ResidencyManager(_FakeCuda(), None, ops=card, settings=settings)
    book = TimingBook()
    rr = RoundRobin()
    queue: list[QueuedJob] = []
    arrivals = iter(trace)
    pending = next(arrivals, None)
    by_id = {a.job_id: a for a in trace}
    started_seqs: list[int] = []
    records: list[JobRecord] = []
    t = 0.0
    while pending is not None or queue:
        if not queue and pending is not None:
            t = max(t, pending.at)
        while pending is not None and pending.at <= t:
            seq = int(pending.job_id[1:])
            queue.append(QueuedJob(pending.job_id, pending.model_id, pending.user, seq, pending.at, rr.tag(pending.user)))
            pending = next(arrivals, None)
        # the dispatcher's step, as engine/core/dispatch.py does it
        resident, parked = rm.placement_sets()
        pick = scheduler.pick(queue, resident, t, parked)
        job = next(j for j in queue if j.job_id == pick.job_id)
        queue = apply_pick(queue, pick, t)
        rr.started(job.fair_tag)
        soon = needed_soon(plan(scheduler, queue, resident | {job.model_id}, t, book, parked=parked, limit=8))
        # the GPU thread's step: residency, then the run
        card.now = t
        spent_before = card.load_s
        rm.acquire_blocking(config.model(job.model_id), needed_soon=soon)
        load_s = card.load_s - spent_before
        generate_s = plan_[job.model_id].generate_s
        card.gb_to_card += plan_[job.model_id].stream_gb
        book.record(job.model_id, generate_s=generate_s, load_s=load_s)
        finished = card.now + generate_s
        card.generate_s += generate_s
        overtaken = sum(1 for s in started_seqs if s > job.seq)
        started_seqs.append(job.seq)
        records.append(JobRecord(job.job_id, job.user_id, job.model_id, by_id[job.job_id].at, t, finished,
                                 job.passed_over, overtaken))
        t = finished
    return records, card


class _FakeCuda:
    type = "cuda"


def summarise(records: list[JobRecord], card: SimCard) -> dict[str, Any]:
    waits = sorted(r.started - r.arrived for r in records)
    latency = [r.finished - r.arrived for r in records]
    makespan = max(r.finished for r in records) - min(r.arrived for r in records)
    return {
        "loads": card.loads,
        "ram_copies": card.copies,
        "load_s_total": round(card.load_s, 1),
        "gb_to_card": round(card.gb_to_card),
        "out_of_memory_retries": card.ooms,
        "throughput_per_hour": round(len(records) * 3600 / (card.load_s + card.generate_s), 1),
        "wall_throughput_per_hour": round(len(records) * 3600 / makespan, 1),
        "wait_mean_s": round(statistics.fmean(waits), 1),
        "wait_p95_s": round(waits[min(len(waits) - 1, math.ceil(0.95 * len(waits)) - 1)], 1),
        "wait_max_s": round(waits[-1], 1),
        "latency_mean_s": round(statistics.fmean(latency), 1),
        "max_passed_over": max(r.passed_over for r in records),
        "max_overtaken_by_later_arrivals": max(r.overtaken for r in records),
        "makespan_s": round(makespan, 1),
    }


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(REPO / "config.toml", env={})
    sched_settings = config_scheduler_settings()
    plan_ = placements(args.gpu_gb, args.reserve_gb)
    trace = make_trace(args.seed, args.jobs, args.users, args.utilisation, plan_, args.favourite)
    common = dict(gpu_gb=args.gpu_gb, ram_gb=args.ram_gb, reserve_gb=args.reserve_gb, config=config,
                  quant_cache=not args.no_quant_cache)
    affinity = AffinityScheduler(sched_settings.max_passed_over, sched_settings.max_extra_wait_s)
    exclusive = [mid for mid, spec in config.models.items() if spec.exclusive]
    shares = {m: sum(a.model_id == m for a in trace) / len(trace) for m in COSTS}  # what the history would say
    chosen = auto_placements(args.gpu_gb, args.reserve_gb, args.ram_gb, exclusive, shares) if args.placement == "auto" else plan_
    out: dict[str, Any] = {}
    for name, scheduler, seed_rule in (("fifo", FifoScheduler(), True), ("fifo_budget", FifoScheduler(), False),
                                       ("affinity", affinity, False)):
        # the seed's baseline keeps the bf16 placements; the others run the chosen plan
        out[name] = summarise(*simulate(trace, scheduler, seed_rule=seed_rule, **common,
                                        plan_=plan_ if name == "fifo" else chosen))
    mean_generate = sum(COSTS[m].share * plan_[m].generate_s for m in COSTS)
    f, a = out["fifo"], out["affinity"]
    ratio_target = 1.5 if args.placement == "auto" and args.gpu_gb <= 24 else 1.25
    no_sequential = not (args.placement == "auto" and args.gpu_gb >= 24
                         and any(p.placement == "sequential-offload" for p in chosen.values()))
    out["targets"] = {
        "fewer_loads_pct": round(100 * (1 - a["loads"] / f["loads"]), 1),
        "fewer_gb_to_card_pct": round(100 * (1 - a["gb_to_card"] / f["gb_to_card"]), 1),
        "throughput_ratio": round(a["throughput_per_hour"] / f["throughput_per_hour"], 2),
        "throughput_ratio_target": ratio_target,
        "wait_max_allowed_s": round(f["wait_max_s"] + mean_generate, 1),
        "met": a["loads"] <= 0.6 * f["loads"] and a["throughput_per_hour"] >= ratio_target * f["throughput_per_hour"]
               and a["wait_max_s"] <= f["wait_max_s"] + mean_generate and no_sequential,
    }
    out["setup"] = {"seed": args.seed, "jobs": args.jobs, "users": args.users, "utilisation": args.utilisation,
                    "favourite": args.favourite,
                    "gpu_gb": args.gpu_gb, "ram_gb": args.ram_gb, "reserve_gb": args.reserve_gb,
                    "max_passed_over": sched_settings.max_passed_over,
                    "max_extra_wait_s": sched_settings.max_extra_wait_s,
                    "mean_generate_s": round(mean_generate, 2),
                    "placement": args.placement, "quant_cache": not args.no_quant_cache,
                    "placements": {m: p.placement for m, p in plan_.items()},
                    "auto_placements": {m: p.label for m, p in chosen.items()} if args.placement == "auto" else None}
    return out


def config_scheduler_settings() -> Any:
    import tomllib

    from engine.config import SchedulerSettings, validate_table

    raw = tomllib.loads((REPO / "config.toml").read_text(encoding="utf-8"))
    return validate_table(SchedulerSettings, raw.get("scheduler", {}), "scheduler.")


def print_table(out: dict[str, Any]) -> None:
    s = out["setup"]
    print(f"seed {s['seed']}, {s['jobs']} jobs, {s['users']} users, utilisation {s['utilisation']}, "
          f"{s['gpu_gb']} GB card, RAM tier {s['ram_gb']} GB, K={s['max_passed_over']}, T={s['max_extra_wait_s']} s")
    print("placements: " + ", ".join(f"{m} {p}" for m, p in s["placements"].items()))
    if s["auto_placements"]:
        print("auto plan (fifo_budget, affinity): " + ", ".join(f"{m} {p}" for m, p in s["auto_placements"].items()))
    cols = ["loads", "ram_copies", "load_s_total", "gb_to_card", "throughput_per_hour", "wall_throughput_per_hour", "wait_mean_s",
            "wait_p95_s", "wait_max_s", "latency_mean_s", "max_passed_over", "max_overtaken_by_later_arrivals"]
    print("| policy | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name in ("fifo", "fifo_budget", "affinity"):
        print(f"| {name} | " + " | ".join(str(out[name][c]) for c in cols) + " |")
    t = out["targets"]
    print(f"affinity vs fifo: {t['fewer_loads_pct']}% fewer loads, {t['fewer_gb_to_card_pct']}% fewer GB moved onto "
          f"the card, {t['throughput_ratio']}x throughput "
          f"(target {t['throughput_ratio_target']}x), "
          f"max wait {out['affinity']['wait_max_s']} s (allowed {t['wait_max_allowed_s']} s): "
          f"targets {'met' if t['met'] else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--utilisation", type=float, default=0.8)
    parser.add_argument("--gpu-gb", type=float, default=48.0, help="card memory in GiB (48: RTX 6000 Ada / L40S)")
    parser.add_argument("--ram-gb", type=float, default=0.0, help="RAM tier in GiB (0: off, the shipped default)")
    parser.add_argument("--reserve-gb", type=float, default=3.0)
    parser.add_argument("--favourite", type=float, default=0.0, help="share of each user's jobs sent to one favourite model")
    parser.add_argument("--placement", choices=("bf16", "auto"), default="bf16",
                        help="auto: fifo_budget and affinity run the placement planner's plan (fifo keeps bf16)")
    parser.add_argument("--no-quant-cache", action="store_true",
                        help="every quantised load reads bf16 and quantises again (the cache off)")
    parser.add_argument("--workers", type=int, default=None,
                        help="N simulated workers: ours against warm_first and round_robin (bench/scheduler_workers.py)")
    parser.add_argument("--scaling", action="store_true", help="1 worker against 4 at 4x the arrival rate")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the residency manager's swap log lines are per job
    if args.workers is not None or args.scaling:
        import scheduler_workers  # bench/ is on sys.path: this script's folder

        settings = config_scheduler_settings()
        affinity = AffinityScheduler(settings.max_passed_over, settings.max_extra_wait_s)
        config = load_config(REPO / "config.toml", env={})
        if args.scaling:
            out = scheduler_workers.run_scaling(args, affinity, config)
            show = scheduler_workers.print_scaling
        else:
            out = scheduler_workers.run_workers(args, affinity, config)
            show = scheduler_workers.print_workers
    else:
        out, show = run_all(args), print_table
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        show(out)


if __name__ == "__main__":
    main()
