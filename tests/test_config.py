"""config.toml parsing: defaults, environment overrides, and errors that name key, value, rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.config import Limits, PreviewSettings, SafetyConfig, SchedulerSettings, load_config, parse_config
from engine.errors import ConfigError
from tests.conftest import REPO, repo_config_raw


def parse(raw: dict[str, Any], env: dict[str, str] | None = None):
    return parse_config(raw, env or {}, base_dir=REPO)


def test_repo_config_has_the_four_models_with_design_defaults() -> None:
    config = load_config(REPO / "config.toml", env={})
    assert list(config.models) == ["flux_dev", "realvis_xl", "sd3_medium", "logo_sdxl"]
    assert [(m.steps, m.guidance) for m in config.models.values()] == [(24, 4.5), (24, 5.0), (30, 6.0), (20, 4.0)]
    hidream = config.model("logo_sdxl")
    assert hidream.family == "hidream" and hidream.exclusive and hidream.offload == "sequential"
    assert hidream.text_encoder_source == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert config.limits.max_image_side == 768
    assert config.router_llm_id == config.rewrite_llm_id == "Qwen/Qwen2.5-1.5B-Instruct"
    assert config.data_dir == REPO / "data"


def test_environment_overrides_win_over_the_file() -> None:
    env = {"MAX_IMAGE_SIDE": "512", "ROUTER_LLM_ID": "org/router", "REWRITE_LLM_ID": "org/rewriter",
           "LOGO_SDXL_MODEL_ID": "org/logo", "PROMPTPICS_PROFILE": "tiny", "PROMPTPICS_DATA_DIR": "/tmp/pp"}
    config = parse(repo_config_raw(), env)
    assert config.limits.max_image_side == 512
    assert (config.router_llm_id, config.rewrite_llm_id) == ("org/router", "org/rewriter")
    assert config.model("logo_sdxl").source == "org/logo"
    assert config.profile == "tiny" and config.data_dir == Path("/tmp/pp")


def test_config_file_is_chosen_by_env_variable(tmp_path: Path) -> None:
    raw = (REPO / "config.toml").read_text(encoding="utf-8").replace('default_model = "flux_dev"', 'default_model = "sd3_medium"')
    other = tmp_path / "other.toml"
    other.write_text(raw, encoding="utf-8")
    config = load_config(env={"PROMPTPICS_CONFIG": str(other)})
    assert config.default_model == "sd3_medium"
    assert config.data_dir == tmp_path / "data"  # relative to the file that said it


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"PROMPTPICS_CONFIG.*nope\.toml.*no such file"):
        load_config(env={"PROMPTPICS_CONFIG": str(tmp_path / "nope.toml")})


def test_invalid_toml_is_reported_with_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_config(bad, env={})


@pytest.mark.parametrize(
    ("mutate", "key", "value", "rule"),
    [
        (lambda r: r["limits"].update(max_image_side="big"), "limits.max_image_side", "'big'", "whole number"),
        (lambda r: r["limits"].update(max_image_side=32), "limits.max_image_side", "32", "at least 64"),
        (lambda r: r["limits"].update(min_steps=60), "limits.min_steps", "60", "must not exceed limits.max_steps"),
        (lambda r: r["engine"].update(device="tpu"), "engine.device", "'tpu'", "'auto', 'cpu', 'cuda'"),
        (lambda r: r["engine"].update(cuda_dtype="float8"), "engine.cuda_dtype", "'float8'", "'bfloat16', 'float16'"),
        (lambda r: r["engine"].update(default_model="dalle"), "engine.default_model", "'dalle'", "one of the models"),
        (lambda r: r["engine"].update(colour="red"), "engine.colour", "'red'", "not a known key"),
        (lambda r: r["models"]["flux_dev"].update(family="gan"), "models.flux_dev.family", "'gan'", "'flux', 'sdxl'"),
        (lambda r: r["models"]["flux_dev"].update(offload="always"), "models.flux_dev.offload", "'always'", "'none', 'model'"),
        (lambda r: r["models"]["flux_dev"].update(steps=500), "models.flux_dev.steps", "500", "limits.min_steps..limits.max_steps"),
        (lambda r: r["models"]["flux_dev"].update(steps_range=[28]), "models.flux_dev.steps_range", "[28]", "two whole numbers"),
        (lambda r: r["models"]["flux_dev"].update(guidance_range=[6.0, 4.0]), "models.flux_dev.guidance_range", "[6.0, 4.0]", "low <= high"),
        (lambda r: r["models"]["flux_dev"].pop("source"), "models.flux_dev.source", "None", "required"),
        (lambda r: r["models"]["logo_sdxl"].pop("text_encoder_source"), "models.logo_sdxl.text_encoder_source", "None", "Llama"),
        (lambda r: r["models"]["realvis_xl"].update(emoji="🎨"), "models.*.emoji", "", "its own reaction emoji"),
        (lambda r: r["models"]["realvis_xl"].update(exclusive="yes"), "models.realvis_xl.exclusive", "'yes'", "true or false"),
        (lambda r: r["engine"].update(placement="magic"), "engine.placement", "'magic'", "'manual', 'auto'"),
        (lambda r: r["models"]["flux_dev"].update(quant={"denoiser": "int4"}), "models.flux_dev.quant.denoiser", "'int4'",
         "'bf16', 'fp8', 'int8', 'nf4'"),
        (lambda r: r["models"]["flux_dev"].update(quant={"text_encoders": {"text_encoder_3": "int8"}}),
         "models.flux_dev.quant.text_encoders.text_encoder_3", "'text_encoder_3'", "text_encoder, text_encoder_2"),
        (lambda r: r["models"]["flux_dev"].update(quant={"vae": "int8"}), "models.flux_dev.quant.vae", "'int8'",
         "not a known key"),
        (lambda r: r["models"]["sd3_medium"].update(compile="regional"), "models.sd3_medium.compile", "'regional'",
         "repeated blocks"),
    ],
)
def test_bad_config_names_key_value_and_rule(mutate: Any, key: str, value: str, rule: str) -> None:
    raw = repo_config_raw()
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        parse(raw)
    message = info.value.user_message
    assert message.startswith(f"config: `{key}` is ")
    assert value in message and rule in message


def test_quantisation_and_compile_are_read_per_model() -> None:
    raw = repo_config_raw()
    raw["engine"]["placement"] = "auto"
    raw["models"]["logo_sdxl"]["quant"] = {"denoiser": "int8", "text_encoders": {"text_encoder_4": "nf4"}}
    raw["models"]["flux_dev"]["compile"] = "regional"
    config = parse(raw)
    hidream = config.model("logo_sdxl")
    assert config.placement == "auto" and config.model("flux_dev").compile == "regional"
    assert hidream.quant.of("transformer", "hidream") == "int8" and hidream.quant.of("text_encoder_4", "hidream") == "nf4"
    assert hidream.quant.of("vae", "hidream") == "bf16" and config.model("realvis_xl").quant.quantised is False


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"`MAX_IMAGE_SIDE` is 'huge'.*whole number"):
        parse(repo_config_raw(), {"MAX_IMAGE_SIDE": "huge"})


def test_local_folder_sources_resolve_against_the_config_folder(tmp_path: Path) -> None:
    raw = repo_config_raw()
    raw["models"]["flux_dev"]["source"] = "./weights/flux"
    config = parse_config(raw, {}, base_dir=tmp_path)
    assert config.model("flux_dev").source == str(tmp_path / "weights" / "flux")
    assert config.model("realvis_xl").source == "SG161222/RealVisXL_V4.0"  # hub ids untouched


@pytest.mark.parametrize(
    ("mutate", "env", "key", "rule"),
    [
        (lambda r: r["safety"]["black"].update(colour=3), {}, "safety.black.colour", "not a known key here (known: blank_max_std"),
        (lambda r: r["safety"].update(black=3), {}, "safety.black", "it must be a table"),
        (lambda r: r["safety"].update(dark_level=3), {}, "safety.dark_level", "not a known key"),  # only in [safety.black]
        (lambda r: r["history"].update(busy_timeout_s=0), {}, "history.busy_timeout_s", "more than 0 seconds"),
        (lambda r: r["previews"].update(max_side=5000), {}, "previews.max_side", "within 16..1024"),
        (lambda r: None, {"ROUTER_LLM_ID": " "}, "ROUTER_LLM_ID", "non-empty string"),
        (lambda r: None, {"PROMPTPICS_DEVICE": "tpu"}, "PROMPTPICS_DEVICE", "'cuda:N'"),
    ],
)
def test_nested_tables_and_environment_values_are_named_in_full(mutate: Any, env: dict[str, str], key: str,
                                                                   rule: str) -> None:
    raw = repo_config_raw()
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        parse(raw, env)
    assert info.value.key == key and rule in info.value.rule


def test_defaults_live_in_the_schema_not_in_the_file() -> None:
    raw = {"models": repo_config_raw()["models"]}
    config = parse(raw)
    assert config.limits == Limits() and config.scheduler == SchedulerSettings() and config.safety == SafetyConfig()
    assert config.previews == PreviewSettings() and config.router.stages == ("rules", "embeddings", "llm")
