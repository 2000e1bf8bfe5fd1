"""Benchmark: what the safety checks cost per image and per step.

    python bench/safety_detectors.py [--runs 30] [--device cpu|cuda]

NudeNet (the ONNX model inside the `nudenet` wheel, CPU) per image at three sizes, the black/NaN
detector, the prompt check, and the per-step latent NaN check on a FLUX-sized latent. Medians
over ``--runs``; prints a Markdown table for docs/SAFETY.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def median_ms(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from engine.config import SafetyConfig
    from engine.safety import BlackImageDetector, NudeNetDetector, PromptCheck, check_latents_blocking

    config = SafetyConfig()
    rng = np.random.default_rng(0)
    rows: list[tuple[str, float]] = []

    started = time.perf_counter()
    nudenet = NudeNetDetector(config.nudenet_thresholds)
    nudenet.load_blocking()
    rows.append(("NudeNet load (once per process)", (time.perf_counter() - started) * 1000))
    for side in (512, 768, 1024):
        image = Image.fromarray(rng.integers(0, 255, (side, side, 3), np.uint8))
        rows.append((f"NudeNet, {side}x{side} image", median_ms(lambda: nudenet.check_blocking(image), args.runs)))

    black = BlackImageDetector()
    for side in (768, 1024):
        image = Image.fromarray(rng.integers(0, 255, (side, side, 3), np.uint8))
        rows.append((f"black/NaN detector, {side}x{side} PIL image", median_ms(lambda: black.check_blocking(image), args.runs)))

    check = PromptCheck(config.blocked_terms, config.drug_terms, config.minor_terms)
    prompt = "a cinematic photo of a red fox in the rain, neon lights, 85mm lens, soft light, highly detailed " * 3
    rows.append(("prompt check, 300-character prompt", median_ms(lambda: check.check(prompt), args.runs * 10)))

    import torch

    device = torch.device(args.device)
    latents = torch.randn(1, 4096, 64, device=device)  # FLUX at 1024x1024: 4096 packed tokens x 64

    def latent_check() -> None:
        check_latents_blocking(latents, "flux_dev", 1)

    rows.append((f"latent NaN check per step ({device.type}, FLUX 1024 px latents)", median_ms(latent_check, args.runs)))

    cpu = platform.processor() or platform.machine()
    print(f"Machine: {platform.node()} ({cpu}, {os.cpu_count()} CPUs), Python {platform.python_version()}, "
          f"torch {torch.__version__}, median of {args.runs} runs\n")
    print("| check | ms |\n|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
