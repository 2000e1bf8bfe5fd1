"""The safety loop inside the engine: events, the attempts table, and no flagged image in a result."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from engine import Config, Engine, JobFailed, JobFinished, JobRequest
from engine.core import JobRunner
from engine.pipelines import LoadedPipeline, load_pipeline_blocking
from engine.residency import ResidencyManager
from engine.safety import BlackImageDetector, PromptCheck, PromptRewriter, SafetyPolicy, Verdict


class FlagsFirstOnly:
    name, kind = "nsfw", "nsfw"

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def check_blocking(self, image: Any, *, pipeline_output: Any = None) -> Verdict:
        self.seen.append(np.asarray(image).copy())
        first = len(self.seen) == 1
        return Verdict(self.name, first, 0.9 if first else 0.1, "fake")


class AlwaysFlags(FlagsFirstOnly):
    def check_blocking(self, image: Any, *, pipeline_output: Any = None) -> Verdict:
        self.seen.append(np.asarray(image).copy())
        return Verdict(self.name, True, 0.9, "BUTTOCKS_EXPOSED 0.90")


def runner_with(*detectors: Any, loader: Callable[..., LoadedPipeline] = load_pipeline_blocking) -> Callable[..., JobRunner]:
    def factory(config: Config, device: Any, dtype: Any) -> JobRunner:
        s = config.safety
        check = PromptCheck(s.blocked_terms, s.drug_terms, s.minor_terms)
        rewriter = PromptRewriter(check, replacements=s.replacements, blocked_terms=s.blocked_terms)
        policy = SafetyPolicy(s, models=config.models, prompt_check=check, rewriter=rewriter,
                              detectors=(BlackImageDetector(), *detectors))
        return JobRunner(config, ResidencyManager(device, dtype, loader=loader), safety=policy)
    return factory


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


async def events_of(handle: Any) -> list[Any]:
    return [e async for e in handle.events()]


async def test_a_flagged_first_image_is_rewritten_retried_and_recorded(tiny_config: Config) -> None:
    detector = FlagsFirstOnly()
    async with Engine(tiny_config, runner_factory=runner_with(detector)) as engine:
        handle = await engine.submit(JobRequest("a red fox in the rain", model="flux_dev", steps=2, width=64, height=64,
                                                seed=3))
        events = await events_of(handle)
        attempts = await engine.history.attempts(handle.id)
        stored = await engine.history.get_job(handle.id)
    finished = events[-1]
    assert isinstance(finished, JobFinished)
    result = finished.result
    assert result.params.prompt == "a red fox in the rain, fully clothed, safe for work" and result.params.seed == 4
    assert "rewritten for safety" in result.notice
    assert not np.array_equal(pixels(result.png), detector.seen[0])  # the flagged image went nowhere
    assert np.array_equal(pixels(result.png), detector.seen[1])
    assert [(a.n, a.outcome, a.retry_reason) for a in attempts] == [
        (1, "retried", "nsfw: rewrote the prompt (sanitiser)"), (2, "succeeded", None)]
    assert attempts[0].verdicts["nsfw"] == {"flagged": True, "score": 0.9}
    assert attempts[1].prompt_used == result.params.prompt == stored.params.prompt


async def test_always_flagged_fails_with_a_refusal_and_no_image(tiny_config: Config) -> None:
    async with Engine(tiny_config, runner_factory=runner_with(AlwaysFlags())) as engine:
        handle = await engine.submit(JobRequest("a red fox", model="flux_dev", steps=1, width=64, height=64))
        events = await events_of(handle)
        attempts = await engine.history.attempts(handle.id)
        stored = await engine.history.get_job(handle.id)
    assert not any(isinstance(e, JobFinished) for e in events)
    failed = events[-1]
    assert isinstance(failed, JobFailed) and failed.error_kind == "UnsafeContentError"
    assert "not safe for work on all 3 attempts (BUTTOCKS_EXPOSED 0.90)" in failed.message
    assert [a.outcome for a in attempts] == ["retried", "retried", "failed"]
    assert stored.status.value == "failed" and stored.image_path is None
    stats = {s.model_id: s for s in await _stats(tiny_config)}
    assert stats["flux_dev"].refused == 1 and stats["flux_dev"].nsfw_flagged == 3


async def test_nsfw_allowed_channel_gets_the_image(tiny_config: Config) -> None:
    async with Engine(tiny_config, runner_factory=runner_with(AlwaysFlags())) as engine:
        handle = await engine.submit(JobRequest("a red fox", model="flux_dev", steps=1, width=64, height=64,
                                                nsfw_allowed=True))
        result = await handle.result()
        attempts = await engine.history.attempts(handle.id)
    assert result.png and [a.outcome for a in attempts] == ["succeeded"] and attempts[0].verdicts["nsfw"]["flagged"]


async def test_a_refused_prompt_spends_no_gpu_time(tiny_config: Config) -> None:
    async with Engine(tiny_config, runner_factory=runner_with()) as engine:
        handle = await engine.submit(JobRequest("a naked child", model="flux_dev", steps=1, width=64, height=64))
        failed = (await events_of(handle))[-1]
        attempts = await engine.history.attempts(handle.id)
        assert engine.resident_models() == ()  # nothing was even loaded
    assert isinstance(failed, JobFailed) and failed.error_kind == "UnsafeContentError" and "minors" in failed.message
    assert attempts == []


async def test_hidream_black_falls_back_to_flux_through_the_engine(tiny_config: Config) -> None:
    def black_hidream(spec: Any, device: Any, dtype: Any) -> LoadedPipeline:
        loaded = load_pipeline_blocking(spec, device, dtype)
        if spec.family == "hidream":
            decode = loaded.pipe.vae.decode
            loaded.pipe.vae.decode = lambda z, *a, **k: (decode(z, *a, **k)[0] * 0 - 1,)
        return loaded

    async with Engine(tiny_config, runner_factory=runner_with(loader=black_hidream)) as engine:
        handle = await engine.submit(JobRequest("a logo that says FOX", model="logo_sdxl", steps=2, width=64, height=64))
        result = await handle.result()
        attempts = await engine.history.attempts(handle.id)
        stored = await engine.history.get_job(handle.id)
    assert result.params.model_id == stored.params.model_id == "flux_dev"
    assert "kept returning black images, so FLUX.1-dev made this one" in result.notice
    assert [(a.model_id, a.outcome) for a in attempts] == [
        ("logo_sdxl", "retried"), ("logo_sdxl", "retried"), ("flux_dev", "succeeded")]
    assert attempts[1].retry_reason == "black: fell back to flux_dev"
    assert pixels(result.png).mean() > 20
    stats = {s.model_id: s for s in await _stats(tiny_config)}
    assert stats["logo_sdxl"].black_flagged == 2 and stats["flux_dev"].fixed_by_rewrite == 1
    assert stats["logo_sdxl"].fell_back == 1 and stats["flux_dev"].refused == 0


async def _stats(config: Config) -> Any:
    from engine.history import HistoryStore

    async with HistoryStore.open(config.data_dir) as history:
        return await history.model_stats()
