"""`[previews] policy`: a preview is checked before it is published ("checked", the default), shown
only in NSFW-allowed channels ("nsfw_channels_only"), or shown unchecked ("unchecked"). Through the
real engine on tiny pipelines, with detector doubles that flag preview-sized pictures only, so
the final image's own check is seen apart from the previews'."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine import Config, Engine, JobFinished, JobRequest
from engine.config import PreviewSettings, SafetyConfig, parse_config, validate_table
from engine.errors import ConfigError
from engine.jobs import JobPreviewed
from engine.pipelines import CheckedPreviews, Preview, preview_callback
from engine.safety import SafetyPolicy, Verdict
from tests.conftest import REPO, repo_config_raw
from tests.test_safety_engine import runner_with

PREVIEW_SIDE = 32  # previews of a 64x64 job are 32x32: a double can tell them from the final image
EVERY_STEP = PreviewSettings(every_steps=1, min_interval_s=0.0, max_side=PREVIEW_SIDE)


class FlagsPreviews:
    """Flags every preview-sized picture and passes the final image; remembers what it saw."""

    def __init__(self, name: str = "nsfw", kind: str = "nsfw", *, flag: bool = True) -> None:
        self.name, self.kind, self._flag = name, kind, flag
        self.previews: list[np.ndarray] = []
        self.finals = 0

    def check_blocking(self, image: Any, *, pipeline_output: Any = None) -> Verdict:
        if max(image.size) <= PREVIEW_SIDE:
            self.previews.append(np.asarray(image.convert("RGB")).copy())
            return Verdict(self.name, self._flag, 0.9 if self._flag else 0.1, "double")
        self.finals += 1
        return Verdict(self.name, False, 0.0, "double")


async def run_job(config: Config, *detectors: Any, nsfw_allowed: bool = False) -> tuple[list[Any], list[Any]]:
    """(the job's own events, every event a subscriber got), once the job has ended."""
    async with Engine(config, runner_factory=runner_with(*detectors)) as engine:
        seen = engine.subscribe()
        handle = await engine.submit(JobRequest("a fox in the snow", model="sd3_medium", steps=5, width=64, height=64,
                                                nsfw_allowed=nsfw_allowed))
        events = [e async for e in handle.events()]  # ends with the final event
        published = []
        while not seen.empty():  # the engine puts each event to every subscriber as it emits it
            published.append(seen.get_nowait())
        engine.unsubscribe(seen)
    return events, published


def previews_in(events: list[Any]) -> list[JobPreviewed]:
    return [e for e in events if isinstance(e, JobPreviewed)]


def with_previews(config: Config, settings: PreviewSettings) -> Config:
    return config.model_copy(update={"previews": settings})


# -- "checked", the default ------------------------------------------------------------------------


def test_checked_is_the_default_policy() -> None:
    assert PreviewSettings().policy == "checked"


async def test_a_flagged_preview_reaches_no_subscriber_and_the_final_image_still_does(tiny_config: Config) -> None:
    nsfw = FlagsPreviews()
    events, published = await run_job(with_previews(tiny_config, EVERY_STEP), nsfw)
    assert previews_in(events) == [] and previews_in(published) == []
    assert len(nsfw.previews) == 1  # the first flag stops previews for the attempt: nothing more checked
    assert isinstance(events[-1], JobFinished) and nsfw.finals == 1  # the image itself: checked and posted
    assert any(isinstance(e, JobFinished) for e in published)


async def test_each_published_preview_is_a_picture_the_detectors_passed_first(tiny_config: Config) -> None:
    nsfw = FlagsPreviews(flag=False)
    events, published = await run_job(with_previews(tiny_config, EVERY_STEP), nsfw)
    shown = previews_in(published)
    assert [p.step for p in shown] == [1, 2, 3, 4] and previews_in(events) == shown
    assert len(nsfw.previews) == len(shown)
    for preview, checked in zip(shown, nsfw.previews, strict=True):  # the very bytes posted, decoded
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(preview.image)).convert("RGB")), checked)


class FlagsFirstFinal(FlagsPreviews):
    """Passes every preview and flags the first final image only."""

    def check_blocking(self, image: Any, *, pipeline_output: Any = None) -> Verdict:
        if max(image.size) <= PREVIEW_SIDE:
            return super().check_blocking(image)
        self.finals += 1
        return Verdict(self.name, self.finals == 1, 0.9 if self.finals == 1 else 0.1, "double")


async def test_a_checked_preview_of_an_attempt_rejected_later_is_withdrawn(tiny_config: Config) -> None:
    nsfw = FlagsFirstFinal(flag=False)
    events, _ = await run_job(with_previews(tiny_config, EVERY_STEP), nsfw)
    shown = [(e.step, e.withdrawn) for e in previews_in(events)]
    assert shown == [(1, False), (2, False), (3, False), (4, False), (0, True),
                     (1, False), (2, False), (3, False), (4, False)]
    assert isinstance(events[-1], JobFinished) and nsfw.finals == 2


async def test_a_black_preview_is_dropped_even_where_nsfw_is_allowed(tiny_config: Config) -> None:
    black = FlagsPreviews("black_double", "black")
    events, published = await run_job(with_previews(tiny_config, EVERY_STEP), black, nsfw_allowed=True)
    assert previews_in(published) == [] and len(black.previews) == 1
    assert isinstance(events[-1], JobFinished)


