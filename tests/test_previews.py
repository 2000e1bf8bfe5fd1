"""Live previews and ETAs: the latent projection per family on tiny real pipelines, the throttle,
the events through the engine, the terminal's preview file, and ETAs seeded from the history."""

from __future__ import annotations

import dataclasses
import io
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from bot.console import ConsoleOutlet
from bot.outlet import MessageRef, Picture, PreviewPicture
from engine import Config, Engine, JobFinished, JobQueued, JobRequest, JobStarted
from engine.config import PreviewSettings, parse_config, validate_table
from engine.core.plan import CostBook, Fit, fit_costs, work_units
from engine.errors import ConfigError
from engine.jobs import GenerationParams, JobPreviewed
from engine.pipelines import generate_blocking, load_pipeline_blocking
from engine.pipelines.previews import (
    FLUX,
    LATENT_FORMATS,
    SDXL,
    LatentPreviewer,
    Preview,
    PreviewThrottle,
    denoised_estimate_blocking,
    preview_size,
    projection_blocking,
    latents_to_rgb_blocking,
    unpack_flux_latents_blocking,
)
from tests.conftest import REPO, repo_config_raw
from tests.test_safety_engine import FlagsFirstOnly, runner_with

EVERY_STEP = PreviewSettings(every_steps=1, min_interval_s=0.0)


def params_for(model_id: str, steps: int = 3, width: int = 128, height: int = 64) -> GenerationParams:
    return GenerationParams(prompt="a lighthouse at dusk", negative_prompt="", model_id=model_id, steps=steps,
                            guidance=4.0, width=width, height=height, seed=5)


# -- the projection on each family's tiny pipeline ------------------------------------------------


@pytest.mark.parametrize("model_id", ["flux_dev", "realvis_xl", "sd3_medium", "logo_sdxl"])
def test_each_family_previews_from_the_latents_without_decoding(tiny_config: Config, model_id: str) -> None:
    spec = tiny_config.model(model_id)
    loaded = load_pipeline_blocking(spec, torch.device("cpu"), torch.float32)
    previews: list[Preview] = []
    decodes_seen_by_previews: list[int] = []
    decodes = 0
    real_decode = loaded.pipe.vae.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        nonlocal decodes
        decodes += 1
        return real_decode(*args, **kwargs)

    def collect(preview: Preview) -> None:
        previews.append(preview)
        decodes_seen_by_previews.append(decodes)

    loaded.pipe.vae.decode = counting_decode
    image = generate_blocking(loaded, params_for(model_id), on_step=lambda s, t: None, cancel=threading.Event(),
                              on_preview=collect, previews=EVERY_STEP)
    assert image.size == (128, 64)
    assert [p.step for p in previews] == [1, 2]  # every step but the last: the image follows
    assert decodes == 1 and decodes_seen_by_previews == [0, 0]  # only the final image was decoded
    for p in previews:
        picture = Image.open(io.BytesIO(p.image))
        picture.load()
        assert picture.format == "JPEG" and p.mime == "image/jpeg"
        assert picture.size == (p.width, p.height) == (128, 64)  # the aspect asked for, <= 256 px
    assert previews[0].image != previews[1].image  # it changes as the image forms


def test_the_long_side_is_capped_and_webp_works(tiny_config: Config) -> None:
    loaded = load_pipeline_blocking(tiny_config.model("realvis_xl"), torch.device("cpu"), torch.float32)
    previews: list[Preview] = []
    settings = PreviewSettings(every_steps=1, min_interval_s=0.0, max_side=96, format="webp")
    generate_blocking(loaded, params_for("realvis_xl", steps=2, width=192, height=128), on_step=lambda s, t: None,
                      cancel=threading.Event(), on_preview=previews.append, previews=settings)
    (preview,) = previews
    picture = Image.open(io.BytesIO(preview.image))
    assert picture.format == "WEBP" and preview.mime == "image/webp" and picture.size == (96, 64)


def test_preview_size_keeps_the_aspect_and_never_upscales_past_the_image() -> None:
    assert preview_size(768, 768, 256) == (256, 256)
    assert preview_size(768, 512, 256) == (256, 171)
    assert preview_size(256, 768, 256) == (85, 256)
    assert preview_size(64, 32, 256) == (64, 32)


