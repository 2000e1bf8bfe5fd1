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
    # the disk the quantised cache takes: the int8 transformers of flux (23.8 GB) and HiDream (34.21 GB)
    assert (flux["denoiser"], out["models"]["logo_sdxl"]["denoiser"]) == ("int8", "int8")
    assert out["quantised_cache_gb"] == pytest.approx((23.8 + 34.21) * 0.52, abs=0.01)
    assert plan_placements(FOUR, 141).to_json()["quantised_cache_gb"] == 0  # all bf16: nothing cached


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
    assert f"then read from {tmp_path / 'quantised'}" in text.stdout and "GB of disk" in text.stdout
    bad = promptpics(env, "plan", "--gpu-gb", "2")
    assert bad.returncode != 0 and "--gpu-gb" in bad.stderr and "reserve_gb" in bad.stderr


# -- traffic: the resident group serves the largest share of jobs ---------------------------

TRAFFIC = {"flux_dev": 0.4, "realvis_xl": 0.3, "sd3_medium": 0.2, "logo_sdxl": 0.1}


def test_at_24_gb_shares_favouring_flux_and_realvis_make_both_resident_together_in_8_bit() -> None:
    plan = plan_placements(FOUR, 24, exclusive=["logo_sdxl"], shares=TRAFFIC)
    assert plan.resident_together[0] == ["flux_dev", "realvis_xl"]
    flux, realvis = plan.models["flux_dev"], plan.models["realvis_xl"]
    assert flux.offload == realvis.offload == "none" and flux.gb + realvis.gb <= plan.budget_gb
    assert realvis.denoiser == "int8"  # quantised only so that FLUX fits beside it
    assert plan.models["sd3_medium"].loss == 0  # outside the group: still its least lossy placement alone


def test_equal_shares_keep_the_most_models_resident_as_before() -> None:
    for gpu_gb in CARDS:
        before = plan_placements(FOUR, gpu_gb, exclusive=["logo_sdxl"])
        equal = plan_placements(FOUR, gpu_gb, exclusive=["logo_sdxl"], shares=dict.fromkeys(FOUR, 0.25))
        assert equal == before, gpu_gb
        if gpu_gb == 24:  # today's rule: two models (the SDXL and SD3) rather than FLUX with one
            assert equal.resident_together[0] == ["realvis_xl", "sd3_medium"]


def test_shares_never_bring_sequential_offload_or_an_exclusive_model_into_a_group() -> None:
    for gpu_gb in (24, 32, 48, 80):
        plan = plan_placements(FOUR, gpu_gb, exclusive=["logo_sdxl"], shares={"logo_sdxl": 0.9, "flux_dev": 0.1})
        assert all(p.offload != "sequential" for p in plan.models.values())
        assert all("logo_sdxl" not in g or g == ["logo_sdxl"] for g in plan.resident_together)


async def test_shares_are_read_from_the_history_newest_jobs_first(tmp_path: Path) -> None:
    from engine.history import HistoryStore
    from engine.jobs import GenerationParams, Origin, Requester

    async with HistoryStore.open(tmp_path) as store:
        for i, mid in enumerate(["sd3_medium"] * 10 + ["flux_dev"] * 15 + ["realvis_xl"] * 5):
            params = GenerationParams(prompt=f"p{i}", negative_prompt="", model_id=mid, steps=4, guidance=1.0,
                                      width=512, height=512, seed=i, route_reason="test")
            await store.record_queued(requester=Requester("discord", "u", "u"), origin=Origin("discord", "c", "t", "m"),
                                      model_asked=None, params=params, created_at=1_700_000_000.0 + i)
        assert await store.model_shares(20) == {"flux_dev": 0.75, "realvis_xl": 0.25}  # the newest 20 only
        assert await store.model_shares(500) == {"flux_dev": 0.5, "realvis_xl": 5 / 30, "sd3_medium": 1 / 3}
        assert await store.model_shares(500, min_jobs=31) == {}  # too few jobs: the planner counts equally


def test_parse_shares_normalises_and_errors_name_field_value_and_rule() -> None:
    from engine import ConfigError, parse_shares

    assert parse_shares("flux_dev=2, realvis_xl=2", FOUR) == {"flux_dev": 0.5, "realvis_xl": 0.5}
    for text, field, value, rule in (("flux_dev", "--shares", "flux_dev", "model_id=share"),
                                     ("nope=1", "--shares", "nope", "not a configured model"),
                                     ("flux_dev=-1", "--shares flux_dev", "-1", "0 or more"),
                                     ("flux_dev=nan", "--shares flux_dev", "nan", "0 or more"),
                                     ("flux_dev=1,flux_dev=2", "--shares", "flux_dev", "once"),
                                     ("flux_dev=0", "--shares", "flux_dev=0", "more than 0")):
        with pytest.raises(ConfigError) as err:
            parse_shares(text, FOUR)
        message = str(err.value)
        assert field in message and value in message and rule in message, message


def test_promptpics_plan_says_which_shares_it_used(tmp_path: Path) -> None:
    env = {**os.environ, "PROMPTPICS_DATA_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = promptpics(env, "plan", "--gpu-gb", "24", "--shares", "flux_dev=4,realvis_xl=3,sd3_medium=2,logo_sdxl=1")
    assert done.returncode == 0, done.stderr
    assert "resident together: flux_dev + realvis_xl" in done.stdout and "traffic (--shares): flux_dev 40%" in done.stdout
    equal = promptpics(env, "plan", "--gpu-gb", "24", "--json")
    out = json.loads(equal.stdout)
    assert out["shares"] is None and out["shares_source"] == "no history yet"
    bad = promptpics(env, "plan", "--gpu-gb", "24", "--shares", "flux_dev=lots")
    assert bad.returncode != 0 and "--shares flux_dev" in bad.stderr and "lots" in bad.stderr


async def test_auto_placement_at_start_up_plans_with_the_history_shares(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from engine.core.engine import Engine
    from engine.history import HistoryStore
    from engine.placement import start

    raw = repo_config_raw()
    raw["engine"]["placement"] = "auto"
    for mid in FOUR:
        raw["models"][mid].pop("offload", None)
    config = parse_config(raw, {}, base_dir=REPO)
    async with HistoryStore.open(tmp_path) as store:  # no jobs yet: equal shares
        assert await Engine._traffic(SimpleNamespace(config=config, _history=store)) is None  # type: ignore[arg-type]
    monkeypatch.setattr(start, "measure_card_blocking", lambda device=None: (24.0, False))
    planned = start.auto_placement_blocking(config, SimpleNamespace(type="cuda"), TRAFFIC)
    assert planned.model("realvis_xl").quant.denoiser == "int8" and planned.model("realvis_xl").offload == "none"
    assert planned.model("flux_dev").quant.text_encoders == {"text_encoder_2": "int8"}
    equal = start.auto_placement_blocking(config, SimpleNamespace(type="cuda"), None)
    assert equal.model("realvis_xl").quant.denoiser == "bf16"
