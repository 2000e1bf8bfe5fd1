"""Benchmark: what checking one live preview costs ([previews] policy = "checked"), next to the
time between two previews.

    python bench/preview_safety.py [--runs 30] [--sides 128 256 512] [--config config.toml]
                                   [--threads 4] [--step-s 0.106]

1. A preview picture as the step callback makes it (random FLUX latents of a square image
   projected and encoded by ``LatentPreviewer``, long side ``max_side``) for each of ``--sides``
   and the config's own ``[previews] max_side``.
2. Per side, median and p90 over ``--runs`` (after a warm-up): decoding the JPEG/WebP bytes back
   to RGB, the black check, the real NudeNet detector (the ONNX model in the ``nudenet`` wheel,
   ``--threads`` intra-op threads; production uses 4, or fewer CPUs), and the whole gate
   (``CheckedPreviews`` calling ``SafetyPolicy.preview_problem_blocking``: what the GPU thread
   spends per preview).
3. The interval between two previews under the config's throttle: the rarer of ``every_steps``
   steps of ``--step-s`` seconds (default: one FLUX.1-dev step at 768 px on an H200,
   docs/PERFORMANCE.md) and ``min_interval_s``; the gate's median as a share of it.

Prints Markdown tables for docs/PERFORMANCE.md.
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed_ms(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
    """(median ms, p90 ms) of ``fn`` over ``runs`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def cpu_name() -> str:
    """What ``lscpu | grep 'Model name'`` shows, read from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def preview_picture(settings: Any, side: int) -> Any:
    """A ``Preview`` of a square image whose preview is ``side`` px, made as the step callback makes it."""
    import torch

    from engine.pipelines import LatentPreviewer, Preview
    from engine.pipelines.previews import FLUX, FORMATS

    image_side = max(64, -(-side // 16) * 16)  # the preview is the image's own size, or max_side
    sized = settings.model_copy(update={"max_side": side})
    previewer = LatentPreviewer("flux", sized, lambda p: None, width=image_side, height=image_side,
                                vae_scale_factor=8, vae_scaling=FLUX.scale, vae_shift=FLUX.shift)
    generator = torch.Generator().manual_seed(0)
    grid = image_side // 8
    latents = torch.randn(1, (grid // 2) ** 2, 64, generator=generator)  # packed 2x2, as in FLUX's loop
    data = previewer.render_blocking(latents)
    return Preview(1, 28, data, FORMATS[sized.format][1], *previewer.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--sides", type=int, nargs="+", default=[128, 256, 512],
                        help="preview long sides to measure; the config's max_side is added")
    parser.add_argument("--config", default=str(REPO / "config.toml"))
    parser.add_argument("--threads", type=int, default=4, help="NudeNet's intra-op threads (production: 4)")
    parser.add_argument("--step-s", type=float, default=0.106, help="seconds per denoising step")
    args = parser.parse_args()

    from engine.config import load_config
    from engine.pipelines import CheckedPreviews
    from engine.pipelines.preview_gate import decode_preview
    from engine.safety import SafetyPolicy
    from engine.safety.detectors import BlackImageDetector, NudeNetDetector, _shared_nudenet

    config = load_config(args.config, env={})
    settings = config.previews

    def loader() -> Any:
        return _shared_nudenet(args.threads)

    started = time.perf_counter()
    nudenet = NudeNetDetector(config.safety.nudenet_thresholds, loader=loader)
    nudenet.load_blocking()
    load_ms = (time.perf_counter() - started) * 1000
    black = BlackImageDetector(dark_level=config.safety.dark_level, dark_fraction=config.safety.dark_fraction)
    policy = SafetyPolicy.from_config(config.safety, config.models, nudenet_loader=loader)
    policy.preload_blocking()

    threads = max(1, min(args.threads, os.cpu_count() or 1))  # as _shared_nudenet caps them
    print(f"Machine: {cpu_name()} ({os.cpu_count()} CPUs), Python {platform.python_version()}; NudeNet with "
          f"{threads} intra-op thread(s), loaded in {load_ms:.0f} ms; median and p90 of {args.runs} runs\n")
    print("| preview | bytes | decode ms | black ms | NudeNet ms | whole gate ms (median) | gate p90 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    gate_ms: dict[int, float] = {}
    for side in sorted({*args.sides, settings.max_side}):
        preview = preview_picture(settings, side)
        picture = decode_preview(preview.image)
        decode = timed_ms(lambda: decode_preview(preview.image), args.runs)
        black_ms = timed_ms(lambda: black.check_blocking(picture), args.runs)
        nude_ms = timed_ms(lambda: nudenet.check_blocking(picture), args.runs)
        gate = CheckedPreviews(lambda p: policy.preview_problem_blocking(p), lambda p: None)
        whole = timed_ms(lambda: gate(preview), args.runs)
        assert not gate.stopped, "a random-latent preview was flagged: the figures would not be the pass path"
        gate_ms[side] = whole[0]
        mark = " (config)" if side == settings.max_side else ""
        print(f"| {preview.width}x{preview.height}{mark} | {len(preview.image)} | {decode[0]:.2f} | {black_ms[0]:.2f} "
              f"| {nude_ms[0]:.2f} | {whole[0]:.2f} | {whole[1]:.2f} |")

    interval = max(settings.min_interval_s, settings.every_steps * args.step_s)
    print(f"\nThrottle from the config: every_steps = {settings.every_steps}, min_interval_s = "
          f"{settings.min_interval_s:g}; at {args.step_s:g} s per step one preview every {interval:.2f} s at most.\n")
    print("| preview | gate ms (median) | share of the interval |")
    print("|---|---:|---:|")
    for side, ms in gate_ms.items():
        print(f"| {side} px | {ms:.2f} | {ms / 1000 / interval:.2%} |")


if __name__ == "__main__":
    main()