# -- the maths ------------------------------------------------------------------------------------


def test_flux_unpacking_matches_the_pipeline() -> None:
    from diffusers import FluxPipeline

    packed = torch.randn(1, (96 // 2) * (64 // 2), 64)  # a 768x512 image: a 96x64 latent grid, 2x2 packed
    ours = unpack_flux_latents_blocking(packed, 512, 768, 8)
    theirs = FluxPipeline._unpack_latents(packed, 512, 768, 8)
    assert ours.shape == (1, 16, 64, 96) and torch.equal(ours, theirs)


def test_the_projection_uses_the_published_factors() -> None:
    # With the VAE config the factors were fitted for, the map is the published one exactly.
    m, b = projection_blocking(SDXL, SDXL.scale, 0.0, "cpu")
    latent = torch.zeros(4, 2, 2)
    latent[0] = 1.0
    rgb = latents_to_rgb_blocking(latent, m, b)
    expected = [(SDXL.rgb[0][k] + SDXL.bias[k] + 1) * 127.5 for k in range(3)]
    assert rgb.shape == (2, 2, 3) and rgb.dtype == torch.uint8
    assert rgb[0, 0].tolist() == [int(v) for v in expected]
    assert LATENT_FORMATS["hidream"] is FLUX  # HiDream decodes with the FLUX VAE


def test_another_vae_config_is_folded_into_the_factors() -> None:
    z = torch.randn(16, 3, 3)  # the VAE's own latent
    scale, shift = 0.5, 0.2  # a VAE config other than FLUX's
    ours = (z - shift) * scale  # what diffusers denoises with that config
    comfy = (z - FLUX.shift) * FLUX.scale  # what the factors expect
    m, b = projection_blocking(FLUX, scale, shift, "cpu")
    direct = torch.einsum("chw,cr->hwr", comfy, torch.tensor(FLUX.rgb)) + torch.tensor(FLUX.bias)
    folded = torch.einsum("chw,cr->hwr", ours, m) + b
    assert torch.allclose(direct, folded, atol=1e-5)


@pytest.mark.parametrize("kind", ["flow", "euler"])
def test_the_denoised_estimate_is_exact_for_euler_steps(kind: str) -> None:
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    if kind == "flow":  # FLUX, SD3, HiDream: x = (1 - s) x0 + s n, the model predicts n - x0
        scheduler: Any = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(10)
        s0 = float(scheduler.sigmas[0])
        x, output = (1 - s0) * x0 + s0 * noise, noise - x0
    else:  # SDXL: x = x0 + s n, the model predicts n
        scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        scheduler.set_timesteps(10)
        s0 = float(scheduler.sigmas[0])
        x, output = x0 + s0 * noise, noise
    after = scheduler.step(output, scheduler.timesteps[0], x).prev_sample
    pipe = SimpleNamespace(scheduler=scheduler)
    from engine.pipelines.previews import _last_sigmas

    estimate = denoised_estimate_blocking(after, x, *_last_sigmas(pipe))
    assert torch.allclose(estimate, x0, atol=1e-4)
    assert denoised_estimate_blocking(after, None, *_last_sigmas(pipe)) is after  # first step: as it is


def test_a_broken_projection_turns_previews_off_without_failing_the_job() -> None:
    sent: list[Preview] = []
    previewer = LatentPreviewer("sdxl", EVERY_STEP, sent.append, width=64, height=64, vae_scale_factor=8,
                                vae_scaling=SDXL.scale, vae_shift=0.0)
    pipe = SimpleNamespace(scheduler=None)
    previewer.observe_blocking(pipe, 1, 4, torch.zeros(1, 16, 8, 8))  # 16 channels where SDXL has 4
    previewer.observe_blocking(pipe, 2, 4, torch.zeros(1, 4, 8, 8))
    assert sent == []


# -- the throttle ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_throttle_waits_for_the_rarer_of_n_steps_and_t_seconds() -> None:
    clock = Clock()
    throttle = PreviewThrottle(every_steps=3, min_interval_s=2.0, clock=clock)
    due = []
    for step in range(1, 31):
        clock.now += 0.5  # a fast model: 3 steps take 1.5 s, so the 2 s rule decides
        if throttle.due(step, 30):
            due.append(step)
    assert due == [4, 8, 12, 16, 20, 24, 28]
    slow = PreviewThrottle(every_steps=3, min_interval_s=2.0, clock=clock)
    due = []
    for step in range(1, 11):
        clock.now += 5.0  # a slow model: 2 s pass every step, so the 3-step rule decides
        if slow.due(step, 10):
            due.append(step)
    assert due == [3, 6, 9]  # and never on the last step


def test_previews_config_is_read_and_checked() -> None:
    assert validate_table(PreviewSettings, {}, "previews.") == PreviewSettings()
    assert validate_table(PreviewSettings, {"every_steps": 2, "min_interval_s": 0, "format": "webp"}, "previews.") == PreviewSettings(
        every_steps=2, min_interval_s=0.0, format="webp")
    for raw, key in (({"every_step": 2}, "previews.every_step"), ({"format": "png"}, "previews.format"),
                     ({"max_side": 4096}, "previews.max_side"), ({"min_interval_s": -1}, "previews.min_interval_s"),
                     ({"enabled": "yes"}, "previews.enabled")):
        with pytest.raises(ConfigError) as caught:
            validate_table(PreviewSettings, raw, "previews.")
        assert caught.value.key == key
    raw = repo_config_raw()
    raw["previews"] = {"every_steps": 8}
    assert parse_config(raw, {}, base_dir=REPO).previews.every_steps == 8
    raw["engine"]["previews"] = {}
    with pytest.raises(ConfigError, match="engine.previews"):
        parse_config(raw, {}, base_dir=REPO)


# -- through the engine ---------------------------------------------------------------------------


async def test_previews_arrive_as_job_events_between_the_steps(tiny_config: Config) -> None:
    config = tiny_config.model_copy(update={"previews": PreviewSettings(every_steps=2, min_interval_s=0.0)})
    async with Engine(config) as engine:
        handle = await engine.submit(JobRequest("a fox", model="sd3_medium", steps=6, width=64, height=64))
        events = [e async for e in handle.events()]
    previews = [e for e in events if isinstance(e, JobPreviewed)]
    assert [p.step for p in previews] == [2, 4] and all(p.total == 6 and not p.withdrawn for p in previews)
    assert isinstance(events[-1], JobFinished)
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("JobPreviewed") > kinds.index("JobProgressed")


async def test_a_rejected_attempts_preview_is_withdrawn_before_the_retry(tiny_config: Config) -> None:
    # "unchecked": the previews go out before any check, so the rejected attempt's must be taken back
    config = tiny_config.model_copy(update={"previews": EVERY_STEP.model_copy(update={"policy": "unchecked"})})
    async with Engine(config, runner_factory=runner_with(FlagsFirstOnly())) as engine:
        handle = await engine.submit(JobRequest("a red fox", model="flux_dev", steps=3, width=64, height=64))
        events = [e async for e in handle.events()]
    previews = [(e.step, e.withdrawn) for e in events if isinstance(e, JobPreviewed)]
    assert previews == [(1, False), (2, False), (0, True), (1, False), (2, False)]
    assert isinstance(events[-1], JobFinished)


async def test_previews_can_be_switched_off(tiny_config: Config) -> None:
    config = tiny_config.model_copy(update={"previews": PreviewSettings(enabled=False, every_steps=1, min_interval_s=0)})
    async with Engine(config) as engine:
        handle = await engine.submit(JobRequest("a fox", model="flux_dev", steps=4, width=64, height=64))
        assert not [e async for e in handle.events() if isinstance(e, JobPreviewed)]


# -- the terminal -----------------------------------------------------------------------------------


async def test_the_terminal_prints_the_preview_file_and_removes_it_with_the_result(tmp_path: Path) -> None:
    out = io.StringIO()
    outlet = ConsoleOutlet(out, tmp_path / "previews")
    job = SimpleNamespace(id="k7mq2x")
    ref = MessageRef("terminal", "k7mq2x-status")
    data = Image.new("RGB", (8, 8), "red")
    buffer = io.BytesIO()
    data.save(buffer, format="JPEG")
    picture = PreviewPicture(buffer.getvalue(), "image/jpeg", "k7mq2x-preview.jpg", 4, 24)
    await outlet.edit_status_with_preview(job, ref, "🎨 rendering\nstep 4/24\n> a fox\njob `k7mq2x`", picture)  # type: ignore[arg-type]
    path = tmp_path / "previews" / "k7mq2x-preview.jpg"
    assert path.read_bytes() == picture.data
    assert f"job k7mq2x: preview at step 4/24: {path}" in out.getvalue()
    await outlet.edit_status_with_preview(job, ref, "step 8/24", dataclasses.replace(picture, step=8))  # type: ignore[arg-type]
    assert list(path.parent.iterdir()) == [path]  # overwritten in place
    await outlet.post_result(job, Picture(b"png", "/data/images/k7mq2x.png"), "a fox\njob", None)  # type: ignore[arg-type]
    assert not path.exists()


# -- ETAs -------------------------------------------------------------------------------------------


def test_the_cost_fit_recovers_per_step_and_fixed_seconds() -> None:
    samples = [(w, 0.2 * w + 1.5) for w in (2.0, 6.0, 12.0, 24.0)]
    fit = fit_costs(samples)
    assert fit is not None and fit.per_work == pytest.approx(0.2) and fit.fixed == pytest.approx(1.5)
    assert fit_costs([(4.0, 2.0), (4.0, 4.0)]) == Fit(0.75, 0.0)  # no spread: through the origin
    assert fit_costs([(2.0, 9.0), (4.0, 5.0), (8.0, 1.0)]) == Fit(0.0, 5.0)  # noise: the mean
    assert fit_costs([]) is None
    warm_up = [(12.0, 30.0)] + [(w, 0.2 * w + 1.5) for w in (2.0, 4.0, 6.0, 12.0, 24.0, 24.0)]
    robust = fit_costs(warm_up)  # the first run after a load took 30 s: not what the next one takes
    assert robust is not None and robust.per_work == pytest.approx(0.2) and robust.fixed == pytest.approx(1.5)


def test_the_cost_book_prices_a_job_by_steps_and_size() -> None:
    book = CostBook()
    for steps, side in ((4, 512), (8, 512), (24, 768), (12, 256)):
        p = dataclasses.replace(params_for("flux_dev"), steps=steps, width=side, height=side)
        book.record_job(p, generate_s=0.5 * work_units(steps, side, side) + 0.3, load_s=12.0)
    big = dataclasses.replace(params_for("flux_dev"), steps=28, width=768, height=768)
    assert book.job_s(big) == pytest.approx(0.5 * work_units(28, 768, 768) + 0.3)
    assert book.known("flux_dev") and book.knows_load("flux_dev") and not book.known("sd3_medium")
    assert book.confident(big) and not book.confident(dataclasses.replace(big, steps=50, model_id="sd3_medium"))
    warm_up = CostBook()
    warm_up.record_job(params_for("flux_dev", steps=2, width=64, height=64), generate_s=0.3)
    assert not warm_up.confident(big)  # 2 steps at 64 px say nothing about 28 at 768 px: no ETA then
    assert book.remaining_s(big, 0.0, step=10, step_pace_s=0.25) == pytest.approx(18 * 0.25 + 0.3)


async def test_etas_are_seeded_from_the_history_after_a_restart(tiny_config: Config) -> None:
    ask = JobRequest("a fox", model="realvis_xl", steps=3, width=64, height=64)
    long = dataclasses.replace(ask, steps=40, width=256, height=256)
    async with Engine(tiny_config) as engine:
        first = await engine.submit(ask)
        assert (await first.events().__anext__()).eta_s is None  # nothing recorded yet: no made-up ETA
        await first.result()
        await (await engine.submit(long)).result()
    async with Engine(tiny_config) as again:  # a restart: the ETA comes from the history at once
        busy = await again.submit(long)
        async for event in busy.events():
            if isinstance(event, JobStarted):
                break
        waiting = await again.submit(ask)
        queued = await waiting.events().__anext__()
        assert isinstance(queued, JobQueued) and queued.eta_s is not None and queued.eta_s > 0
        assert again.eta(waiting.id) is not None and again.eta(busy.id) is not None
        await busy.cancel()
        await waiting.result()
        assert again.eta(waiting.id) is None  # finished: nothing to wait for
