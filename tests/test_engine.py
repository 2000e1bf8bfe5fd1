"""Engine end to end on tiny real pipelines: images, events, cancellation, failures, the loop."""

from __future__ import annotations

import asyncio
import io
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from engine import (
    Config,
    Engine,
    JobCancelled,
    JobCancelledError,
    JobFailed,
    JobFinished,
    JobProgressed,
    JobQueued,
    JobRequest,
    JobStarted,
    QueueFullError,
)
from engine.images import read_png_metadata
from tests.conftest import make_tiny_config

FAMILY_OF = {"flux_dev": "flux", "realvis_xl": "sdxl", "sd3_medium": "sd3", "logo_sdxl": "hidream"}


async def collect(handle: Any) -> list[Any]:
    return [event async for event in handle.events()]


@pytest.mark.parametrize("model_id", list(FAMILY_OF))
async def test_each_family_renders_a_png_with_its_size_and_parameters(tiny_config: Config, model_id: str) -> None:
    async with Engine(tiny_config) as engine:
        handle = await engine.submit(JobRequest("a lighthouse at dusk", model=model_id, steps=2, width=128,
                                                height=64, seed=7, negative_prompt="fog"))
        result = await handle.result()
    image = Image.open(io.BytesIO(result.png))
    assert image.format == "PNG" and image.size == (128, 64) == (result.width, result.height)
    meta = read_png_metadata(result.png)
    assert meta["prompt"] == "a lighthouse at dusk" and meta["model"] == model_id and meta["seed"] == 7
    assert (meta["steps"], meta["width"], meta["height"], meta["negative_prompt"]) == (2, 128, 64, "fog")
    assert "Seed: 7" in image.text["parameters"]


async def test_control_characters_never_reach_the_png_or_the_history(tiny_config: Config) -> None:
    async with Engine(tiny_config) as engine:
        handle = await engine.submit(JobRequest("a\x00 light\x07house at dusk\x1b\x7f", model="realvis_xl", steps=1,
                                                width=64, height=64, seed=7, negative_prompt="\x00fog"))
        result = await handle.result()
        stored = await engine.history.get_job(handle.id)
    meta = read_png_metadata(result.png)
    assert (meta["prompt"], meta["negative_prompt"]) == ("a lighthouse at dusk", "fog")
    assert stored is not None and (stored.params.prompt, stored.params.negative_prompt) == ("a lighthouse at dusk", "fog")


async def test_same_seed_and_settings_give_the_same_bytes(tiny_config: Config) -> None:
    request = JobRequest("a red fox", model="realvis_xl", steps=2, width=64, height=64, seed=11)
    async with Engine(tiny_config) as engine:
        first = await (await engine.submit(request)).result()
        second = await (await engine.submit(request)).result()
        other = await (await engine.submit(replace(request, seed=12))).result()
    assert first.png == second.png
    assert other.png != first.png


async def test_events_arrive_in_order(tiny_config: Config) -> None:
    async with Engine(tiny_config) as engine:
        handle = await engine.submit(JobRequest("a fox", model="sd3_medium", steps=3, width=64, height=64))
        events = await collect(handle)
    kinds = [type(e) for e in events]
    assert kinds == [JobQueued, JobStarted, JobProgressed, JobProgressed, JobProgressed, JobFinished]
    assert [e.step for e in events if isinstance(e, JobProgressed)] == [1, 2, 3]
    assert events[0].position == 1 and events[-1].result.timings.total_s >= events[-1].result.timings.generate_s


async def test_cancel_before_start_removes_the_job_and_the_next_runs(tiny_config: Config) -> None:
    async with Engine(tiny_config) as engine:
        running = await engine.submit(JobRequest("first", model="flux_dev", steps=4, width=64, height=64))
        waiting = await engine.submit(JobRequest("second", model="flux_dev", steps=2, width=64, height=64))
        third = await engine.submit(JobRequest("third", model="flux_dev", steps=2, width=64, height=64))
        assert running.position == 1 and third.position == waiting.position + 1
        assert await waiting.cancel() is True
        waiting_events = await collect(waiting)
        assert await running.result() and await third.result()
    assert [type(e) for e in waiting_events] == [JobQueued, JobCancelled]
    assert waiting_events[-1].while_running is False
    assert await waiting.cancel() is False  # already final


