"""The placement planner: least lossy first, most models resident, no sequential offload where
8-bit or model offload fits, explicit per-model keys kept, and the `promptpics plan` output."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from engine.config import parse_config
from engine.placement import apply_plan, candidates, plan_for_config, plan_placements
from tests.conftest import REPO, promptpics, repo_config_raw

FOUR = {"flux_dev": "flux", "realvis_xl": "sdxl", "sd3_medium": "sd3", "logo_sdxl": "hidream"}
CARDS = (12, 16, 24, 32, 48, 80, 141)


def test_candidates_follow_the_documented_preference_order() -> None:
    ladder = candidates("flux_dev", "flux")
    assert ladder[0].offload == "none" and ladder[0].denoiser == "bf16" and ladder[0].loss == 0
    first = {(p.offload, p.denoiser): p.loss for p in reversed(ladder)}  # the smallest loss of each kind
    assert first[("none", "int8")] < first[("model", "bf16")] < first[("none", "nf4")] < first[("sequential", "bf16")]
    assert [p.loss for p in ladder] == sorted(p.loss for p in ladder)


@pytest.mark.parametrize("gpu_gb", CARDS)
def test_every_card_runs_every_model_without_sequential_offload(gpu_gb: float) -> None:
    plan = plan_placements(FOUR, gpu_gb, exclusive=["logo_sdxl"])
    assert {p.offload for p in plan.models.values()} <= {"none", "model"}
    assert all(p.gb <= plan.budget_gb for p in plan.models.values())
    for group in plan.resident_together:
        assert sum(plan.models[m].gb for m in group) <= plan.budget_gb


def test_the_biggest_card_keeps_everything_lossless_and_the_smallest_pays_in_nf4() -> None:
    big = plan_placements(FOUR, 141)
    assert all(p.loss == 0 for p in big.models.values()) and big.resident_together == [list(FOUR)]
    small = plan_placements(FOUR, 12)
    assert small.models["flux_dev"].denoiser == "nf4" and small.models["flux_dev"].offload == "model"
    assert small.models["realvis_xl"].loss == 0  # SDXL fits in bf16 even here


def test_24_gb_quantises_flux_to_8_bit_rather_than_offload_it() -> None:
    plan = plan_placements(FOUR, 24, exclusive=["logo_sdxl"])
    flux = plan.models["flux_dev"]
    assert flux.denoiser == "int8" and flux.offload == "none"
    assert plan_placements(FOUR, 24, fp8=True).models["flux_dev"].denoiser == "fp8"
    assert ["realvis_xl", "sd3_medium"] in plan.resident_together


def test_explicit_per_model_keys_win_over_the_plan() -> None:
    raw = repo_config_raw()
    raw["models"]["sd3_medium"]["quant"] = {"denoiser": "bf16"}
    for mid in ("flux_dev", "sd3_medium"):
        raw["models"][mid].pop("offload")
    config = parse_config(raw, {}, base_dir=REPO)
    planned = apply_plan(config, plan_for_config(config, 24))
    assert planned.model("flux_dev").quant.denoiser == "int8"  # planned
    assert planned.model("sd3_medium").quant.denoiser == "bf16"  # config.toml said so
    assert planned.model("logo_sdxl").offload == "sequential"  # config.toml says so too
    assert planned.model("logo_sdxl").quant.denoiser == "int8"  # its quant was not set: planned


def test_the_json_shape_is_the_documented_one() -> None:
    out: dict[str, Any] = plan_placements(FOUR, 24).to_json()
    assert out["gpu_gb"] == 24 and set(out["models"]) == set(FOUR)
    flux = out["models"]["flux_dev"]
    assert set(flux) >= {"denoiser", "text_encoders", "offload", "gb"}
    assert set(flux["text_encoders"]) == {"text_encoder", "text_encoder_2"}
    assert all(isinstance(g, list) for g in out["resident_together"])


def test_promptpics_plan_prints_the_json_plan_for_a_card(tmp_path: Path) -> None:
    env = {**os.environ, "PROMPTPICS_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = promptpics(env, "plan", "--gpu-gb", "24", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["gpu_gb"] == 24 and set(out["models"]) == set(FOUR)
    assert all(m["offload"] != "sequential" for m in out["models"].values())
    assert "Failed to load" not in done.stderr and "torchao" not in done.stderr  # planning imports no torchao
    text = promptpics(env, "plan", "--gpu-gb", "12")
    assert text.returncode == 0 and "flux_dev" in text.stdout and "nf4" in text.stdout
    bad = promptpics(env, "plan", "--gpu-gb", "2")
    assert bad.returncode != 0 and "--gpu-gb" in bad.stderr and "reserve_gb" in bad.stderr
