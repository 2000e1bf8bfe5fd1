"""The placement planner: for one card, each model's quantisation and offload, least lossy
first, keeping as many models resident together as 8-bit weights allow. Pure; no torch.

Preference order (a placement's ``loss``; lower is better, documented in docs/CONFIG.md):

    every part bf16, resident                                     0
    + a large text encoder (T5-XXL, Llama) 8-bit, each             +1
    + the denoiser 8-bit (fp8 on Ada/Hopper, else int8)            +3
    model CPU offload (one component on the card at a time)        +10
    a large text encoder nf4, each                                 +20
    the denoiser nf4                                               +30
    sequential CPU offload (one layer at a time: minutes an image) 100

So 8-bit resident beats model offload, which beats nf4, which beats sequential offload. HiDream's
Llama text encoder (16 GB in bf16, the largest of any text encoder) is a part of its own: it
may be 8-bit or nf4 while HiDream's T5 stays bf16, and under model offload it is on the card
only while it encodes.

Traffic (``shares``: each model's share of recent jobs, from the history or ``--shares``): the
group made resident together is the one that serves the largest share of jobs without a load,
quantising to 8-bit where that lets the busiest models fit together; among groups serving the
same share, the least lossy, then the one with more models. Without shares every model counts
the same, which is the old rule: the most models resident together, then the least loss.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.placement.catalogue import COMPONENTS_GB, LARGE_TEXT_ENCODER_GB, quantised_gb

GIB_IN_GB = 2**30 / 1e9
DENOISER = {"flux": "transformer", "sdxl": "unet", "sd3": "transformer", "hidream": "transformer"}
_TE_LOSS = {"bf16": 0, "8bit": 1, "nf4": 20}
_DENOISER_LOSS = {"bf16": 0, "8bit": 3, "nf4": 30}
OFFLOAD_LOSS, SEQUENTIAL_LOSS = 10, 100


@dataclass(frozen=True, slots=True)
class Placement:
    """One model on one card."""

    model_id: str
    family: str
    denoiser: str  # "bf16", "fp8", "int8" or "nf4"
    text_encoders: Mapping[str, str]  # every text encoder by component name
    offload: str  # "none", "model" or "sequential"
    gb: float  # held on the card while ready (model offload: its largest component; sequential: 0)
    total_gb: float  # every weight, wherever it sits
    loss: int

    def to_json(self) -> dict[str, Any]:
        return {"denoiser": self.denoiser, "text_encoders": dict(self.text_encoders), "offload": self.offload,
                "gb": round(self.gb, 2), "total_gb": round(self.total_gb, 2), "loss": self.loss}


@dataclass(frozen=True, slots=True)
class Plan:
    gpu_gb: float  # GiB, as the card is sold
    reserve_gb: float  # GiB kept free for activations and the VAE decode
    ram_gb: float
    fp8: bool  # the card runs float8 matmuls (Ada, Hopper)
    models: Mapping[str, Placement]
    resident_together: Sequence[Sequence[str]] = field(default_factory=tuple)

    @property
    def budget_gb(self) -> float:
        """What the models may hold, in decimal GB (the unit of the size figures)."""
        return max(0.0, (self.gpu_gb - self.reserve_gb) * GIB_IN_GB)

    @property
    def cache_gb(self) -> float:
        """Disk the quantised cache (``residency.quantised_cache``) takes for this plan's int8/fp8 parts."""
        total = 0.0
        for p in self.models.values():
            parts = {DENOISER[p.family]: p.denoiser, **p.text_encoders}
            total += sum(quantised_gb(COMPONENTS_GB[p.family][n], q) for n, q in parts.items() if q in ("int8", "fp8"))
        return total

    def to_json(self) -> dict[str, Any]:
        return {"gpu_gb": self.gpu_gb, "reserve_gb": self.reserve_gb, "ram_gb": self.ram_gb, "fp8": self.fp8,
                "budget_gb": round(self.budget_gb, 2), "quantised_cache_gb": round(self.cache_gb, 2),
                "models": {mid: p.to_json() for mid, p in self.models.items()},
                "resident_together": [list(g) for g in self.resident_together]}


