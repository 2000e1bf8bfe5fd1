"""Sweep ``bench/scheduler.py --placement auto`` over cards and seeds: per card, the affinity
run's throughput ratio and load reduction against the bf16 FIFO baseline, and how many seeds meet
the targets. Usage: python bench/placement_sweep.py [--gpu-gb 24 32 48 80] [--seeds 1-10] [--ram-gb 0] [--table]
(``--table``: one markdown row per card and seed, as in docs/PERFORMANCE.md)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SCHEDULER = Path(__file__).with_name("scheduler.py")


def one(gpu_gb: float, seed: int, ram_gb: float = 0.0) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(SCHEDULER), "--json", "--gpu-gb", f"{gpu_gb:g}", "--placement", "auto",
                          "--seed", str(seed), "--ram-gb", f"{ram_gb:g}"], check=True, capture_output=True,
                         text=True).stdout
    return dict(json.loads(out))


def row(gpu_gb: float, seed: int, run: dict[str, Any]) -> str:
    f, a, t = run["fifo"], run["affinity"], run["targets"]
    return (f"| {gpu_gb:g} | {seed} | {f['loads']} | {a['loads']} | {t['fewer_loads_pct']}% | "
            f"{t['fewer_gb_to_card_pct']}% | "
            f"{f['throughput_per_hour']} | {a['throughput_per_hour']} | {t['throughput_ratio']}x | "
            f"{'yes' if t['met'] else 'no'} |")


def seed_range(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    try:
        return int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed or a first-last range such as 1-10") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpu-gb", type=float, nargs="+", default=[24, 32, 48, 80])
    parser.add_argument("--seeds", default="1-10", type=seed_range, help="first-last, or one seed")
    parser.add_argument("--ram-gb", type=float, default=0.0, help="RAM tier in GiB (0: off, the shipped default)")
    parser.add_argument("--table", action="store_true", help="markdown rows per card and seed, then the summary")
    args = parser.parse_args()
    first, last = args.seeds
    for gpu_gb in args.gpu_gb:
        seeds = range(first, last + 1)
        full = [one(gpu_gb, s, args.ram_gb) for s in seeds]
        if args.table:
            print("\n".join(row(gpu_gb, s, r) for s, r in zip(seeds, full)))
        runs = [r["targets"] for r in full]
        ratios = [r["throughput_ratio"] for r in runs]
        fewer = [r["fewer_loads_pct"] for r in runs]
        moved = [r["fewer_gb_to_card_pct"] for r in runs]
        print(f"{gpu_gb:g} GiB: throughput {min(ratios):.2f}-{max(ratios):.2f}x "
              f"(target {runs[0]['throughput_ratio_target']}x), loads {min(fewer):+.0f}..{max(fewer):+.0f}% fewer, "
              f"GB onto the card {min(moved):+.0f}..{max(moved):+.0f}% fewer, "
              f"1.5x/1.25x reached {sum(r['throughput_ratio'] >= r['throughput_ratio_target'] for r in runs)}/{len(runs)}, "
              f"met {sum(r['met'] for r in runs)}/{len(runs)}", flush=True)


if __name__ == "__main__":
    main()
