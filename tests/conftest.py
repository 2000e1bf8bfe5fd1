"""Shared fixtures: tiny twins built once per test session, configs pointing at them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.config import Config, parse_config, with_tiny_models
from engine.history import Deliveries

REPO = Path(__file__).resolve().parents[1]
# Nothing may reach a model hub in tests: fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def repo_config_raw() -> dict[str, Any]:
    return tomllib.loads((REPO / "config.toml").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from engine.tiny import ensure_tiny_models

    cache = os.environ.get("PROMPTPICS_TEST_TINY_CACHE")  # reuse across local runs if set
    return ensure_tiny_models(Path(cache) if cache else tmp_path_factory.mktemp("tiny-models"))


def make_tiny_config(tiny_models: Any, data_dir: Path, **limits: Any) -> Config:
    raw = repo_config_raw()
    raw["engine"].update(device="cpu", data_dir=str(data_dir))
    raw["limits"].update({"min_image_side": 64, **limits})
    return with_tiny_models(parse_config(raw, {}, base_dir=REPO), tiny_models)


@pytest.fixture
def tiny_config(tiny_models: Any, tmp_path: Path) -> Config:
    return make_tiny_config(tiny_models, tmp_path / "data")


@pytest.fixture
def cli_env(tiny_models: Any, tmp_path: Path) -> dict[str, str]:
    """The environment of a `promptpics` subprocess: its own data folder, the session's twins."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "tiny-models").symlink_to(tiny_models.root.parent)  # reuse the session's twins
    return {**os.environ, "PROMPTPICS_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}


def promptpics(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``promptpics ARGS`` as a user runs it: a real subprocess."""
    return subprocess.run([sys.executable, "-m", "bot", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)


@contextlib.contextmanager
def results_go_unrecorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inside: the process "dies" right after the platform took a result and before its delivery
    is recorded (``Deliveries.record`` raises for results); after: records work again, as after a
    restart."""
    record = Deliveries.record
    crashing = True

    async def record_or_crash(self: Deliveries, job_id: str, **kwargs: Any) -> None:
        if crashing and kwargs["kind"] == "result":
            raise RuntimeError("killed before the delivery was recorded")
        await record(self, job_id, **kwargs)

    monkeypatch.setattr(Deliveries, "record", record_or_crash)
    try:
        yield
    finally:
        crashing = False


# -- Ray (the [cluster] extra): one local Ray per test module that asks for it ----------------

RAY_RESOURCE = "promptpics_worker"  # a custom resource stands in for GPUs on CPU machines


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Local Ray with two units of ``RAY_RESOURCE`` (two workers), started as the bot's mode
    "local" starts it; shut down after the module. Held jobs (tests/held_runner.py) leave their
    markers in a folder every process on the machine sees."""
    ray = pytest.importorskip("ray", reason="install the [cluster] extra: pip install -e '.[cluster]'")
    from engine.cluster.modes import join_ray
    from engine.config import ClusterSettings
    from tests.held_runner import HOLD_DIR

    os.environ[HOLD_DIR] = str(tmp_path_factory.mktemp("held"))  # before Ray starts: its processes inherit it
    join_ray(ClusterSettings(mode="local", resource=RAY_RESOURCE, workers=2))
    yield ray
    ray.shutdown()
    del os.environ[HOLD_DIR]


def cluster_test_config(tiny_models: Any, data_dir: Path) -> Config:
    """The tiny twins with a preview at every step (unchecked: no detector in the way)."""
    from engine.config import PreviewSettings

    config = make_tiny_config(tiny_models, data_dir)
    return config.model_copy(update={"previews": PreviewSettings(policy="unchecked", every_steps=1, min_interval_s=0.0)})