async def test_cancel_while_running_stops_within_one_step(tiny_config: Config) -> None:
    async with Engine(tiny_config) as engine:
        handle = await engine.submit(JobRequest("long", model="flux_dev", steps=50, width=256, height=256))
        after_cancel: list[Any] = []
        async for event in handle.events():
            if isinstance(event, JobProgressed) and event.step == 2:
                assert await handle.cancel() is True
            elif after_cancel or isinstance(event, JobProgressed) and event.step > 2:
                after_cancel.append(event)
            elif isinstance(event, JobCancelled):
                after_cancel.append(event)
        # the GPU thread may already be inside step 3 when the flag is set; never later
        assert [type(e) for e in after_cancel] in ([JobCancelled], [JobProgressed, JobCancelled])
        assert after_cancel[-1].while_running is True
        with pytest.raises(JobCancelledError):
            await handle.result()
        # the thread is free again: the next job runs
        assert (await (await engine.submit(JobRequest("next", model="flux_dev", steps=1, width=64, height=64))).result()).png


async def test_a_model_that_fails_to_load_is_reported_and_the_next_job_runs(tiny_models: Any, tmp_path: Path) -> None:
    config = make_tiny_config(tiny_models, tmp_path / "data")
    broken = tmp_path / "broken-model"
    broken.mkdir()
    config = config.model_copy(update={"models": {**config.models, "sd3_medium": config.model("sd3_medium").model_copy(update={"source": str(broken)})}})
    async with Engine(config) as engine:
        bad = await engine.submit(JobRequest("poster", model="sd3_medium", steps=1, width=64, height=64))
        good = await engine.submit(JobRequest("fox", model="flux_dev", steps=1, width=64, height=64))
        bad_events = await collect(bad)
        assert (await good.result()).png
    failed = bad_events[-1]
    assert isinstance(failed, JobFailed) and failed.error_kind == "ModelLoadError"
    assert "sd3_medium" in failed.message and "files are missing" in failed.message
    assert str(broken) not in failed.message  # never a path in chat


