"""Request normalisation: defaults, the size cap, family rounding, and refusals that teach."""

from __future__ import annotations

import random

import pytest

from engine.config import Config, load_config
from engine.errors import RequestError
from engine.jobs import JobRequest
from engine.core.normalise import normalise, requested_model
from tests.conftest import REPO


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(REPO / "config.toml", env={})


def params(config: Config, model: str = "flux_dev", **fields):
    return normalise(JobRequest(prompt=fields.pop("prompt", "a fox"), **fields), config.model(model), config,
                     rng=random.Random(3))


def test_model_defaults_fill_missing_steps_and_guidance(config: Config) -> None:
    p = params(config, "sd3_medium")
    assert (p.steps, p.guidance) == (30, 6.0)
    assert (p.width, p.height) == (768, 768)


def test_oversized_sides_are_capped_not_refused(config: Config) -> None:
    p = params(config, "logo_sdxl", width=2000, height=1200)
    assert (p.width, p.height) == (768, 768)


@pytest.mark.parametrize(("model", "asked", "expected"), [("realvis_xl", 700, 696), ("flux_dev", 700, 688),
                                                          ("sd3_medium", 519, 512), ("realvis_xl", 513, 512)])
def test_sides_round_down_to_what_the_family_accepts(config: Config, model: str, asked: int, expected: int) -> None:
    assert params(config, model, width=asked).width == expected


def test_seed_is_chosen_and_recorded_when_absent(config: Config) -> None:
    p = params(config)
    assert 0 <= p.seed < 2**32
    assert params(config, seed=42).seed == 42


def test_prompt_whitespace_is_collapsed(config: Config) -> None:
    assert params(config, prompt="  a\n\nfox   in  snow ").prompt == "a fox in snow"


def test_control_characters_are_removed_from_prompts(config: Config) -> None:
    # NUL, BEL, ESC, DEL and C1 go without a trace, so a word split by one is whole again
    # (the safety prompt check then sees "cocaine", not "co" + NUL + "caine").
    p = params(config, prompt="\x00a fox\x07 with co\x00caine\x1b[0m\x7f \x85", negative_prompt="fo\x00g\x9f")
    assert p.prompt == "a fox with cocaine[0m" and p.negative_prompt == "fog"


def test_a_prompt_of_control_characters_only_is_refused_and_shown_escaped(config: Config) -> None:
    with pytest.raises(RequestError) as info:
        params(config, prompt="\x00\x07 \x1b")
    assert info.value.user_message == "`prompt` is '\\x00\\x07 \\x1b', but it must not be empty"
    assert "\x00" not in info.value.user_message


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "   "}, "`prompt` is '   ', but it must not be empty"),
        ({"prompt": "x" * 1001}, "`prompt` is '1001 characters', but it must be at most 1000 characters"),
        ({"negative_prompt": "y" * 501}, "`negative_prompt` is '501 characters', but it must be at most 500 characters"),
        ({"steps": 0}, "`steps` is 0, but it must be a whole number from 1 to 50"),
        ({"steps": 51}, "`steps` is 51, but it must be a whole number from 1 to 50"),
        ({"guidance": 20.5}, "`guidance` is 20.5, but it must be a number from 0 to 15"),
        ({"guidance": -1.0}, "`guidance` is -1.0, but it must be a number from 0 to 15"),
        ({"width": 100}, "`width` is 100, but it must be at least 256 pixels"),
        ({"height": "tall"}, "`height` is 'tall', but it must be a whole number of pixels"),
        ({"seed": -5}, "`seed` is -5, but it must be a whole number from 0 to 4294967295"),
    ],
)
def test_bad_fields_are_refused_naming_field_value_and_rule(config: Config, fields: dict, message: str) -> None:
    with pytest.raises(RequestError) as info:
        params(config, **fields)
    assert info.value.user_message == message


def test_model_choice_accepts_auto_and_known_ids_only(config: Config) -> None:
    assert requested_model(JobRequest("x", model="auto"), config) is None
    assert requested_model(JobRequest("x", model=" RealVis_XL "), config) == "realvis_xl"
    with pytest.raises(RequestError, match=r"`model` is 'dalle', but it must be 'auto' or one of: flux_dev, realvis_xl"):
        requested_model(JobRequest("x", model="dalle"), config)
