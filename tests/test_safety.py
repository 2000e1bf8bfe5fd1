"""The safety loop: detectors, the prompt check, rewriting, and the retry/fallback/refuse policy.

Fakes at the seams (scripted generate closures, a detector that flags once, a scripted chat
model); real models where they matter: NudeNet's shipped ONNX model, the tiny random Qwen through
the real LLMCache, and the tiny HiDream and FLUX pipelines for the fallback.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.config import SafetyConfig, check_safety_models, parse_config, validate_table
from engine.errors import ConfigError
from engine.jobs import GenerationParams
from engine.llm import LLMCache
from engine.safety import (
    Attempt,
    BlackImageDetector,
    BlankImageError,
    Generated,
    NonFiniteError,
    NudeNetDetector,
    PipelineFlagDetector,
    PromptCheck,
    PromptRewriter,
    SafetyPolicy,
    UnsafeContentError,
    Verdict,
    check_latents_blocking,
    guard_vae_decode_blocking,
)
from tests.conftest import REPO, make_tiny_config, repo_config_raw

MODELS = parse_config(repo_config_raw(), {}, base_dir=REPO).models
DEFAULTS = validate_table(SafetyConfig, {}, "safety.")


def params(prompt: str = "a red fox in the rain", model_id: str = "realvis_xl", seed: int = 100) -> GenerationParams:
    return GenerationParams(prompt=prompt, negative_prompt="", model_id=model_id, steps=2, guidance=4.0,
                            width=64, height=64, seed=seed)


def good_image(seed: int = 0) -> Image.Image:
    """A plain synthetic picture: a colour gradient with some noise (clearly not black, not NSFW)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, np.full_like(x, 128)], axis=2) + rng.integers(0, 20, (64, 64, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


BLACK = np.zeros((64, 64, 3), np.uint8)
NAN = np.full((64, 64, 3), np.nan, np.float32)


class Scripted:
    """A generate closure that returns the given images in order and remembers what it was asked."""

    def __init__(self, *images: Any) -> None:
        self._images: Iterator[Any] = iter(images)
        self.calls: list[GenerationParams] = []

    def __call__(self, p: GenerationParams) -> Any:
        self.calls.append(p)
        item = next(self._images)
        if isinstance(item, BaseException):
            raise item
        return item


class FlagsFirstOnly:
    """An NSFW detector that flags the first image it sees and no other."""

    name, kind = "nsfw", "nsfw"

    def __init__(self) -> None:
        self.seen = 0

    def check_blocking(self, image: Any, *, pipeline_output: Any = None) -> Verdict:
        self.seen += 1
        return Verdict(self.name, self.seen == 1, 0.9 if self.seen == 1 else 0.1, "fake")


class AlwaysFlags:
    name, kind = "nsfw", "nsfw"

    def check_blocking(self, image: Any, *, pipeline_output: Any = None) -> Verdict:
        return Verdict(self.name, True, 0.87, "FEMALE_BREAST_EXPOSED 0.87")


class ScriptedChat:
    """A chat model (engine.llm.ChatLLM's generate_blocking) with scripted answers."""

    def __init__(self, *answers: str) -> None:
        self._answers = iter(answers)
        self.asked: list[tuple[str, str]] = []

    def generate_blocking(self, system: str, user: str, *, max_new_tokens: int = 64,
                          timeout_s: float | None = None) -> str:
        self.asked.append((system, user))
        return next(self._answers)


def chat_cache(chat: Any) -> LLMCache:
    """The real LLMCache with a loader that hands out ``chat``."""
    return LLMCache("cpu", None, loader=lambda source, device, dtype: chat)


def make_policy(*detectors: Any, llms: Any = None, **overrides: Any) -> SafetyPolicy:
    config = DEFAULTS.model_copy(update={**overrides})
    check = PromptCheck(config.blocked_terms, config.drug_terms, config.minor_terms)
    rewriter = PromptRewriter(check, llms=llms, llm_source="rewrite-llm" if llms else "",
                              replacements=config.replacements, blocked_terms=config.blocked_terms)
    found = detectors or (BlackImageDetector(dark_level=config.dark_level, dark_fraction=config.dark_fraction),)
    return SafetyPolicy(config, models=MODELS, prompt_check=check, detectors=found, rewriter=rewriter)


@pytest.fixture(scope="session")
def nudenet() -> NudeNetDetector:
    detector = NudeNetDetector(DEFAULTS.nudenet_thresholds)
    detector.load_blocking()
    return detector


# -- the prompt check --------------------------------------------------------------------------

CHECK = PromptCheck(DEFAULTS.blocked_terms, DEFAULTS.drug_terms, DEFAULTS.minor_terms)


@pytest.mark.parametrize("prompt, terms", [
    ("a nude woman on a beach", ("nude",)),
    ("NAKED man, oil painting", ("naked",)),
    ("a pornographic scene", ("pornographic",)),
    ("nude_portrait, studio light", ("nude",)),
    ("Ｎｕｄｅ figure", ("nude",)),  # full-width letters fold to plain ones
    ("a glass of coke on a table", ("coke",)),
    ("a pile of crack cocaine", ("crack cocaine",)),
])
def test_prompt_check_flags_listed_terms(prompt: str, terms: tuple[str, ...]) -> None:
    finding = CHECK.check(prompt)
    assert finding.verdict.flagged and finding.terms == terms and not finding.refuse
    assert finding.verdict.detector == "prompt" and finding.verdict.score == 1.0


@pytest.mark.parametrize("prompt", [
    "a red fox in the rain", "Essex countryside at dawn", "a cocktail party", "a therapist's office",
    "Scunthorpe town hall", "a cracked wall with ivy", "a glass of cola", "kids playing football", "a teen reading",
])
def test_prompt_check_passes_clean_prompts_and_words_that_merely_contain_a_term(prompt: str) -> None:
    finding = CHECK.check(prompt)
    assert not finding.verdict.flagged and finding.terms == () and finding.verdict.score == 0.0


def test_a_blocked_term_with_a_minor_term_is_refused_outright_but_drugs_with_kids_are_not() -> None:
    refused = CHECK.check("a naked child")
    assert refused.refuse and refused.minor_terms == ("child",)
    assert not CHECK.check("kids drinking coke").refuse


def test_prompt_check_has_room_for_a_classifier() -> None:
    class Worried:
        def score_blocking(self, prompt: str) -> float:
            return 0.8 if "spicy" in prompt else 0.1

    check = PromptCheck(["nude"], classifier=Worried(), classifier_threshold=0.5)
    assert check.check("a spicy picture").verdict.flagged and check.check("a spicy picture").verdict.score == 0.8
    assert not check.check("a mild picture").verdict.flagged


# -- image detectors -----------------------------------------------------------------------------


def test_black_detector_flags_black_and_nan_and_passes_pictures() -> None:
    detector = BlackImageDetector()
    assert detector.check_blocking(BLACK).flagged
    assert detector.check_blocking(Image.fromarray(BLACK + 3)).flagged  # near-black PIL image
    nan = detector.check_blocking(NAN)
    assert nan.flagged and nan.score == 1.0 and "NaN" in nan.detail
    half_nan = np.full((64, 64, 3), 0.5, np.float32)
    half_nan[0, 0, 0] = np.inf
    assert detector.check_blocking(half_nan).flagged
    for clean in (good_image(), np.full((64, 64, 3), 0.5, np.float32), Image.new("RGB", (64, 64), "white")):
        assert not detector.check_blocking(clean).flagged
    dark_scene = np.zeros((64, 64, 3), np.uint8)
    dark_scene[:, :16] = 200  # a dark night scene with a lit window: a quarter bright
    assert not detector.check_blocking(dark_scene).flagged


def test_black_detector_blank_check_is_opt_in() -> None:
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    assert not BlackImageDetector().check_blocking(grey).flagged
    assert BlackImageDetector(blank_max_std=1.0).check_blocking(grey).flagged


def test_black_detector_costs_a_few_milliseconds_at_768px() -> None:
    detector, image = BlackImageDetector(), Image.fromarray(np.random.default_rng(0).integers(0, 255, (768, 768, 3), np.uint8))
    detector.check_blocking(image)
    # CPU time of this process, not the wall clock: other processes on a loaded machine don't count.
    started = time.process_time()
    for _ in range(10):
        detector.check_blocking(image)
    assert (time.process_time() - started) / 10 < 0.05


def test_nudenet_thresholds_and_classes_come_from_config() -> None:
    class Found:
        def detect(self, image: Any) -> list[dict[str, Any]]:
            assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
            return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.55, "box": [0, 0, 9, 9]},
                    {"class": "FACE_FEMALE", "score": 0.95, "box": [0, 0, 9, 9]}]

    flagged = NudeNetDetector({"FEMALE_BREAST_EXPOSED": 0.5}, loader=Found).check_blocking(good_image())
    assert flagged.flagged and flagged.score == pytest.approx(0.55) and "FEMALE_BREAST_EXPOSED 0.55" in flagged.detail
    passed = NudeNetDetector({"FEMALE_BREAST_EXPOSED": 0.6}, loader=Found).check_blocking(good_image())
    assert not passed.flagged and passed.score == pytest.approx(0.55)  # FACE_FEMALE is not a configured class