class ExplodingRunner:
    """A runner whose first job raises a foreign error: the catch-all must hold."""

    def __init__(self, real: Any) -> None:
        self.residency, self._real, self.calls = real.residency, real, 0

    def run_blocking(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise ValueError("/secret/path/model.safetensors: tensor shape mismatch")
        return self._real.run_blocking(*args)


async def test_an_unexpected_error_becomes_a_plain_sentence_and_the_thread_lives_on(tiny_config: Config) -> None:
    from engine.core import JobRunner
    from engine.residency import ResidencyManager

    engine = Engine(tiny_config, runner_factory=lambda c, dev, dt: ExplodingRunner(JobRunner(c, ResidencyManager(dev, dt))))
    async with engine:
        first = await engine.submit(JobRequest("boom", model="flux_dev", steps=1, width=64, height=64))
        second = await engine.submit(JobRequest("fine", model="flux_dev", steps=1, width=64, height=64))
        failed = (await collect(first))[-1]
        assert (await second.result()).png
    assert isinstance(failed, JobFailed) and failed.message == f"Sorry, something went wrong (job `{first.id}`)."


class LoopWatchingRunner:
    """At every step the GPU thread asks the event loop to run a callback, and waits for it. A loop
    that runs the job itself, or waits on it, never does: the wait gives up after a minute."""

    def __init__(self, real: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.residency, self._real, self._loop = real.residency, real, loop
        self.loop_answered: list[bool] = []

    def run_blocking(self, job_id: str, params: Any, on_step: Any, *args: Any, **kwargs: Any) -> Any:
        def watched(step: int, total: int) -> None:
            answered = threading.Event()
            self._loop.call_soon_threadsafe(answered.set)
            self.loop_answered.append(answered.wait(60))
            on_step(step, total)

        return self._real.run_blocking(job_id, params, watched, *args, **kwargs)


async def test_loop_stays_responsive_while_a_job_runs(tiny_config: Config) -> None:
    from engine.core import JobRunner
    from engine.residency import ResidencyManager

    loop, runners = asyncio.get_running_loop(), []

    def factory(c: Config, device: Any, dtype: Any) -> LoopWatchingRunner:
        runners.append(LoopWatchingRunner(JobRunner(c, ResidencyManager(device, dtype, settings=c.residency)), loop))
        return runners[-1]

    async with Engine(tiny_config, runner_factory=factory) as engine:
        handle = await engine.submit(JobRequest("busy", model="flux_dev", steps=8, width=128, height=128))
        assert (await handle.result()).png
    answered = runners[0].loop_answered
    assert len(answered) >= 8 and all(answered), "the event loop was held up while a job ran"


async def test_full_queue_refuses_with_the_limit(tiny_models: Any, tmp_path: Path) -> None:
    config = make_tiny_config(tiny_models, tmp_path / "data", max_queued_jobs=1)
    async with Engine(config) as engine:
        running = await engine.submit(JobRequest("a", model="flux_dev", steps=30, width=256, height=256))
        async for event in running.events():
            if isinstance(event, JobStarted):
                break
        await engine.submit(JobRequest("b", model="flux_dev", steps=1, width=64, height=64))
        with pytest.raises(QueueFullError, match=r"queue is full \(1 jobs waiting\)"):
            await engine.submit(JobRequest("c", model="flux_dev", steps=1, width=64, height=64))
        assert [e.position for e in engine.queue_snapshot()] == [0, 1]
        await running.cancel()


async def test_closing_answers_every_job_and_keeps_them_for_the_next_start(tiny_config: Config) -> None:
    engine = Engine(tiny_config)
    async with engine:
        first = await engine.submit(JobRequest("a", model="flux_dev", steps=40, width=256, height=256))
        queued = await engine.submit(JobRequest("b", model="flux_dev", steps=1, width=64, height=64))
        async for event in first.events():
            if isinstance(event, JobProgressed):
                break
    for handle in (first, queued):
        last = (await collect(handle))[-1]
        assert isinstance(last, JobFailed) and last.error_kind == "EngineStopped" and "will run" in last.message
    async with Engine(tiny_config) as again:
        assert [h.id for h in again.resumed] == [first.id, queued.id]
        for handle in again.resumed:
            assert (await handle.result()).png
        stored = await again.history.get_job(first.id)
        attempts = await again.history.attempts(first.id)
    assert stored.status.value == "succeeded" and stored.image_path.is_file()
    assert [a.outcome for a in attempts] == ["interrupted", "succeeded"]


async def test_hidream_runs_alone_and_others_share(tiny_config: Config) -> None:
    async with Engine(tiny_config) as engine:
        async def run(model_id: str) -> set[str]:
            await (await engine.submit(JobRequest("x", model=model_id, steps=1, width=64, height=64))).result()
            return {r.model_id for r in engine.resident_models()}

        assert await run("flux_dev") == {"flux_dev"}
        assert await run("realvis_xl") == {"flux_dev", "realvis_xl"}  # the seed keeps both
        assert await run("logo_sdxl") == {"logo_sdxl"}  # exclusive: the others went first
        assert await run("flux_dev") == {"flux_dev"}  # and nothing loads beside HiDream


async def test_a_full_disk_fails_that_job_clearly_and_the_next_one_runs(tiny_config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from engine.history import files

    real_write = files._write_and_sync
    calls = []

    def full_once(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(files, "_write_and_sync", full_once)
    async with Engine(tiny_config) as eng:
        first = await eng.submit(JobRequest("a", model="flux_dev", steps=1, width=64, height=64))
        second = await eng.submit(JobRequest("b", model="flux_dev", steps=1, width=64, height=64))
        failed = (await collect(first))[-1]
        assert (await second.result()).image_path
        stored = await eng.history.get_job(first.id)
    assert isinstance(failed, JobFailed) and failed.error_kind == "StorageError" and "disk full" in failed.message
    assert stored.status.value == "failed" and stored.image_path is None


async def test_preload_and_unload_change_what_is_resident(tiny_config: Config) -> None:
    from engine import RequestError

    async with Engine(tiny_config) as engine:
        assert await engine.preload("sd3_medium") > 0.0
        assert await engine.preload("sd3_medium") == 0.0  # already there
        assert {r.model_id for r in engine.resident_models()} == {"sd3_medium"}
        handle = await engine.submit(JobRequest("x", model="sd3_medium", steps=1, width=64, height=64))
        assert (await handle.result()).timings.load_s == 0.0  # the preload paid for it
        assert await engine.unload("sd3_medium") is True
        assert await engine.unload("sd3_medium") is False
        assert engine.resident_models() == ()
        with pytest.raises(RequestError, match="`model` is 'dalle'"):
            await engine.preload("dalle")
