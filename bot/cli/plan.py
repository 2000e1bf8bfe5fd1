"""``promptpics plan``: which quantisation and offload each model gets on a card, from the
placement planner (engine/placement/), without loading anything. ``--gpu-gb`` plans for a card
of that size; without it, the engine measures this machine's card (torch loads for that only)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from engine import Config, ConfigError, Plan, explicit_placement_keys, measure_card_blocking, plan_for_config


def add_plan_command(subparsers: Any) -> None:
    plan = subparsers.add_parser("plan", help="each model's quantisation and offload on a card (nothing loads)",
                                 description="The placement planner's proposal: per model the least lossy "
                                             "placement that keeps the most models resident without sequential "
                                             "offload (docs/CONFIG.md, 'which card, which plan').")
    plan.add_argument("--gpu-gb", type=float, help="card memory in GiB (default: measure this machine's GPU)")
    plan.add_argument("--fp8", action="store_true", help="the card runs float8 (Ada, Hopper): fp8 instead of int8")
    plan.add_argument("--json", action="store_true", help="one JSON object")
    plan.set_defaults(run=cmd_plan)


async def cmd_plan(config: Config, args: argparse.Namespace) -> int:
    if args.gpu_gb is not None:
        gpu_gb, fp8 = args.gpu_gb, args.fp8
    else:  # a one-shot command: measuring the card on the loop blocks nobody
        gpu_gb, fp8 = measure_card_blocking()
    if gpu_gb <= config.residency.reserve_gb:
        raise ConfigError("--gpu-gb", gpu_gb, f"it must be more than residency.reserve_gb ({config.residency.reserve_gb} GiB)")
    plan = plan_for_config(config, gpu_gb, fp8=fp8 or args.fp8)
    if args.json:
        print(json.dumps(plan.to_json(), indent=1))
    else:
        print(format_plan(plan, config))
    return 0


def format_plan(plan: Plan, config: Config) -> str:
    lines = [f"{plan.gpu_gb:g} GiB card, {plan.reserve_gb:g} GiB kept free: {plan.budget_gb:.1f} GB for models"
             f"{', fp8' if plan.fp8 else ''}",
             f"{'model':<12} {'denoiser':<8} {'text encoders':<34} {'offload':<10} {'GB on card':>10}"]
    for mid, p in plan.models.items():
        tes = ", ".join(f"{n.replace('text_encoder', 'te')} {q}" for n, q in p.text_encoders.items() if q != "bf16")
        lines.append(f"{mid:<12} {p.denoiser:<8} {tes or 'bf16':<34} {p.offload:<10} {p.gb:>10.1f}")
        kept = explicit_placement_keys(config.model(mid))
        if kept and config.placement == "auto":
            lines.append(f"{'':<12} (config.toml sets {' and '.join(kept)} for {mid}: kept at start-up)")
    groups = "; ".join(" + ".join(g) for g in plan.resident_together)
    lines.append(f"resident together: {groups or 'one model at a time'}")
    if config.placement != "auto":
        lines.append('engine.placement is "manual": set it to "auto" to apply this plan at start-up')
    return "\n".join(lines)
