"""The ``Worker`` contract (engine/cluster/__init__.py), one body run against every kind of worker:
``LocalWorker`` in this process and ``RayWorker`` on local Ray (custom resource, tiny twins)."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from engine import JobCancelledError
from engine.cluster import Worker
from engine.cluster.local import LocalWorker
from engine.config import Config
from engine.jobs import GenerationParams
from engine.pipelines import Preview
from engine.safety import Attempt
from tests.conftest import RAY_RESOURCE, cluster_test_config
from tests.held_runner import HOLD_DIR, held_runner


@pytest.fixture(scope="module")
def config(tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Config:
    return cluster_test_config(tiny_models, tmp_path_factory.mktemp("data"))


@pytest.fixture
async def worker(request: pytest.FixtureRequest, config: Config, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Worker]:
    if request.param == "local":
        monkeypatch.setenv(HOLD_DIR, str(tmp_path))
        made: Worker = LocalWorker("gpu", runner_factory=held_runner, thread_name="contract-gpu")
    else:
        request.getfixturevalue("local_ray")
        from engine.cluster.modes import join_ray
        from engine.cluster.ray_worker import ActorSpec, RayWorker

        made = RayWorker("w0", ActorSpec(0.0, RAY_RESOURCE), watchdog_s=120.0, session=join_ray(config.cluster),
                         runner_factory=held_runner)
    await made.start(config)
    yield made
    await made.stop()


class Seen:
    """What a job's callbacks reported, in order; they may come from any thread (the contract)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: list[Any] = []
        self.first_step = asyncio.Event()

    def kwargs(self) -> dict[str, Any]:
        return {"on_step": lambda step, total: self._hop((step, total)), "on_attempt": self._hop,
                "on_preview": self._hop}

    def _hop(self, event: Any) -> None:
        self.loop.call_soon_threadsafe(self._seen, event)

    def _seen(self, event: Any) -> None:
        self.events.append(event)
        if isinstance(event, tuple):
            self.first_step.set()

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def params(prompt: str, steps: int) -> GenerationParams:
    return GenerationParams(prompt, "", "flux_dev", steps, 3.5, 64, 64, seed=5)


@pytest.mark.parametrize("worker", ["local", pytest.param("ray", marks=pytest.mark.cluster)], indirect=True)
async def test_a_worker_streams_a_job_reports_residency_and_stops_a_job_within_a_step(worker: Worker) -> None:
    # a job: progress in order up to the total, previews (every step but the last), one attempt
    # opened then closed, the PNG; the model is then resident on this worker
    seen = Seen()
    output = await worker.run("job-1", params("a lighthouse", 3), nsfw_allowed=False, cancel=threading.Event(),
                              **seen.kwargs())
    await asyncio.sleep(0)  # callbacks hopped from another thread land on the loop first
    assert seen.of(tuple) == [(1, 3), (2, 3), (3, 3)]
    assert [p.step for p in seen.of(Preview)] == [1, 2] and all(p.image for p in seen.of(Preview))
    opened, closed = seen.of(Attempt)
    assert (opened.n, opened.outcome, closed.n, closed.outcome) == (1, None, 1, "succeeded")
    assert seen.events.index(opened) < seen.events.index((1, 3)) and seen.events[-1] == closed
    assert Image.open(io.BytesIO(output.png)).size == (64, 64) and output.attempts[-1].outcome == "succeeded"
    assert "flux_dev" in worker.placement_sets()[0] and worker.fits("flux_dev")
    assert [m.model_id for m in worker.resident_models()] == ["flux_dev"]

    # admin: unload and preload change what the worker reports
    assert await worker.unload("flux_dev") is True
    assert "flux_dev" not in worker.placement_sets()[0]
    await worker.preload("flux_dev")
    assert "flux_dev" in worker.placement_sets()[0]

    # cancel: a job held after its first step stops there with JobCancelledError
    held, cancel = Seen(), threading.Event()
    running = asyncio.ensure_future(worker.run("job-2", params("hold on", 5), nsfw_allowed=False, cancel=cancel,
                                               **held.kwargs()))
    await held.first_step.wait()
    cancel.set()
    worker.cancel("job-2")
    with pytest.raises(JobCancelledError):
        await running
    assert held.of(tuple) == [(1, 5)]
