"""The seed's residency rule with a fake loader at the seam: who stays, who goes, OOM retry."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from engine.config import Config, load_config
from engine.errors import OutOfMemoryError
from engine.pipelines import LoadedPipeline
from engine.residency import ResidencyManager
from tests.conftest import REPO


class FakeLoader:
    """Loads nothing; can be told to run out of memory while some models are resident."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.released: list[str] = []
        self.oom_while_resident: set[str] = set()
        self.resident: set[str] = set()

    def load(self, spec: Any, device: Any, dtype: Any) -> LoadedPipeline:
        if self.resident & self.oom_while_resident:
            raise OutOfMemoryError(spec.id, "loading")
        self.loads.append(spec.id)
        self.resident.add(spec.id)
        return LoadedPipeline(spec, object(), device, dtype, "cpu", 1000, 0.0)

    def release(self, loaded: LoadedPipeline) -> None:
        self.released.append(loaded.spec.id)
        self.resident.discard(loaded.spec.id)


@pytest.fixture
def config() -> Config:
    return load_config(REPO / "config.toml", env={})


@pytest.fixture
def fake() -> FakeLoader:
    return FakeLoader()


def manager(fake: FakeLoader) -> ResidencyManager:
    import torch

    return ResidencyManager(torch.device("cpu"), torch.float32, loader=fake.load, releaser=fake.release)


def test_a_resident_model_is_not_loaded_twice(config: Config, fake: FakeLoader) -> None:
    rm = manager(fake)
    _, first = rm.acquire_blocking(config.model("flux_dev"))
    _, second = rm.acquire_blocking(config.model("flux_dev"))
    assert fake.loads == ["flux_dev"] and second == 0.0


def test_out_of_memory_while_loading_unloads_the_others_and_retries_once(config: Config, fake: FakeLoader) -> None:
    rm = manager(fake)
    rm.acquire_blocking(config.model("flux_dev"))
    rm.acquire_blocking(config.model("realvis_xl"))
    fake.oom_while_resident = {"flux_dev"}
    rm.acquire_blocking(config.model("sd3_medium"))
    assert set(fake.released) == {"flux_dev", "realvis_xl"}
    assert [r.model_id for r in rm.snapshot()] == ["sd3_medium"]


def test_out_of_memory_with_nothing_to_free_is_reported(config: Config, fake: FakeLoader) -> None:
    rm = manager(fake)
    fake.oom_while_resident = {"flux_dev"}
    fake.resident.add("flux_dev")  # something outside the manager holds the memory
    with pytest.raises(OutOfMemoryError, match="ran out of memory while loading `sd3_medium`"):
        rm.acquire_blocking(config.model("sd3_medium"))
    assert rm.snapshot() == ()


def test_an_exclusive_model_is_never_joined(config: Config, fake: FakeLoader) -> None:
    rm = manager(fake)
    custom = replace(config.model("sd3_medium"), exclusive=True)
    rm.acquire_blocking(config.model("flux_dev"))
    rm.acquire_blocking(custom)
    assert [r.model_id for r in rm.snapshot()] == ["sd3_medium"]
    rm.acquire_blocking(config.model("realvis_xl"))
    assert [r.model_id for r in rm.snapshot()] == ["realvis_xl"]
    assert fake.released == ["flux_dev", "sd3_medium"]
