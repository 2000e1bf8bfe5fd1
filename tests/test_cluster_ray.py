"""Ray workers on local Ray (marker ``cluster``): two workers on a custom resource, tiny twins, one
Ray start for the module. Jobs are held mid-job by tests/held_runner.py; nothing here waits on a
clock: each step waits for the event it needs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from engine.cluster import WorkerLostError
from engine.cluster.ray_worker import WorkerTakenError
from engine.config import ClusterSettings, Config
from engine.jobs import GenerationParams
from tests.conftest import REPO, RAY_RESOURCE, cluster_test_config
from tests.held_runner import held_runner, holder, llm_home


@pytest.fixture(scope="module")
def config(tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Config:
    config = cluster_test_config(tiny_models, tmp_path_factory.mktemp("data"))
    return config.model_copy(update={"cluster": ClusterSettings(mode="local", resource=RAY_RESOURCE, workers=2)})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def workers(local_ray: Any, config: Config) -> AsyncIterator[list[Any]]:
    """w0 and w1 for the whole module (an actor's start imports torch: seconds); the tests run in
    file order on the module's loop and each leaves both workers able to run a job."""
    from engine.cluster.modes import make_workers

    made = make_workers(config, held_runner)
    await asyncio.gather(*(w.start(config) for w in made))
    yield made
    await asyncio.gather(*(w.stop() for w in made))


def params(prompt: str, model: str = "flux_dev", steps: int = 2) -> GenerationParams:
    return GenerationParams(prompt, "", model, steps, 3.5, 64, 64, seed=3)


async def run(worker: Any, job_id: str, p: GenerationParams, on_step: Callable[[int, int], None] = lambda s, t: None,
              cancel: threading.Event | None = None) -> Any:
    return await worker.run(job_id, p, nsfw_allowed=False, cancel=cancel or threading.Event(), on_step=on_step,
                            on_attempt=lambda a: None, on_preview=None)


def embedded_imports_no_ray() -> str:
    """A script: import engine, build the embedded workers, run one job; print whether ray got imported."""
    return """
import asyncio, sys, threading
from pathlib import Path
from engine.tiny import ensure_tiny_models
from engine.jobs import GenerationParams
from engine.cluster.modes import make_workers
from tests.conftest import make_tiny_config

config = make_tiny_config(ensure_tiny_models(Path(sys.argv[1])), Path(sys.argv[2]))
async def main():
    (worker,) = make_workers(config)
    await worker.start(config)
    out = await worker.run("j", GenerationParams("a fox", "", "flux_dev", 1, 3.5, 64, 64, 1), nsfw_allowed=False,
                           cancel=threading.Event(), on_step=lambda s, t: None, on_attempt=lambda a: None, on_preview=None)
    await worker.stop()
    assert out.png
asyncio.run(main())
print("ray imported" if "ray" in sys.modules else "no ray")
"""


def test_embedded_mode_never_imports_ray(tiny_models: Any, tmp_path: Any) -> None:
    done = subprocess.run([sys.executable, "-c", embedded_imports_no_ray(), str(tiny_models.root.parent),
                           str(tmp_path / "data")], cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "no ray"


def test_a_cluster_mode_without_ray_installed_says_how_to_install_it(config: Config,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.cluster.modes import ClusterUnavailableError, make_workers

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the extra
    with pytest.raises(ClusterUnavailableError, match=r"`cluster.mode` is 'local'.*pip install -e '\.\[cluster\]'"):
        make_workers(config)


@pytest.mark.cluster
def test_more_local_workers_than_ray_has_room_for_are_refused_naming_the_key(local_ray: Any, config: Config) -> None:
    from engine.cluster.modes import make_workers
    from engine.errors import ConfigError

    three = config.model_copy(update={"cluster": config.cluster.model_copy(update={"workers": 3})})
    with pytest.raises(ConfigError, match=r"`cluster.workers` is 3, but Ray sees 2 promptpics_worker .* room for 2"):
        make_workers(three)


# First in the module: the engine's own two workers take both units of the resource until it
# exits; the module's w0 and w1 (the ``workers`` fixture) are made after it.
@pytest.mark.cluster
@pytest.mark.asyncio(loop_scope="module")
async def test_a_job_whose_worker_is_killed_finishes_once_and_the_history_says_where(local_ray: Any, config: Config) -> None:
    from engine import Engine, JobProgressed, JobRequest

    def request(prompt: str, model: str = "flux_dev") -> JobRequest:
        return JobRequest(prompt, model=model, steps=2, width=64, height=64, seed=3)

    async with Engine(config, runner_factory=held_runner) as engine:
        # two jobs at once: both workers render, and the history says which
        first = [await engine.submit(request("a fox")), await engine.submit(request("a poster", "sd3_medium"))]
        await asyncio.gather(*(h.result() for h in first))
        rendered_on = {a.worker for h in first for a in await engine.history.attempts(h.id)}
        assert rendered_on == {"w0", "w1"}
        # the router's LLM runs on a GPU worker's process, not in the bot's
        pid, _, llm, _ = await engine._llm_on_a_worker(llm_home, "ray")
        assert llm == "ChatLLM" and pid in {w.pid for w in engine._workers} and pid != os.getpid()
        router = engine._router
        router.settings = router.settings.model_copy(update={"llm_timeout_s": 120.0})  # a loaded CI machine
        answer = await router._by_llm("a neon shop sign that reads OPEN")  # score_blocking, pickled over
        assert answer is not None and answer.stage == "llm" and set(answer.scores) == set(config.models)
        assert router._own_llms is None and router._llm_thread is None  # no LLM loaded here
        # a job held after its first step; its worker's process is killed
        held = await engine.submit(request("hold on"))
        async for event in held.events():
            if isinstance(event, JobProgressed):
                break
        os.kill(holder(held.id), signal.SIGKILL)
        assert (await held.result()).png
        attempts = await engine.history.attempts(held.id)
    # ran once to the end, on the other worker (the killed one is being started again): the
    # history names the worker of each attempt
    assert [a.outcome for a in attempts] == ["interrupted", "succeeded"]
    assert {a.worker for a in attempts} == {"w0", "w1"}


@pytest.mark.cluster
@pytest.mark.asyncio(loop_scope="module")
async def test_two_workers_render_at_once_and_each_reports_its_own_models(workers: list[Any]) -> None:
    w0, w1 = workers
    assert [w.info.name for w in workers] == ["w0", "w1"] and w0.pid != w1.pid
    both = await asyncio.gather(run(w0, "a", params("a fox")), run(w1, "b", params("a poster", "sd3_medium")))
    assert all(out.png for out in both)
    # what the dispatcher's affinity reads: each worker's own residency, cached on the bot side
    assert w0.placement_sets()[0] == {"flux_dev"} and w1.placement_sets()[0] == {"sd3_medium"}


@pytest.mark.cluster
@pytest.mark.asyncio(loop_scope="module")
async def test_a_worker_killed_mid_job_is_lost_restarted_and_the_job_runs_on_the_other(workers: list[Any]) -> None:
    w0, w1 = workers
    await run(w0, "warm", params("a fox"))  # w0 holds flux_dev
    first_step = asyncio.Event()
    held = asyncio.ensure_future(run(w0, "k1", params("hold on"), on_step=lambda s, t: first_step.set()))
    await first_step.wait()
    killed = w0.pid
    os.kill(killed, signal.SIGKILL)
    with pytest.raises(WorkerLostError) as lost:
        await held
    assert lost.value.worker == "w0" and "w0" in lost.value.user_message
    assert w0.placement_sets() == (frozenset(), frozenset())  # its models died with it
    assert w0.fits("flux_dev")  # its card did not
    assert not w0.alive  # being started again: the dispatcher sends jobs to the others meanwhile
    # the engine sends the job again, elsewhere: it runs through (held only the first time)
    assert (await run(w1, "k1", params("hold on"))).png
    # Ray restarted w0's actor; the next job starts it again first
    assert (await run(w0, "after", params("a fox"))).png and w0.pid != killed
    assert w0.placement_sets()[0] == {"flux_dev"}


@pytest.mark.cluster
@pytest.mark.asyncio(loop_scope="module")
async def test_a_hung_worker_is_killed_by_the_watchdog_and_reported_lost(workers: list[Any]) -> None:
    w1 = workers[1]
    await w1.preload("flux_dev")  # loaded first, so the job's silence is the hold, not a load
    w1.watchdog_s = 1.0
    with pytest.raises(WorkerLostError, match="no word from it for 1 s"):
        await run(w1, "h1", params("hold and never report again", steps=3))
    assert w1.placement_sets() == (frozenset(), frozenset())


@pytest.mark.cluster
@pytest.mark.asyncio(loop_scope="module")
async def test_a_bot_restart_in_cluster_mode_reattaches_to_the_worker_and_its_models(local_ray: Any,
                                                                                     config: Config) -> None:
    from engine.cluster.modes import make_workers

    # no GPU and no resource: this detached worker places beside w0 and w1
    cluster = ClusterSettings(mode="cluster", address="auto", workers=1, num_gpus=0.0)
    config = config.model_copy(update={"cluster": cluster})
    (before,) = make_workers(config, held_runner)
    await before.start(config)
    try:
        await run(before, "c1", params("a fox"))
        await before.stop()  # the bot exits: a detached worker stays up with its models
        (after,) = make_workers(config, held_runner)
        await after.start(config)
        assert after.pid == before.pid and after.placement_sets()[0] == {"flux_dev"}
        assert (await run(after, "c2", params("a fox"))).png
        # another bot (another data folder) in the same namespace is refused: it would take w0 over
        other = config.model_copy(update={"data_dir": config.data_dir / "other-bot"})
        (intruder,) = make_workers(other, held_runner)
        with pytest.raises(WorkerTakenError, match=r"already serves the bot at .*: give this bot a `cluster.namespace`"):
            await intruder.start(other)
        assert (await run(after, "c3", params("a fox"))).png and after.placement_sets()[0] == {"flux_dev"}
    finally:
        local_ray.kill(local_ray.get_actor("promptpics-w0", namespace=cluster.namespace), no_restart=True)
