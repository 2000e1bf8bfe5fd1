"""Benchmark: import time, tiny load time per family, and the engine's per-job overhead.

    python bench/engine_overhead.py [--jobs 20] [--steps 4] [--size 256] [--device cpu|cuda]

Overhead = (wall time from ``engine.submit`` to the PNG bytes) minus (the same diffusers
pipeline called directly with the same arguments, plus PNG encoding), both on a resident
model, medians over ``--jobs`` runs. Prints a Markdown table for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [float(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout) for _ in range(3)]
    return statistics.median(runs)


def tiny_config(device: str):
    from engine.config import load_config, with_tiny_models
    from engine.tiny import ensure_tiny_models

    config = load_config(REPO / "config.toml", env={})
    config = config.model_copy(update={"device": device,
        "limits": config.limits.model_copy(update={"min_image_side": 64})})
    return with_tiny_models(config, ensure_tiny_models(Path(tempfile.gettempdir()) / "promptpics-bench-tiny"))


def load_times(config) -> dict[str, tuple[float, float]]:
    """(first load in this process, second load) per model: the first pays lazy imports."""
    from engine.pipelines import load_pipeline_blocking, release_blocking, resolve_device_blocking, resolve_dtype

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    device = resolve_device_blocking(config.device)
    dtype = resolve_dtype(device, config.cuda_dtype)
    out = {}
    for spec in config.models.values():
        times = []
        for _ in range(2):
            loaded = load_pipeline_blocking(spec, device, dtype)
            times.append(loaded.load_s)
            release_blocking(loaded)
        out[spec.id] = (times[0], times[1])
    return out


async def paired_runs(config, model_id: str, jobs: int, steps: int, size: int) -> tuple[list[float], list[float]]:
    """Alternate a direct pipeline call and an engine job, round by round, so drift in the
    machine's speed (other processes, thermal) hits both paths alike."""
    from engine import Engine, JobRequest
    from engine.images import encode_png
    from engine.pipelines import generate_blocking, load_pipeline_blocking, resolve_device_blocking, resolve_dtype

    device = resolve_device_blocking(config.device)
    loaded = load_pipeline_blocking(config.model(model_id), device, resolve_dtype(device, config.cuda_dtype))
    request = JobRequest("a lighthouse at dusk", model=model_id, steps=steps, width=size, height=size, seed=7)
    direct, through_engine = [], []
    async with Engine(config) as engine:
        for i in range(jobs + 1):
            handle = await engine.submit(request)
            started = time.perf_counter()
            await handle.result()
            engine_s = time.perf_counter() - started
            started = time.perf_counter()
            image = generate_blocking(loaded, handle.params, on_step=lambda s, t: None, cancel=threading.Event())
            encode_png(image, handle.params)
            direct_s = time.perf_counter() - started
            if i:  # round 0 warms caches and loads the engine's copy
                direct.append(direct_s)
                through_engine.append(engine_s)
    return direct, through_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="flux_dev")
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {platform.python_version()}, device {args.device}")
    print("\n| import | seconds (median of 3, fresh process) |\n|---|---|")
    for module in ("engine", "bot.cli", "torch", "diffusers"):
        print(f"| `{module}` | {import_seconds(module):.3f} |")

    config = tiny_config(args.device)
    print("\n| tiny model | first load (s) | second load (s) |\n|---|---|---|")
    for model_id, (first, second) in load_times(config).items():
        print(f"| {model_id} ({config.model(model_id).family}) | {first:.2f} | {second:.2f} |")

    direct, through_engine = asyncio.run(paired_runs(config, args.model, args.jobs, args.steps, args.size))
    d, e = statistics.median(direct), statistics.median(through_engine)
    print(f"\nper-job overhead, {args.model}, {args.steps} steps, {args.size}x{args.size}, {args.jobs} jobs, resident model")
    print("| path | median (ms) | min (ms) |\n|---|---|---|")
    print(f"| diffusers pipeline called directly (+ PNG encode) | {d * 1000:.1f} | {min(direct) * 1000:.1f} |")
    print(f"| through Engine (submit, queue, GPU thread, events, result) | {e * 1000:.1f} | {min(through_engine) * 1000:.1f} |")
    print(f"| overhead | {(e - d) * 1000:.1f} | |")


if __name__ == "__main__":
    main()
