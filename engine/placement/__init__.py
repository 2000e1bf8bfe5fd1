"""Where each model sits on the card people own: quantisation and offload per model, planned
from the card's memory (``promptpics plan``; ``engine.placement = "auto"`` applies it).

    catalogue.py  the four families' component sizes at full size, byte ratios, step costs
    planner.py    candidates per model in preference order; plan_placements for one card
    apply.py      a plan onto a Config (explicit per-model keys win)
    start.py      engine.placement = "auto" at start-up: measure the card, plan, apply
"""

from engine.placement.apply import apply_plan, plan_for_config
from engine.placement.catalogue import COMPONENTS_GB, STEP_FACTOR, bytes_per_param, quantised_gb
from engine.placement.planner import Placement, Plan, candidates, plan_placements

__all__ = ["COMPONENTS_GB", "STEP_FACTOR", "Placement", "Plan", "apply_plan", "bytes_per_param", "candidates",
           "plan_for_config", "plan_placements", "quantised_gb"]