async def test_an_nsfw_allowed_job_gets_previews_without_the_nsfw_detector(tiny_config: Config) -> None:
    nsfw = FlagsPreviews()  # would flag every preview: it is not asked
    events, published = await run_job(with_previews(tiny_config, EVERY_STEP), nsfw, nsfw_allowed=True)
    assert [p.step for p in previews_in(published)] == [1, 2, 3, 4]
    assert nsfw.previews == [] and nsfw.finals == 1  # the final image's loop still runs it (and records)
    assert isinstance(events[-1], JobFinished)


def test_a_preview_that_cannot_be_checked_is_not_shown() -> None:
    shown: list[Preview] = []

    def broken_check(picture: Any) -> str | None:
        raise RuntimeError("detector crashed")

    gate = CheckedPreviews(broken_check, shown.append, "k7mq2x")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buffer, format="JPEG")
    gate(Preview(1, 4, buffer.getvalue(), "image/jpeg", 8, 8))
    gate(Preview(2, 4, buffer.getvalue(), "image/jpeg", 8, 8))
    assert shown == [] and gate.stopped


def test_the_policy_applies_the_final_image_rule_to_a_preview_with_the_real_nudenet_path() -> None:
    class Model:  # NudeNet's model, answering one detection; the thresholds are the real ones
        calls = 0

        def detect(self, image: Any) -> list[dict[str, Any]]:
            Model.calls += 1
            return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.8, "box": [0, 0, 8, 8]}]

    policy = SafetyPolicy.from_config(SafetyConfig(), {}, nudenet_loader=Model)
    picture = Image.new("RGB", (32, 32), (200, 160, 140))
    assert policy.preview_problem_blocking(picture) == "nsfw" and Model.calls == 1
    assert policy.preview_problem_blocking(picture, nsfw_allowed=True) is None and Model.calls == 1  # not run
    assert policy.preview_problem_blocking(Image.new("RGB", (32, 32)), nsfw_allowed=True) == "black"
    off = SafetyPolicy.from_config(SafetyConfig(enabled=False), {}, nudenet_loader=Model)
    assert off.preview_problem_blocking(picture) is None  # safety off: the final image is not checked either


# -- "nsfw_channels_only" and "unchecked" -----------------------------------------------------------


async def test_nsfw_channels_only_shows_no_previews_for_a_sfw_job(tiny_config: Config) -> None:
    nsfw = FlagsPreviews()
    config = with_previews(tiny_config, EVERY_STEP.model_copy(update={"policy": "nsfw_channels_only"}))
    events, published = await run_job(config, nsfw)
    assert previews_in(published) == [] and nsfw.previews == []
    assert isinstance(events[-1], JobFinished)


async def test_nsfw_channels_only_shows_previews_for_an_nsfw_allowed_job_unchecked(tiny_config: Config) -> None:
    black = FlagsPreviews("black_double", "black")  # not asked: this policy checks no preview
    config = with_previews(tiny_config, EVERY_STEP.model_copy(update={"policy": "nsfw_channels_only"}))
    events, published = await run_job(config, black, nsfw_allowed=True)
    assert [p.step for p in previews_in(published)] == [1, 2, 3, 4] and black.previews == []
    assert isinstance(events[-1], JobFinished)


async def test_unchecked_shows_previews_before_any_check(tiny_config: Config) -> None:
    nsfw = FlagsPreviews()
    config = with_previews(tiny_config, EVERY_STEP.model_copy(update={"policy": "unchecked"}))
    _, published = await run_job(config, nsfw)
    assert [p.step for p in previews_in(published)] == [1, 2, 3, 4] and nsfw.previews == []


@pytest.mark.parametrize("policy, nsfw_allowed, expected", [
    ("checked", False, "checked"), ("checked", True, "checked"),
    ("nsfw_channels_only", False, None), ("nsfw_channels_only", True, "emit"),
    ("unchecked", False, "emit"), ("unchecked", True, "emit"),
])
def test_which_callback_each_policy_gives(policy: str, nsfw_allowed: bool, expected: str | None) -> None:
    def emit(preview: Preview) -> None: ...

    callback = preview_callback(PreviewSettings(policy=policy), emit, nsfw_allowed=nsfw_allowed, check=lambda p: None)
    kind = None if callback is None else "emit" if callback is emit else type(callback).__name__
    assert kind == {"checked": "CheckedPreviews", "emit": "emit", None: None}[expected]
    off = preview_callback(PreviewSettings(enabled=False, policy=policy), emit, nsfw_allowed=nsfw_allowed,
                           check=lambda p: None)
    assert off is None  # enabled = false: no previews under any policy


# -- the config --------------------------------------------------------------------------------------


def test_the_policy_key_is_read_and_a_wrong_value_names_key_value_and_rule() -> None:
    for policy in ("checked", "nsfw_channels_only", "unchecked"):
        assert validate_table(PreviewSettings, {"policy": policy}, "previews.").policy == policy
    for value in ("sometimes", True, "Checked"):
        with pytest.raises(ConfigError) as caught:
            validate_table(PreviewSettings, {"policy": value}, "previews.")
        assert caught.value.key == "previews.policy" and caught.value.value == value
        assert "must be one of 'checked', 'nsfw_channels_only', 'unchecked'" in str(caught.value)


@pytest.mark.parametrize("enabled", [True, False])
def test_an_old_previews_table_with_enabled_only_still_loads(enabled: bool) -> None:
    raw = repo_config_raw()
    raw["previews"] = {"enabled": enabled}
    previews = parse_config(raw, {}, base_dir=REPO).previews
    assert previews.enabled is enabled and previews.policy == "checked"
