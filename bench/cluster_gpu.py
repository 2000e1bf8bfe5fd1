"""Benchmark, Ray workers on one real GPU (issue 15's device check; CUDA only).

    python bench/cluster_gpu.py [--profile tiny|real] [--steps 30] [--side 768] [--json]

Two workers at ``num_gpus = 0.5`` on the one card (mode "local": this process starts Ray), then:

    start_s          the engine up: ray.init, two actors, each importing torch and initialising
                     CUDA, building its runner (safety detectors included)
    first_job_s      two jobs of two models at once, from submit to image (each worker loads one)
    warm_job_s       the same again (models resident)
    kill             a job killed mid-run: SIGKILL of its worker's process at its first step ->
                     lost_after_s (kill to the job back in the queue), finished_after_s (kill to
                     its image, on either worker), attempts (outcome, worker), restart_s (kill
                     to the killed worker started again, CUDA and all)
    gpu_memory       per worker process: what torch reserved on the card (nvidia-smi's view)

The jobs are FLUX and RealVisXL in both profiles; ``--profile tiny`` uses the tiny twins (the Ray and
CUDA costs without the weights), ``real`` the configured weights (they must be on disk).
Figures go to docs/PERFORMANCE.md with the card named.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--side", type=int, default=768)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cpu", action="store_true",
                        help="a dry run on the CPU (two workers on a custom Ray resource): checks this script, measures nothing about GPUs")
    return parser.parse_args()


def config_for(profile: str, data: Path, cpu: bool = False) -> Any:
    from engine.config import ClusterSettings, load_config

    config = load_config(REPO / "config.toml", profile=profile).model_copy(update={"data_dir": data})
    if profile == "tiny":
        from engine.config import with_tiny_models
        from engine.tiny import ensure_tiny_models

        config = with_tiny_models(config, ensure_tiny_models(data / "tiny-models"))
    if cpu:
        cluster = ClusterSettings(mode="local", resource="promptpics_worker", workers=2)
        return config.model_copy(update={"cluster": cluster, "device": "cpu"})
    return config.model_copy(update={"cluster": ClusterSettings(mode="local", num_gpus=0.5, workers=2)})


def gpu_memory_by_pid() -> dict[int, int]:
    """MiB each process holds on the card, as nvidia-smi reports it."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=False).stdout
    rows = (line.split(",") for line in out.splitlines() if line.strip())
    return {int(pid): int(mib) for pid, mib in rows}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from engine import Engine, JobProgressed, JobQueued, JobRequest

    def request(prompt: str, model: str = "flux_dev") -> JobRequest:
        return JobRequest(prompt, model=model, steps=args.steps, width=args.side, height=args.side, seed=1)

    out: dict[str, Any] = {"profile": args.profile, "steps": args.steps, "side": args.side}
    with tempfile.TemporaryDirectory() as tmp:
        config = config_for(args.profile, Path(tmp), args.cpu)
        t0 = time.perf_counter()
        async with Engine(config) as engine:
            out["start_s"] = round(time.perf_counter() - t0, 2)
            workers = {w.info.name: w for w in engine._workers}
            out["cards"] = {name: w.info.card for name, w in workers.items()}

            async def timed_pair(label: str) -> None:
                started = time.perf_counter()
                handles = [await engine.submit(request(f"{label} {m}", m)) for m in ("flux_dev", "realvis_xl")]
                await asyncio.gather(*(h.result() for h in handles))
                out[f"{label}_s"] = round(time.perf_counter() - started, 2)
                attempts = [await engine.history.attempts(h.id) for h in handles]
                out[f"{label}_workers"] = sorted(a[-1].worker for a in attempts)

            await timed_pair("first_job")
            await timed_pair("warm_job")
            memory = {} if args.cpu else gpu_memory_by_pid()
            out["gpu_memory_mib"] = {name: memory.get(getattr(w, "pid", 0) or 0) for name, w in workers.items()}

            handle = await engine.submit(request("killed mid-job"))
            kill: dict[str, Any] = {}
            killed_at = 0.0
            async for event in handle.events():
                if isinstance(event, JobProgressed) and not killed_at:
                    running = next(j for j in engine._running.values() if j.id == handle.id)
                    victim = workers[running.worker]
                    kill["worker"], killed_at = running.worker, time.perf_counter()
                    os.kill(victim.pid, signal.SIGKILL)
                elif isinstance(event, JobQueued) and killed_at and "lost_after_s" not in kill:
                    kill["lost_after_s"] = round(time.perf_counter() - killed_at, 3)
            kill["finished_after_s"] = round(time.perf_counter() - killed_at, 2)
            kill["outcome"] = type(event).__name__
            kill["attempts"] = [(a.outcome, a.worker) for a in await engine.history.attempts(handle.id)]
            victim = workers[kill["worker"]]
            while not getattr(victim, "_started", True):  # the background restart (docs/CLUSTER.md)
                await asyncio.sleep(0.05)
            kill["restart_s"] = round(time.perf_counter() - killed_at, 2)
            out["kill"] = kill
    return out


def main() -> None:
    args = parse()
    import torch

    if not (args.cpu or torch.cuda.is_available()):
        sys.exit("bench/cluster_gpu.py needs a CUDA GPU (it measures Ray workers sharing one card); --cpu: a dry run")
    out = asyncio.run(measure(args))
    out["gpu"] = "none (--cpu dry run)" if args.cpu else torch.cuda.get_device_name(0)
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