def candidates(model_id: str, family: str, *, fp8: bool = False) -> list[Placement]:
    """Every placement of one model, least lossy first (ties: the smaller on the card)."""
    parts = COMPONENTS_GB[family]
    eight = "fp8" if fp8 else "int8"
    large = [n for n, gb in parts.items() if n.startswith("text_encoder") and gb >= LARGE_TEXT_ENCODER_GB]
    out = []
    for d_level in ("bf16", "8bit", "nf4"):
        for te_levels in itertools.product(("bf16", "8bit", "nf4"), repeat=len(large)):
            quant = {DENOISER[family]: d_level, **dict(zip(large, te_levels))}
            quant = {n: eight if q == "8bit" else q for n, q in quant.items()}
            sizes = {n: quantised_gb(gb, quant.get(n, "bf16")) for n, gb in parts.items()}
            loss = _DENOISER_LOSS[d_level] + sum(_TE_LOSS[t] for t in te_levels)
            tes = {n: quant.get(n, "bf16") for n in parts if n.startswith("text_encoder")}
            denoiser = quant[DENOISER[family]]
            total = sum(sizes.values())
            out.append(Placement(model_id, family, denoiser, tes, "none", total, total, loss))
            out.append(Placement(model_id, family, denoiser, tes, "model", max(sizes.values()), total,
                                 loss + OFFLOAD_LOSS))
    bf16_total = sum(parts.values())
    out.append(Placement(model_id, family, "bf16", {n: "bf16" for n in parts if n.startswith("text_encoder")},
                         "sequential", 0.0, bf16_total, SEQUENTIAL_LOSS))
    return sorted(out, key=lambda p: (p.loss, p.gb))


def plan_placements(models: Mapping[str, str], gpu_gb: float, *, reserve_gb: float = 3.0, ram_gb: float = 0.0,
                    fp8: bool = False, exclusive: Collection[str] = (),
                    shares: Mapping[str, float] | None = None) -> Plan:
    """``models``: id -> family. Each model alone gets its least lossy placement that fits the
    budget; then the group of models that fit together with 8-bit weights at most (resident,
    no offload, no nf4) serving the largest share of jobs is made resident together, at the
    least total loss. ``shares``: model id -> share of jobs (missing ids: 0); None counts every
    model the same. ``exclusive`` models run alone (``exclusive = true``): never part of a group."""
    budget = Plan(gpu_gb, reserve_gb, ram_gb, fp8, {}).budget_gb
    options = {mid: candidates(mid, fam, fp8=fp8) for mid, fam in models.items()}
    chosen = {mid: next(p for p in opts if p.gb <= budget) for mid, opts in options.items()}
    # A RAM tier that holds every model turns a swap into a copy of seconds: then no model is
    # quantised further only to share the card.
    ram_holds_all = ram_gb * GIB_IN_GB >= sum(p.total_gb for p in chosen.values())
    max_loss = 0 if ram_holds_all else 3 + len(COMPONENTS_GB["hidream"])  # 8-bit parts only
    weights = dict.fromkeys(models, 1.0) if shares is None else {m: shares.get(m, 0.0) for m in models}
    group = _best_group({m: o for m, o in options.items() if m not in exclusive}, budget, max_loss, weights)
    chosen.update({p.model_id: p for p in group})
    groups = _groups([p.model_id for p in group], chosen, budget, exclusive)
    return Plan(gpu_gb, reserve_gb, ram_gb, fp8, chosen, groups)


def _best_group(options: Mapping[str, list[Placement]], budget: float, max_loss: int,
                shares: Mapping[str, float]) -> list[Placement]:
    """Two or more models resident together, each at most 8-bit: the largest share of jobs
    served, then the least loss, then the most models, then the fewest GB."""
    sharing = {mid: [p for p in opts if p.offload == "none" and p.loss <= max_loss and p.gb <= budget]
               for mid, opts in options.items()}
    ids = [mid for mid, opts in sharing.items() if opts]
    best: tuple[tuple[float, int, int, float], tuple[Placement, ...]] | None = None
    for size in range(len(ids), 1, -1):
        for subset in itertools.combinations(ids, size):
            served = round(sum(shares[mid] for mid in subset), 9)
            if best is not None and -served > best[0][0]:
                continue  # serves less than the best so far, whatever it costs
            combo = _least_lossy_fit([sharing[mid] for mid in subset], budget)
            if combo is not None:
                key = (-served, sum(p.loss for p in combo), -size, sum(p.gb for p in combo))
                if best is None or key < best[0]:
                    best = (key, combo)
    return list(best[1]) if best is not None else []


def _least_lossy_fit(options: Sequence[list[Placement]], budget: float) -> tuple[Placement, ...] | None:
    """One placement per model, all on the card together: the least total loss, then fewest GB."""
    best: tuple[int, float, tuple[Placement, ...]] | None = None
    for combo in itertools.product(*options):
        gb = sum(p.gb for p in combo)
        if gb <= budget and (best is None or (sum(p.loss for p in combo), gb) < best[:2]):
            best = (sum(p.loss for p in combo), gb, combo)
    return best[2] if best is not None else None


def _groups(first: list[str], chosen: Mapping[str, Placement], budget: float,
            exclusive: Collection[str]) -> list[list[str]]:
    """The group made resident together, then the other models packed first-fit (sequential
    offload holds nothing: it is never resident)."""
    groups = [first] if first else []
    for mid, p in chosen.items():
        if mid in first or p.offload == "sequential":
            continue
        for g in groups[1:] if mid not in exclusive else ():
            if sum(chosen[m].gb for m in g) + p.gb <= budget:
                g.append(mid)
                break
        else:
            groups.append([mid])
    return groups
