"""The workers a ``[cluster]`` table asks for (docs/CLUSTER.md).

    embedded  one ``LocalWorker`` in this process; ray is not imported
    local     this process starts Ray (or uses the Ray it already joined) and one ``RayWorker``
              per GPU Ray sees (or ``cluster.workers``)
    cluster   joins the Ray cluster at ``cluster.address``; the workers are named detached actors
              ``promptpics-w0``, ... in ``cluster.namespace``, so a restarted bot re-attaches to them

Joining Ray blocks for seconds (``ray.init``): call ``make_workers`` before the loop is busy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cluster.local import LocalWorker, RunnerFactory
from engine.errors import ConfigError, EngineError

if TYPE_CHECKING:
    from engine.cluster import Worker
    from engine.config import ClusterSettings, Config

# The checkout this process runs from: the actors import engine (and a runner factory given by
# reference, e.g. the tests') from the same place, installed or not.
PROJECT_ROOT = Path(__file__).resolve().parents[2]

log = logging.getLogger(__name__)


class ClusterUnavailableError(EngineError):
    """Ray is missing, finds no GPU for the workers, or cannot be reached (start-up only)."""


def make_workers(config: Config, runner_factory: RunnerFactory | None = None) -> list[Worker]:
    """The engine's workers for ``config.cluster``. ``runner_factory`` builds each worker's job
    runner; for Ray workers it must be a module-level function (the actor imports it by name)."""
    cluster = config.cluster
    if cluster.mode == "embedded":
        return [LocalWorker("gpu", runner_factory=runner_factory)]
    from engine.cluster.ray_worker import ActorSpec, RayWorker

    session = join_ray(cluster)
    count = _worker_count(cluster)
    workers: list[Worker] = []
    for i in range(count):
        spec = ActorSpec(cluster.num_gpus, cluster.resource,
                         detached_name=f"promptpics-w{i}" if cluster.mode == "cluster" else "",
                         namespace=cluster.namespace)
        workers.append(RayWorker(f"w{i}", spec, watchdog_s=cluster.watchdog_s, session=session,
                                 runner_factory=runner_factory))
    return workers


def join_ray(cluster: ClusterSettings) -> Any:
    """``ray.init`` for the mode, unless this process already joined Ray (a test, an embedding
    application): then that Ray is used and left running at the end."""
    try:
        from engine.cluster.ray_worker import RaySession, import_ray

        ray = import_ray()
    except ImportError as exc:
        raise ClusterUnavailableError(
            f"`cluster.mode` is {cluster.mode!r}, but Ray is not installed: pip install -e '.[cluster]'") from exc
    if ray.is_initialized():
        return RaySession(owned=False)
    options: dict[str, Any] = {"namespace": cluster.namespace}
    if cluster.mode == "cluster":
        options["address"] = cluster.address
    else:  # Ray's dashboard is left out on a bot's own Ray: nobody is meant to reach it
        options.update(include_dashboard=False, runtime_env=_runtime_env())
    if cluster.mode == "local" and cluster.resource:
        if not cluster.workers:
            raise ConfigError("cluster.workers", cluster.workers,
                              f"with cluster.resource = {cluster.resource!r} it says how many workers to start")
        options["resources"] = {cluster.resource: cluster.workers}
    try:
        ray.init(**options)
    except (ConnectionError, TimeoutError, RuntimeError, ray.exceptions.RayError) as exc:
        raise ClusterUnavailableError(_why_not_joined(cluster, exc)) from exc
    return RaySession(owned=True)


def _why_not_joined(cluster: ClusterSettings, exc: BaseException) -> str:
    where = f"at `cluster.address` = {cluster.address!r}" if cluster.mode == "cluster" else "on this machine"
    causes = [exc]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    if any(type(c).__name__ == "AuthenticationError" for c in causes):
        # Ray 2.60's `ray start` turns token auth on, but a client only sends the token with
        # RAY_AUTH_MODE=token (docs/CLUSTER.md#security)
        return (f"Ray {where} refused this host's token: set RAY_AUTH_MODE=token and give the bot the "
                "cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN_PATH)")
    return f"Ray could not be reached or started {where}: {exc}"


def _worker_count(cluster: ClusterSettings) -> int:
    """``cluster.workers``, or as many as Ray's GPUs (or custom resource) allow when it is 0. An
    actor Ray cannot place waits for room without a word, so more workers than there is room
    for is refused in mode "local"; in mode "cluster" hosts may join later: a warning."""
    from engine.cluster.ray_worker import import_ray

    total = import_ray().cluster_resources()
    key, per_worker = (cluster.resource, 1.0) if cluster.resource else ("GPU", cluster.num_gpus)
    room = int(total.get(key, 0) / per_worker) if per_worker else cluster.workers
    seen = f"Ray sees {total.get(key, 0):g} {key} for workers needing {per_worker:g} each"
    if cluster.workers == 0 and room == 0:
        raise ConfigError("cluster.workers", 0, f"{seen}: set cluster.workers, or start Ray with GPUs")
    if cluster.workers > room:
        if cluster.mode == "local":
            raise ConfigError("cluster.workers", cluster.workers, f"{seen}, room for {room}")
        log.warning("cluster.workers = %d but %s (room for %d): the others wait for hosts to join",
                    cluster.workers, seen, room)
    return cluster.workers or room


def _runtime_env() -> dict[str, Any]:
    """Mode "local": the actors find this checkout first on their path (see ``PROJECT_ROOT``).
    Not in mode "cluster": the GPU hosts run their own install (docs/CLUSTER.md)."""
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}