def test_nudenet_real_model_does_not_block_safe_images(nudenet: NudeNetDetector, tiny_models: Any,
                                                       tmp_path: Path) -> None:
    from engine.pipelines import generate_blocking, load_pipeline_blocking

    config = make_tiny_config(tiny_models, tmp_path / "data")
    loaded = load_pipeline_blocking(config.model("flux_dev"), _cpu(), _float32())
    noise = generate_blocking(loaded, dataclasses.replace(params(model_id="flux_dev"), width=256, height=256),
                              on_step=lambda i, n: None, cancel=threading.Event())
    for image in (noise, good_image(), Image.new("RGB", (320, 240), "skyblue"), BLACK):
        verdict = nudenet.check_blocking(image)
        assert not verdict.flagged, verdict.detail
        assert verdict.detector == "nsfw" and 0.0 <= (verdict.score or 0.0) < 0.4


def test_nudenet_real_path_flags_a_positive_and_feeds_the_model_rgb(nudenet: NudeNetDetector,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only "safe images pass": the real path - our RGB conversion, NudeNet's own preprocessing,
    the shipped ONNX session, NudeNet's post-processing (boxes, NMS, labels), our thresholds - flags
    a positive. The session really runs on the real input; its class scores are then replaced by
    a recorded-style detection (one box, FEMALE_BREAST_EXPOSED 0.9), since no explicit picture
    belongs in a test suite."""
    import numpy as np

    model: Any = nudenet._model
    real_session = model.onnx_session
    seen: list[Any] = []

    class RecordingSession:
        def run(self, names: Any, feeds: dict[str, Any]) -> Any:
            (blob,) = feeds.values()
            seen.append(blob)
            (out,) = real_session.run(names, feeds)  # (1, 4 + 18 classes, anchors)
            out = np.array(out, copy=True)
            out[0, 4:, :] = 0.0
            out[0, :4, 0] = (160.0, 120.0, 80.0, 60.0)  # a box in the middle (centre x, y, width, height)
            out[0, 4 + 3, 0] = 0.9  # class 3: FEMALE_BREAST_EXPOSED
            return [out]

    monkeypatch.setattr(model, "onnx_session", RecordingSession())
    verdict = nudenet.check_blocking(Image.new("RGB", (320, 240), (255, 0, 0)))
    assert verdict.flagged and verdict.detector == "nsfw"
    assert verdict.score == pytest.approx(0.9, abs=1e-6) and "FEMALE_BREAST_EXPOSED 0.90" in verdict.detail
    # A pure red picture reaches the model red in channel 0: RGB, the order YOLOv8 (ultralytics) trains in.
    (blob,) = seen
    assert blob.shape == (1, 3, 320, 320)
    red, green, blue = (float(blob[0, c, :240, :].mean()) for c in range(3))
    assert red == pytest.approx(1.0, abs=0.01) and green < 0.01 and blue < 0.01
    # Below its threshold the same detection does not flag (the thresholds are the real ones).
    strict = NudeNetDetector({"FEMALE_BREAST_EXPOSED": 0.95}, loader=lambda: model)
    assert not strict.check_blocking(Image.new("RGB", (320, 240), (255, 0, 0))).flagged


def test_missing_nudenet_package_is_a_config_error_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from engine.safety.detectors import _shared_nudenet

    monkeypatch.setitem(sys.modules, "nudenet", None)  # import nudenet -> ImportError
    with pytest.raises(ConfigError, match=r"safety\.nudenet\.enabled.*pip install nudenet"):
        _shared_nudenet.__wrapped__(1)  # past the per-process cache


def test_pipeline_flag_detector_reads_nsfw_content_detected() -> None:
    detector = PipelineFlagDetector()
    assert detector.check_blocking(good_image(), pipeline_output=SimpleNamespace(nsfw_content_detected=[True])).flagged
    assert not detector.check_blocking(good_image(), pipeline_output=SimpleNamespace(nsfw_content_detected=[False])).flagged
    unreported = detector.check_blocking(good_image(), pipeline_output=None)
    assert not unreported.flagged and unreported.score is None


# -- rewriting -----------------------------------------------------------------------------------


def rewriter(chat: Any = None) -> PromptRewriter:
    return PromptRewriter(CHECK, llms=chat_cache(chat) if chat else None, llm_source="rewrite-llm" if chat else "",
                          replacements=DEFAULTS.replacements, blocked_terms=DEFAULTS.blocked_terms, max_chars=80)


def test_a_valid_llm_rewrite_is_used_without_its_label_and_quotes() -> None:
    chat = ScriptedChat('Rewritten prompt: "a glass of cola soda on a wooden table"\nI changed coke to cola.')
    rewrite = rewriter(chat).rewrite_blocking("a glass of coke on a wooden table", reason="prompt")
    assert (rewrite.prompt, rewrite.method) == ("a glass of cola soda on a wooden table", "llm")
    system, user = chat.asked[0]
    assert "disambiguate drug-like words" in system.lower() and "a glass of coke on a wooden table" in user


@pytest.mark.parametrize("answer, problem", [
    ("", "empty"),
    ("a " + "very " * 40 + "long prompt", "characters"),
    ("A glass of COKE on a wooden table.", "repeated"),
    ("I'm sorry, I can't help with that.", "declined"),
    ("a glass of coke and some cocaine", "still flagged"),
    ("<|im_end|> ?!", "no words"),
])
def test_an_unusable_llm_answer_falls_back_to_the_sanitiser(answer: str, problem: str) -> None:
    rewrite = rewriter(ScriptedChat(answer)).rewrite_blocking("a glass of coke on a wooden table", reason="prompt")
    assert (rewrite.prompt, rewrite.method) == ("a glass of cola on a wooden table", "sanitiser")
    assert problem in rewrite.detail


def test_the_sanitiser_drops_sexual_terms_and_asks_for_clothes() -> None:
    sanitiser = rewriter()
    assert sanitiser.sanitise("a red fox, naked, in the rain", reason="prompt") == \
        "a red fox, in the rain, fully clothed, safe for work"
    assert sanitiser.sanitise("a red fox", reason="nsfw") == "a red fox, fully clothed, safe for work"
    assert sanitiser.sanitise("a red fox", reason="black") == "a red fox"
    assert sanitiser.sanitise("nude, naked", reason="prompt") == ""  # nothing left to draw


def test_rewrite_with_the_tiny_random_qwen_ends_in_the_sanitiser(tiny_models: Any) -> None:
    loads: list[str] = []

    def counting_loader(source: str, device: Any, dtype: Any) -> Any:
        from engine.llm import ChatLLM

        loads.append(source)
        return ChatLLM.load_blocking(source, device, dtype)

    cache = LLMCache(_cpu(), _float32(), loader=counting_loader)
    source = str(tiny_models.chat_llm)
    router_copy = cache.get_blocking(source)  # the router loaded it first
    tiny = PromptRewriter(CHECK, llms=cache, llm_source=source, replacements=DEFAULTS.replacements,
                          blocked_terms=DEFAULTS.blocked_terms, max_new_tokens=16)
    rewrite = tiny.rewrite_blocking("a glass of coke on a table", reason="prompt")
    assert (rewrite.prompt, rewrite.method) == ("a glass of cola on a table", "sanitiser")
    assert rewrite.detail  # random weights answer nothing usable, and we say why
    assert loads == [source] and cache.get_blocking(source) is router_copy  # one copy, shared


def test_a_failing_llm_degrades_to_the_sanitiser() -> None:
    def broken(source: str, device: Any, dtype: Any) -> Any:
        raise OSError("no weights here")

    failing = PromptRewriter(CHECK, llms=LLMCache("cpu", None, loader=broken), llm_source="missing")
    rewrite = failing.rewrite_blocking("a nude statue", reason="prompt")
    assert rewrite.method == "sanitiser" and "OSError" in rewrite.detail and "nude" not in rewrite.prompt


# -- the policy ------------------------------------------------------------------------------------


def test_black_then_nan_then_good_posts_the_good_one_on_the_third_attempt() -> None:
    good = good_image()
    generate = Scripted(BLACK, NAN, good)
    told: list[Attempt] = []
    outcome = make_policy().run_blocking(params(), generate, on_attempt=told.append)
    assert outcome.image is good
    assert [a.outcome for a in outcome.attempts] == ["retried", "retried", "succeeded"]
    assert [a.problem for a in outcome.attempts] == ["black", "black", None]
    assert "NaN" in outcome.attempts[1].verdicts["black"].detail
    assert [p.seed for p in generate.calls] == [100, 101, 102]  # a new seed each retry
    assert outcome.params.seed == 102 and outcome.params.model_id == "realvis_xl"
    assert outcome.attempts[0].retry_reason == "black: new seed"  # a clean prompt stays as it is
    assert [(a.n, a.outcome) for a in told] == [(1, None), (1, "retried"), (2, None), (2, "retried"),
                                                (3, None), (3, "succeeded")]


def test_a_detector_that_flags_only_the_first_attempt_gets_a_rewrite_and_a_retry() -> None:
    good_one, flagged = good_image(1), good_image(2)
    generate = Scripted(flagged, good_one)
    chat = ScriptedChat("a red fox in the rain wearing a yellow raincoat")
    outcome = make_policy(BlackImageDetector(), FlagsFirstOnly(), llms=chat_cache(chat)).run_blocking(params(), generate)
    assert outcome.image is good_one and outcome.image is not flagged
    first, second = outcome.attempts
    assert (first.outcome, first.problem, first.verdicts["nsfw"].score) == ("retried", "nsfw", 0.9)
    assert first.retry_reason == "nsfw: rewrote the prompt (llm)"
    assert generate.calls[1].prompt == "a red fox in the rain wearing a yellow raincoat"
    assert generate.calls[1].negative_prompt == "nudity, nsfw"
    assert second.outcome == "succeeded" and second.prompt_used == generate.calls[1].prompt
    assert "rewritten for safety" in outcome.notice


def test_a_flagged_prompt_is_rewritten_before_any_gpu_time() -> None:
    generate = Scripted(good_image())
    outcome = make_policy().run_blocking(params("a glass of coke on a table"), generate)
    assert [p.prompt for p in generate.calls] == ["a glass of cola on a table"]
    first = outcome.attempts[0]
    assert first.verdicts["prompt"].flagged and "coke" in first.note and first.outcome == "succeeded"


def test_a_prompt_pairing_sexual_terms_with_minors_is_refused_without_generating() -> None:
    generate = Scripted()
    with pytest.raises(UnsafeContentError, match=r"refused.*\(naked\).*minors \(child\)") as refused:
        make_policy().run_blocking(params("a naked child"), generate, nsfw_allowed=True)
    assert refused.value.reason == "prompt" and refused.value.attempts == () and generate.calls == []


def test_a_prompt_with_nothing_left_after_sanitising_is_refused() -> None:
    with pytest.raises(UnsafeContentError, match="nothing is left to draw") as refused:
        make_policy().run_blocking(params("nude, naked"), Scripted())
    assert refused.value.reason == "prompt"


def test_always_nsfw_refuses_after_max_attempts_and_no_image_leaves() -> None:
    flagged = [good_image(i) for i in range(3)]
    told: list[Attempt] = []
    with pytest.raises(UnsafeContentError, match=r"not safe for work on all 3 attempts \(FEMALE_BREAST_EXPOSED") as refused:
        make_policy(BlackImageDetector(), AlwaysFlags()).run_blocking(params(), Scripted(*flagged), on_attempt=told.append)
    error = refused.value
    assert error.reason == "nsfw" and [a.outcome for a in error.attempts] == ["retried", "retried", "failed"]
    assert error.attempts[-1].action == "refused" and error.attempts[-1].retry_reason is None
    # nothing in the refusal or the records holds an image
    assert not any(isinstance(v, Image.Image | np.ndarray) for a in told for v in dataclasses.astuple(a))
    assert not any(isinstance(v, Image.Image | np.ndarray) for v in vars(error).values())


def test_nsfw_allowed_skips_the_nsfw_block_but_never_the_black_retry() -> None:
    flagged = good_image(3)
    outcome = make_policy(BlackImageDetector(), AlwaysFlags()).run_blocking(
        params("a nude figure drawing"), Scripted(BLACK, flagged), nsfw_allowed=True)
    assert outcome.image is flagged  # allowed here, and still recorded as flagged
    assert [a.problem for a in outcome.attempts] == ["black", None]
    assert outcome.attempts[1].verdicts["nsfw"].flagged
    assert outcome.params.prompt == "a nude figure drawing"  # the adult channel's prompt runs as written


def test_max_attempts_one_refuses_the_first_black_image() -> None:
    with pytest.raises(BlankImageError, match=r"RealVisXL V4.0 returned black or blank images on all 1 attempts"):
        make_policy(max_attempts=1).run_blocking(params(), Scripted(BLACK))


def test_nan_latents_from_the_step_callback_count_as_black() -> None:
    good = good_image()
    outcome = make_policy().run_blocking(params(), Scripted(NonFiniteError("realvis_xl", "latents at step 2"), good))
    assert outcome.image is good
    assert outcome.attempts[0].verdicts["black"] == Verdict("black", True, 1.0, "NaN/Inf in the latents at step 2")
    assert outcome.attempts[0].verdicts.keys() == {"prompt", "black"}  # no image: nothing else to check
    without_black_detector = make_policy(PipelineFlagDetector())
    assert without_black_detector.run_blocking(params(), Scripted(NonFiniteError("x", "latents"), good)).image is good


def test_a_pipeline_that_reports_nsfw_itself_is_retried() -> None:
    good, output = good_image(), SimpleNamespace(nsfw_content_detected=[True])
    outcome = make_policy(BlackImageDetector(), PipelineFlagDetector()).run_blocking(
        params(), Scripted(Generated(good_image(5), output), Generated(good, SimpleNamespace(nsfw_content_detected=[False]))))
    assert outcome.image is good and outcome.attempts[0].problem == "nsfw"


def test_hidream_black_falls_back_to_flux_after_a_rewritten_retry_with_fakes() -> None:
    good = good_image()
    generate = Scripted(BLACK, BLACK, good)
    logo, flux = MODELS["logo_sdxl"], MODELS["flux_dev"]
    defaults = dataclasses.replace(params("a logo with the word FOX", "logo_sdxl"), steps=logo.steps, guidance=logo.guidance)
    outcome = make_policy().run_blocking(defaults, generate)
    assert [p.model_id for p in generate.calls] == ["logo_sdxl", "logo_sdxl", "flux_dev"]
    assert outcome.attempts[1].retry_reason == "black: fell back to flux_dev"
    # HiDream's defaults become FLUX's defaults
    assert (outcome.params.model_id, outcome.params.steps, outcome.params.guidance) == ("flux_dev", flux.steps, flux.guidance)
    assert "HiDream-I1 (text & logos) kept returning black images, so FLUX.1-dev made this one." in outcome.notice


def test_the_fallback_keeps_the_last_attempt_when_attempts_are_short() -> None:
    generate = Scripted(BLACK, good_image())
    chosen = dataclasses.replace(params(model_id="logo_sdxl"), guidance=5.0)
    outcome = make_policy(max_attempts=2).run_blocking(chosen, generate)
    assert [p.model_id for p in generate.calls] == ["logo_sdxl", "flux_dev"]
    assert (outcome.params.steps, outcome.params.guidance) == (2, 5.0)  # chosen by the user: kept


def test_safety_disabled_generates_once_and_checks_nothing() -> None:
    outcome = make_policy(enabled=False).run_blocking(params("a nude statue"), Scripted(BLACK))
    assert outcome.image is BLACK and outcome.attempts[0].verdicts == {}


def test_full_fallback_on_tiny_pipelines_hidream_black_to_flux(tiny_models: Any, tmp_path: Path,
                                                               nudenet: NudeNetDetector) -> None:
    from engine.pipelines import generate_blocking
    from engine.residency import ResidencyManager

    config = make_tiny_config(tiny_models, tmp_path / "data")
    residency = ResidencyManager(_cpu(), _float32())
    generated: list[tuple[str, Any]] = []

    def generate(p: GenerationParams) -> Any:  # the runner's closure: resident, then run
        loaded, _ = residency.acquire_blocking(config.model(p.model_id))
        if loaded.spec.family == "hidream":
            _force_black_decode(loaded.pipe)
        image = generate_blocking(loaded, p, on_step=lambda i, n: None, cancel=threading.Event())
        generated.append((p.model_id, image))
        return image

    policy = SafetyPolicy.from_config(DEFAULTS, config.models)  # NudeNet: the process's copy (the fixture's)
    outcome = policy.run_blocking(params("a logo with the word FOX", model_id="logo_sdxl"), generate)
    assert [a.model_id for a in outcome.attempts] == ["logo_sdxl", "logo_sdxl", "flux_dev"]
    assert [a.problem for a in outcome.attempts] == ["black", "black", None]
    assert {"black", "nsfw", "pipeline_nsfw"} <= outcome.attempts[2].verdicts.keys()
    assert outcome.params.model_id == "flux_dev" and {r.model_id for r in residency.snapshot()} == {"flux_dev"}
    assert outcome.image is generated[-1][1] and np.asarray(outcome.image).mean() > 20
    assert all(outcome.image is not image for model, image in generated if model == "logo_sdxl")


# -- prevention --------------------------------------------------------------------------------------


def test_latent_check_raises_on_nan_and_passes_finite() -> None:
    import torch

    check_latents_blocking(torch.zeros(1, 4, 8, 8), "realvis_xl", 1)
    with pytest.raises(NonFiniteError, match="latents at step 3"):
        check_latents_blocking(torch.tensor([0.0, float("nan")]), "realvis_xl", 3)


def test_float16_vae_overflow_decodes_black_and_the_guard_prevents_it(tiny_models: Any, tmp_path: Path) -> None:
    """The SDXL failure mode on tiny weights: a VAE whose activations pass float16's 65504."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from engine.pipelines import LoadedPipeline, generate_blocking

    config = make_tiny_config(tiny_models, tmp_path / "data")
    spec, p = config.model("realvis_xl"), params()

    def run(guard: bool) -> Any:
        # Loaded by hand: engine.pipelines guards every pipeline it loads, and the baseline must not be.
        pipe = StableDiffusionXLPipeline.from_pretrained(spec.source, dtype=torch.float16, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        loaded = LoadedPipeline(spec, pipe, _cpu(), torch.float16, "cpu", 0, 0.0)
        vae = loaded.pipe.vae
        vae.register_to_config(force_upcast=False)  # as an SDXL VAE config that does not ask for it
        with torch.no_grad():
            vae.decoder.conv_in.weight.mul_(2e4)  # the next GroupNorm would bring it back in float32
        if guard:
            guard_vae_decode_blocking(loaded.pipe, spec.id, torch.float16)
        return generate_blocking(loaded, p, on_step=lambda i, n: None, cancel=threading.Event())

    with np.errstate(invalid="ignore"):  # diffusers casts the NaN pixels to uint8 (0): a black image
        assert BlackImageDetector().check_blocking(run(guard=False)).flagged
    assert not BlackImageDetector().check_blocking(run(guard=True)).flagged


def test_the_decode_guard_raises_on_nan_pixels(tiny_models: Any, tmp_path: Path) -> None:
    import torch

    from engine.pipelines import load_pipeline_blocking

    config = make_tiny_config(tiny_models, tmp_path / "data")
    loaded = load_pipeline_blocking(config.model("flux_dev"), _cpu(), _float32())
    guard_vae_decode_blocking(loaded.pipe, "flux_dev", torch.float32)
    guard_vae_decode_blocking(loaded.pipe, "flux_dev", torch.float32)  # idempotent
    latents = torch.zeros(1, 16, 8, 8)
    assert loaded.pipe.vae.decode(latents, return_dict=False)[0].isfinite().all()
    with pytest.raises(NonFiniteError, match="decoded image"):
        loaded.pipe.vae.decode(latents * float("nan"), return_dict=False)


# -- configuration -----------------------------------------------------------------------------------


def test_safety_config_defaults_and_overrides() -> None:
    assert validate_table(SafetyConfig, None, "safety.") == validate_table(SafetyConfig, {}, "safety.") == SafetyConfig()
    config = validate_table(SafetyConfig, {
        "max_attempts": 4, "nsfw_allowed_channels": ["slack:C0123"], "black": {"dark_level": 4},
        "nudenet": {"thresholds": {"BUTTOCKS_EXPOSED": 0.7}}, "prompt": {"blocked_terms": ["Gore", "porn*"]},
        "rewrite": {"use_llm": False},
    }, "safety.")
    assert (config.max_attempts, config.dark_level, config.use_llm) == (4, 4, False)
    assert dict(config.nudenet_thresholds) == {"BUTTOCKS_EXPOSED": 0.7} and config.blocked_terms == ("gore", "porn*")
    assert config.allows_nsfw("slack", "C0123") and not config.allows_nsfw("slack", "C999")


@pytest.mark.parametrize("raw, key, rule", [
    ({"max_attempts": 0}, "safety.max_attempts", "within 1..10"),
    ({"max_atempts": 3}, "safety.max_atempts", "not a known key"),
    ({"black": {"dark_fraction": 2}}, "safety.black.dark_fraction", "within"),
    ({"nudenet": {"thresholds": {"BOOTS": 0.5}}}, "safety.nudenet.thresholds.BOOTS", "NudeNet's"),
    ({"nudenet": {"thresholds": {"ANUS_EXPOSED": "high"}}}, "safety.nudenet.thresholds.ANUS_EXPOSED", "a number"),
    ({"prompt": {"blocked_terms": ["po*rn"]}}, "safety.prompt.blocked_terms", "'*' may only end it"),
    ({"nsfw_allowed_channels": ["C0123"]}, "safety.nsfw_allowed_channels", "platform:channel_id"),
    ({"fallback_families": ["sdxl2"]}, "safety.fallback_families", "one of"),
])
def test_safety_config_errors_name_key_value_and_rule(raw: dict[str, Any], key: str, rule: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate_table(SafetyConfig, raw, "safety.")
    assert error.value.key == key and rule in error.value.rule


def test_fallback_model_is_checked_against_the_models() -> None:
    families = {m.id: m.family for m in MODELS.values()}
    check_safety_models(DEFAULTS, families)
    with pytest.raises(ConfigError, match="safety.fallback_model"):
        check_safety_models(DEFAULTS.model_copy(update={"fallback_model": "sdxl_turbo"}), families)
    with pytest.raises(ConfigError, match="fall back to itself"):
        check_safety_models(DEFAULTS.model_copy(update={"fallback_model": "logo_sdxl"}), families)


# -- helpers -----------------------------------------------------------------------------------------


def _cpu() -> Any:
    import torch

    return torch.device("cpu")


def _float32() -> Any:
    import torch

    return torch.float32


def _force_black_decode(pipe: Any) -> None:
    """Make the VAE decode to -1 everywhere (black after postprocessing), like a failing HiDream."""
    decode: Callable[..., Any] = pipe.vae.decode

    def black(z: Any, *args: Any, **kwargs: Any) -> Any:
        out = decode(z, *args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        return (sample * 0 - 1,)

    pipe.vae.decode = black
