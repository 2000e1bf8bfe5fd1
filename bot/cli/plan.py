"""``promptpics plan``: which quantisation and offload each model gets on a card, from the
placement planner (engine/placement/), without loading anything. ``--gpu-gb`` plans for a card
of that size; without it, the engine measures this machine's card (torch loads for that only)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bot.cli.jobs import has_history, read_history
from engine import (
    RECENT_JOBS,
    Config,
    ConfigError,
    Plan,
    describe_shares,
    explicit_placement_keys,
    measure_card_blocking,
    parse_shares,
    plan_for_config,
)


def add_plan_command(subparsers: Any) -> None:
    plan = subparsers.add_parser("plan", help="each model's quantisation and offload on a card (nothing loads)",
                                 description="The placement planner's proposal: per model the least lossy "
                                             "placement that keeps resident together the models serving the "
                                             "largest share of jobs, without sequential offload (docs/CONFIG.md, "
                                             "'which card, which plan').")
    plan.add_argument("--gpu-gb", type=float, help="card memory in GiB (default: measure this machine's GPU)")
    plan.add_argument("--fp8", action="store_true", help="the card runs float8 (Ada, Hopper): fp8 instead of int8")
    plan.add_argument("--shares", help="each model's share of jobs, e.g. flux_dev=0.5,realvis_xl=0.3 (default: the "
                                       f"history's newest {RECENT_JOBS} jobs; without a history, equal shares)")
    plan.add_argument("--json", action="store_true", help="one JSON object")
    plan.set_defaults(run=cmd_plan)


async def cmd_plan(config: Config, args: argparse.Namespace) -> int:
    if args.gpu_gb is not None:
        gpu_gb, fp8 = args.gpu_gb, args.fp8
    else:  # a one-shot command: measuring the card on the loop blocks nobody
        gpu_gb, fp8 = measure_card_blocking()
    if gpu_gb <= config.residency.reserve_gb:
        raise ConfigError("--gpu-gb", gpu_gb, f"it must be more than residency.reserve_gb ({config.residency.reserve_gb} GiB)")
    shares, source = await traffic(config, args.shares)
    plan = plan_for_config(config, gpu_gb, fp8=fp8 or args.fp8, shares=shares)
    if args.json:
        print(json.dumps({**plan.to_json(), "shares": shares, "shares_source": source}, indent=1))
    else:
        print(format_plan(plan, config, describe_shares(shares, source)))
    return 0


async def traffic(config: Config, text: str | None) -> tuple[dict[str, float] | None, str]:
    """(shares, where they came from): ``--shares``, else the history's recent jobs, else equal."""
    if text is not None:
        return parse_shares(text, config.models.keys()), "--shares"
    if not has_history(config):
        return None, "no history yet"
    async with read_history(config) as store:
        shares = await store.model_shares(RECENT_JOBS)
    return (shares, f"the history's newest {RECENT_JOBS} jobs") if shares else (None, "too few jobs in the history")


def format_plan(plan: Plan, config: Config, traffic_line: str = "") -> str:
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
    if traffic_line:
        lines.append(traffic_line)
    if plan.cache_gb:
        lines.append(f"int8/fp8 parts are quantised at each model's first load (on the CPU: minutes for the large "
                     f"ones on a small host), then read from {config.data_dir / 'quantised'}: "
                     f"{plan.cache_gb:.1f} GB of disk" if config.residency.quantised_cache else
                     "int8/fp8 parts are quantised again at every load (residency.quantised_cache = false)")
    if config.placement != "auto":
        lines.append('engine.placement is "manual": set it to "auto" to apply this plan at start-up')
    return "\n".join(lines)
