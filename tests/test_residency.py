"""The residency manager against a pretend GPU: budget, eviction order, exclusive models, the
RAM tier, failed moves, and out-of-memory recovery by phase."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from engine.config import Config, ResidencySettings, load_config, validate_table
from engine.errors import ConfigError, OutOfMemoryError
from engine.pipelines import LoadedPipeline
from engine.residency import (
    DECODE_PHASE,
    GiB,
    ResidencyManager,
    TorchOps,
    weights_nbytes,
)
from tests.conftest import REPO

GB = GiB


class FakeGpu:
    """``DeviceOps`` for a pretend card of ``total`` bytes. It keeps count of what sits on it,
    runs out of memory like a card would, and records every operation in ``events``."""

    def __init__(self, total: int | None = 24 * GB, *, can_park: bool = True, sizes: dict[str, int] | None = None,
                 keeps_host_copy: bool = False) -> None:
        self.total, self.can_park, self.keeps_host_copy = total, can_park, keeps_host_copy
        self.sizes = sizes or {"flux_dev": 12 * GB, "realvis_xl": 7 * GB, "sd3_medium": 9 * GB, "logo_sdxl": 3 * GB}
        self.on_gpu: dict[str, int] = {}
        self.events: list[tuple[str, str]] = []
        self.fail_next: dict[tuple[str, str], BaseException] = {}  # (op, model) -> raised once
        self.actual_extra: dict[str, int] = {}  # a load that takes more than its estimate

    def _check(self, op: str, model_id: str) -> None:
        exc = self.fail_next.pop((op, model_id), None)
        if exc is not None:
            raise exc

    def _place(self, model_id: str, size: int, phase: str) -> None:
        if self.total is not None and sum(self.on_gpu.values()) + size > self.total:
            raise OutOfMemoryError(model_id, phase)
        self.on_gpu[model_id] = size

    def load(self, spec: Any, device: Any, dtype: Any) -> LoadedPipeline:
        self._check("load", spec.id)
        size = self.sizes[spec.id] + self.actual_extra.get(spec.id, 0)
        self._place(spec.id, size, "loading")
        self.events.append(("load", spec.id))
        return LoadedPipeline(spec, object(), device, dtype, "gpu", size, 0.0)

    def release(self, loaded: LoadedPipeline) -> None:
        self.on_gpu.pop(loaded.spec.id, None)
        self.events.append(("release", loaded.spec.id))

    def park(self, loaded: LoadedPipeline) -> None:
        self._check("park", loaded.spec.id)
        self.on_gpu.pop(loaded.spec.id, None)
        self.events.append(("park", loaded.spec.id))

    def unpark(self, loaded: LoadedPipeline) -> None:
        self._check("unpark", loaded.spec.id)
        self._place(loaded.spec.id, loaded.nbytes, "loading")
        self.events.append(("unpark", loaded.spec.id))

    def forget_host_copy(self, loaded: LoadedPipeline) -> None:
        self.events.append(("forget", loaded.spec.id))

    def offload(self, loaded: LoadedPipeline) -> bool:
        loaded.placement = "model-offload"
        self.on_gpu[loaded.spec.id] = loaded.nbytes // 4
        self.events.append(("offload", loaded.spec.id))
        return True

    def free_bytes(self) -> int | None:
        return None if self.total is None else self.total - sum(self.on_gpu.values())

    def allocated_bytes(self) -> int | None:
        return None if self.total is None else sum(self.on_gpu.values())

    def clear_cache(self) -> None:
        self.events.append(("clear", ""))

    def expected_bytes(self, spec: Any, dtype: Any) -> int | None:
        return self.sizes.get(spec.id)

    def device_bytes(self, loaded: LoadedPipeline, measured: int | None) -> int:
        if loaded.placement == "model-offload":
            return loaded.nbytes // 4
        return measured if measured is not None else loaded.nbytes

    def moves(self) -> list[tuple[str, str]]:
        return [e for e in self.events if e[0] != "clear"]


@pytest.fixture
def config() -> Config:
    return load_config(REPO / "config.toml", env={})


def manager(gpu: FakeGpu, **settings: Any) -> ResidencyManager:
    import torch

    device = torch.device("cuda") if gpu.can_park else torch.device("cpu")
    return ResidencyManager(device, torch.float32, ops=gpu, settings=ResidencySettings(**settings))


def where(rm: ResidencyManager) -> dict[str, str]:
    return {r.model_id: r.where for r in rm.snapshot()}


def acquire(rm: ResidencyManager, config: Config, *ids: str, needed_soon: tuple[str, ...] = ()) -> None:
    for mid in ids:
        rm.acquire_blocking(config.model(mid), needed_soon=needed_soon)


# -- the seed's guarantees still hold ----------------------------------------------------------


def test_a_resident_model_is_not_loaded_twice(config: Config) -> None:
    gpu = FakeGpu()
    rm = manager(gpu)
    _, first = rm.acquire_blocking(config.model("flux_dev"))
    _, second = rm.acquire_blocking(config.model("flux_dev"))
    assert gpu.moves() == [("load", "flux_dev")] and second == 0.0


def test_out_of_memory_while_loading_evicts_the_others_and_retries_once(config: Config) -> None:
    gpu = FakeGpu(total=None, can_park=False)  # no budget: only the OOM itself makes room
    rm = manager(gpu)
    acquire(rm, config, "flux_dev", "realvis_xl")
    gpu.fail_next[("load", "sd3_medium")] = OutOfMemoryError("sd3_medium", "loading")
    acquire(rm, config, "sd3_medium")
    assert gpu.moves() == [("load", "flux_dev"), ("load", "realvis_xl"), ("release", "flux_dev"),
                           ("release", "realvis_xl"), ("load", "sd3_medium")]
    assert list(where(rm)) == ["sd3_medium"]


def test_out_of_memory_with_nothing_to_free_is_reported_and_nothing_stays(config: Config) -> None:
    gpu = FakeGpu(total=None)
    rm = manager(gpu)
    gpu.fail_next[("load", "sd3_medium")] = OutOfMemoryError("sd3_medium", "loading")
    with pytest.raises(OutOfMemoryError, match="ran out of memory while loading `sd3_medium`"):
        acquire(rm, config, "sd3_medium")
    assert rm.snapshot() == () and gpu.on_gpu == {}
    assert gpu.events[-1] == ("clear", "")  # memory handed back after the failure


def test_an_exclusive_model_evicts_everything_and_is_never_joined(config: Config) -> None:
    gpu = FakeGpu(total=64 * GB, can_park=False)
    rm = manager(gpu)
    acquire(rm, config, "flux_dev", "realvis_xl")
    rm.pin_blocking("realvis_xl")  # exclusive wins over a pin
    acquire(rm, config, "logo_sdxl")
    assert list(where(rm)) == ["logo_sdxl"]
    acquire(rm, config, "sd3_medium")
    assert list(where(rm)) == ["sd3_medium"]
    assert [e for e in gpu.moves() if e[0] == "release"] == [("release", "flux_dev"), ("release", "realvis_xl"),
                                                             ("release", "logo_sdxl")]


# -- budget and the cost rule ------------------------------------------------------------------


def test_two_models_stay_resident_when_the_budget_holds_both(config: Config) -> None:
    gpu = FakeGpu(total=24 * GB)
    rm = manager(gpu, reserve_gb=2)  # budget 22 GiB: flux 12 + realvis 7 fit, sd3 9 does not
    acquire(rm, config, "flux_dev", "realvis_xl")
    assert where(rm) == {"flux_dev": "gpu", "realvis_xl": "gpu"}
    acquire(rm, config, "sd3_medium")
    assert where(rm) == {"realvis_xl": "gpu", "sd3_medium": "gpu"}  # flux was least recently used
    assert ("release", "flux_dev") in gpu.moves()


def test_budget_arithmetic_auto_and_configured(config: Config) -> None:
    gpu = FakeGpu(total=24 * GB)
    rm = manager(gpu, reserve_gb=3)
    assert rm.gpu_budget_bytes() == 21 * GB
    acquire(rm, config, "flux_dev")
    # free (12) + what the ready models hold (12) - reserve (3): loading does not shrink it
    assert rm.gpu_budget_bytes() == 21 * GB
    status = rm.status()
    assert (status.gpu_budget_bytes, status.gpu_used_bytes, status.gpu_free_bytes) == (21 * GB, 12 * GB, 9 * GB)
    fixed = manager(FakeGpu(total=24 * GB), gpu_budget_gb=10.5)
    assert fixed.gpu_budget_bytes() == int(10.5 * GB)
    assert manager(FakeGpu(total=None, can_park=False)).gpu_budget_bytes() is None  # CPU: no budget unless set


def test_eviction_takes_what_no_queued_job_needs_before_the_least_recently_used(config: Config) -> None:
    gpu = FakeGpu(total=32 * GB, can_park=False)
    rm = manager(gpu, reserve_gb=2)  # budget 30: flux 12 + realvis 7 + logo... use three non-exclusive
    acquire(rm, config, "realvis_xl", "flux_dev")  # realvis is least recently used
    acquire(rm, config, "sd3_medium", needed_soon=("realvis_xl",))  # 28 GiB: fits
    assert set(where(rm)) == {"realvis_xl", "flux_dev", "sd3_medium"}
    gpu.sizes["big"] = 10 * GB
    big = config.model("flux_dev").model_copy(update={"id": "big"})
    rm.acquire_blocking(big, needed_soon=("realvis_xl", "sd3_medium"))
    # flux is the one no queued job needs, although realvis was used longer ago
    assert ("release", "flux_dev") in gpu.moves() and "realvis_xl" in where(rm)


def test_the_dispatchers_hint_is_used_when_acquire_is_given_none(config: Config) -> None:
    gpu = FakeGpu(total=32 * GB, can_park=False)
    rm = manager(gpu, reserve_gb=2)
    acquire(rm, config, "realvis_xl", "flux_dev", "sd3_medium")  # 28 of 30
    rm.set_needed_soon(("realvis_xl", "sd3_medium"))  # e.g. from the loop thread
    gpu.sizes["big"] = 10 * GB
    rm.acquire_blocking(config.model("flux_dev").model_copy(update={"id": "big"}))
    assert ("release", "flux_dev") in gpu.moves() and "realvis_xl" in where(rm)


def test_among_needed_models_the_one_needed_latest_goes_first(config: Config) -> None:
    gpu = FakeGpu(total=30 * GB, can_park=False)
    rm = manager(gpu, reserve_gb=2)
    acquire(rm, config, "realvis_xl", "flux_dev")  # 19 of 28
    acquire(rm, config, "sd3_medium", needed_soon=("realvis_xl", "flux_dev"))  # 28: fits exactly
    gpu.sizes["big"] = 8 * GB
    rm.acquire_blocking(config.model("flux_dev").model_copy(update={"id": "big"}), needed_soon=("sd3_medium", "realvis_xl", "flux_dev"))
    assert [e for e in gpu.moves() if e[0] == "release"] == [("release", "flux_dev")]


def test_a_pinned_model_is_not_evicted_by_the_cost_rule(config: Config) -> None:
    gpu = FakeGpu(total=24 * GB, can_park=False)
    rm = manager(gpu, reserve_gb=2)
    rm.preload_blocking(config.model("flux_dev"), pin=True)
    acquire(rm, config, "realvis_xl", "sd3_medium")  # sd3 does not fit beside both: realvis goes
    assert set(where(rm)) == {"flux_dev", "sd3_medium"}
    assert rm.status().pinned == ("flux_dev",) and next(r for r in rm.snapshot() if r.model_id == "flux_dev").pinned


def test_a_load_larger_than_its_estimate_is_trimmed_back_to_the_budget(config: Config) -> None:
    gpu = FakeGpu(total=24 * GB, can_park=False)
    rm = manager(gpu, reserve_gb=2)
    acquire(rm, config, "realvis_xl")
    gpu.actual_extra["flux_dev"] = 4 * GB  # estimated 12, measured 16: 23 > 22
    acquire(rm, config, "flux_dev")
    assert list(where(rm)) == ["flux_dev"] and rm.status().gpu_used_bytes == 16 * GB


def test_the_cache_is_cleared_around_swaps_not_between_runs(config: Config) -> None:
    gpu = FakeGpu(total=16 * GB)
    rm = manager(gpu, reserve_gb=1)
    acquire(rm, config, "flux_dev")
    assert gpu.events == [("load", "flux_dev"), ("clear", "")]  # the loader's temporaries
    acquire(rm, config, "flux_dev", "flux_dev")
    assert gpu.events.count(("clear", "")) == 1  # runs of one model: left alone
    acquire(rm, config, "realvis_xl")  # a swap: flux goes first
    assert gpu.events[2:] == [("release", "flux_dev"), ("clear", ""), ("load", "realvis_xl"), ("clear", "")]


# -- the RAM tier ------------------------------------------------------------------------------


def test_an_evicted_model_parks_in_ram_and_comes_back_as_a_copy(config: Config) -> None:
    gpu = FakeGpu(total=24 * GB)
    rm = manager(gpu, reserve_gb=2, cpu_ram_gb=32)
    acquire(rm, config, "flux_dev", "realvis_xl", "sd3_medium")
    assert where(rm) == {"realvis_xl": "gpu", "sd3_medium": "gpu", "flux_dev": "cpu-ram"}
    assert rm.placement_sets() == (frozenset({"realvis_xl", "sd3_medium"}), frozenset({"flux_dev"}))
    assert not rm.is_resident("flux_dev")
    acquire(rm, config, "flux_dev")
    assert gpu.moves()[-2:] == [("park", "realvis_xl"), ("unpark", "flux_dev")]
    assert gpu.moves().count(("load", "flux_dev")) == 1  # never read from disk twice


def test_a_full_ram_tier_releases_by_the_cost_rule(config: Config) -> None:
    gpu = FakeGpu(total=14 * GB)
    rm = manager(gpu, reserve_gb=1, cpu_ram_gb=17)  # room in RAM for realvis + sd3 (16), not flux too
    acquire(rm, config, "realvis_xl", "sd3_medium", "flux_dev")
    assert where(rm) == {"realvis_xl": "cpu-ram", "sd3_medium": "cpu-ram", "flux_dev": "gpu"}
    rm.acquire_blocking(config.model("realvis_xl"), needed_soon=("sd3_medium",))  # flux must leave the GPU
    # realvis (coming back) and sd3 (needed soon) keep their RAM: flux does not fit beside them
    assert where(rm) == {"realvis_xl": "gpu", "sd3_medium": "cpu-ram"}
    assert ("release", "flux_dev") in gpu.moves() and rm.status().ram_used_bytes <= 17 * GB


def test_a_failed_move_from_ram_leaves_the_model_parked_whole_then_evicts_more(config: Config) -> None:
    gpu = FakeGpu(total=30 * GB)
    rm = manager(gpu, reserve_gb=2, cpu_ram_gb=64)
    acquire(rm, config, "realvis_xl", "flux_dev", "sd3_medium")  # 28: all fit
    rm.unload_blocking("sd3_medium")
    rm.free_others_blocking(keep="realvis_xl")  # flux parks
    assert where(rm) == {"realvis_xl": "gpu", "flux_dev": "cpu-ram"}
    gpu.fail_next[("unpark", "flux_dev")] = OutOfMemoryError("flux_dev", "loading")
    acquire(rm, config, "flux_dev")
    assert where(rm) == {"flux_dev": "gpu", "realvis_xl": "cpu-ram"}
    gpu.fail_next[("unpark", "realvis_xl")] = OutOfMemoryError("realvis_xl", "loading")
    rm.unload_blocking("flux_dev")
    with pytest.raises(OutOfMemoryError):  # nothing else to evict: the error stands...
        acquire(rm, config, "realvis_xl")
    assert where(rm) == {"realvis_xl": "cpu-ram"}  # ...and the model is still whole in RAM
    acquire(rm, config, "realvis_xl")
    assert where(rm) == {"realvis_xl": "gpu"}


def test_a_move_from_ram_that_fails_halfway_puts_every_component_back(config: Config) -> None:
    import torch

    class HalfwayPipe:
        def __init__(self) -> None:
            self.where = {"text_encoder": "cpu", "transformer": "cpu", "vae": "cpu"}

        def to(self, device: Any) -> HalfwayPipe:
            for name in self.where:
                if str(device) != "cpu" and name == "vae":
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
                self.where[name] = str(device)
            return self

    pipe = HalfwayPipe()
    loaded = LoadedPipeline(config.model("flux_dev"), pipe, torch.device("cuda"), torch.bfloat16, "gpu", 10, 0.0)
    with pytest.raises(OutOfMemoryError, match="flux_dev"):
        TorchOps(torch.device("cuda")).unpark(loaded)
    assert set(pipe.where.values()) == {"cpu"}


def test_a_kept_ram_copy_counts_against_the_ram_tier_and_is_dropped_first_when_full(config: Config) -> None:
    gpu = FakeGpu(total=14 * GB, keeps_host_copy=True)
    rm = manager(gpu, reserve_gb=1, cpu_ram_gb=20)
    acquire(rm, config, "realvis_xl", "flux_dev")  # realvis parks (7)
    acquire(rm, config, "realvis_xl")  # flux parks (12); realvis back, its RAM copy kept
    assert where(rm) == {"realvis_xl": "gpu", "flux_dev": "cpu-ram"}
    assert rm.status().ram_used_bytes == 19 * GB
    acquire(rm, config, "sd3_medium")  # realvis must leave the GPU: parking it again is a copy, no new RAM
    assert where(rm) == {"sd3_medium": "gpu", "realvis_xl": "cpu-ram", "flux_dev": "cpu-ram"}
    rm.acquire_blocking(config.model("flux_dev"), needed_soon=("realvis_xl",))
    # sd3 (9) cannot park beside realvis's 7 and flux's kept 12: realvis is needed soon, so
    # nothing is dropped for sd3, which is released
    assert where(rm) == {"flux_dev": "gpu", "realvis_xl": "cpu-ram"} and ("release", "sd3_medium") in gpu.moves()
    assert rm.status().ram_used_bytes == 19 * GB
    rm.free_others_blocking(keep="none")
    acquire(rm, config, "sd3_medium")
    assert ("forget", "flux_dev") not in gpu.events  # flux is parked (its copy is its place in RAM)


def test_the_ram_copy_of_a_model_on_the_gpu_is_dropped_when_the_tier_needs_room(config: Config) -> None:
    sizes = {"flux_dev": 4 * GB, "realvis_xl": 6 * GB, "sd3_medium": 4 * GB, "big": 4 * GB}
    gpu = FakeGpu(total=9 * GB, keeps_host_copy=True, sizes=sizes)
    rm = manager(gpu, reserve_gb=0, cpu_ram_gb=4)
    acquire(rm, config, "flux_dev", "realvis_xl", "flux_dev")  # flux parked and back: keeps its 4 in RAM
    acquire(rm, config, "sd3_medium")  # fits beside flux
    assert where(rm) == {"flux_dev": "gpu", "sd3_medium": "gpu"} and rm.status().ram_used_bytes == 4 * GB
    rm.acquire_blocking(config.model("flux_dev").model_copy(update={"id": "big"}), needed_soon=("flux_dev",))
    # sd3 goes (flux is needed soon); parking it needs flux's RAM copy, which is dropped
    assert ("forget", "flux_dev") in gpu.events
    assert where(rm) == {"flux_dev": "gpu", "big": "gpu", "sd3_medium": "cpu-ram"}
    assert rm.status().ram_used_bytes == 4 * GB


def test_parking_packs_every_tensor_into_reused_host_arenas_without_changing_a_pixel(
        tiny_config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from engine.jobs import GenerationParams
    from engine.pipelines import generate_blocking, load_pipeline_blocking
    from engine.residency.device import _named_tensors, _PinnedCopy

    real_empty = torch.empty
    pinned: list[int] = []

    def empty(*args: Any, pin_memory: bool = False, **kwargs: Any) -> Any:  # no CUDA here: count, don't pin
        t = real_empty(*args, **kwargs)
        pinned.append(t.numel()) if pin_memory else None
        return t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(_PinnedCopy, "ARENA", 2**20)  # small arenas, so the tiny model needs several
    ops = TorchOps(torch.device("cpu"))
    ops._device = type("Cuda", (), {"type": "cuda"})()  # park as on a GPU host
    loaded = load_pipeline_blocking(tiny_config.model("sd3_medium"), torch.device("cpu"), torch.float32)
    params = GenerationParams("a fox", "", "sd3_medium", 2, 5.0, 64, 64, 3)

    def render() -> bytes:
        return bytes(generate_blocking(loaded, params, on_step=lambda i, n: None, cancel=threading.Event()).tobytes())

    before = render()
    ops.park(loaded)
    copy = ops._host[id(loaded)]
    arenas = {a.data_ptr(): a for a in copy.arenas}
    for _key, t in _named_tensors(loaded.pipe):
        base = t.data.untyped_storage().data_ptr()
        assert base in arenas  # every tensor lives in one of the arenas now
    assert render() == before
    allocations = len(pinned)
    assert sum(pinned) <= 1.1 * loaded.nbytes + _PinnedCopy.ARENA  # packed: little beyond the weights
    ops.park(loaded)  # parking again reuses the buffers
    assert len(pinned) == allocations and render() == before
    ops.release(loaded)
    assert id(loaded) not in ops._host


def test_a_cpu_device_has_no_ram_tier() -> None:
    import torch

    assert TorchOps(torch.device("cpu")).can_park is False
    rm = ResidencyManager(torch.device("cpu"), torch.float32, settings=ResidencySettings(cpu_ram_gb=64))
    assert rm.ram_budget_bytes() is None and rm.gpu_budget_bytes() is None


# -- preload, unload, pin ----------------------------------------------------------------------


def test_preload_unload_and_pin(config: Config) -> None:
    gpu = FakeGpu(total=24 * GB)
    rm = manager(gpu, reserve_gb=2, cpu_ram_gb=32)
    assert rm.preload_blocking(config.model("sd3_medium"), pin=True) >= 0.0
    assert where(rm) == {"sd3_medium": "gpu"} and rm.status().pinned == ("sd3_medium",)
    acquire(rm, config, "flux_dev", "realvis_xl")  # realvis does not fit with both: flux (not pinned) parks
    assert where(rm) == {"sd3_medium": "gpu", "realvis_xl": "gpu", "flux_dev": "cpu-ram"}
    assert rm.unload_blocking("flux_dev") is True and "flux_dev" not in where(rm)  # from RAM too
    assert rm.unload_blocking("sd3_medium") is True and rm.status().pinned == ()
    assert rm.unload_blocking("sd3_medium") is False
    rm.unload_all_blocking()
    assert rm.snapshot() == () and gpu.on_gpu == {}


def test_the_status_is_readable_from_another_thread_while_the_gpu_thread_works(config: Config) -> None:
    gpu = FakeGpu()
    rm = manager(gpu)
    seen: list[Any] = []
    errors: list[BaseException] = []
    reading, stop = threading.Event(), threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.append(rm.snapshot())
                reading.set()
        except BaseException as exc:  # a torn read shows up here, not as a silent thread death
            errors.append(exc)
            reading.set()

    t = threading.Thread(target=reader)
    t.start()
    assert reading.wait(10)
    for _ in range(50):
        acquire(rm, config, "flux_dev", "realvis_xl")
        rm.unload_all_blocking()
    stop.set()
    t.join()
    assert not errors
    # Every read is a whole, immutable state the manager published: the models loaded so far,
    # in order, each once - never a list still being changed by the GPU thread.
    assert all(isinstance(snap, tuple) for snap in seen)
    states = {tuple(r.model_id for r in snap) for snap in seen}
    assert states <= {(), ("flux_dev",), ("flux_dev", "realvis_xl")}, states
    assert rm.snapshot() == ()


# -- out-of-memory recovery while running, by phase ----------------------------------------------


class FakeRun:
    """Stands in for generate_blocking: raises the queued errors in turn, then succeeds."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, loaded: LoadedPipeline, tiled: bool) -> str:
        self.calls.append((loaded.placement, tiled))
        if self.errors:
            raise self.errors.pop(0)
        return "image"


def oom(phase: str) -> OutOfMemoryError:
    return OutOfMemoryError("flux_dev", phase)


def test_oom_in_the_vae_decode_retries_with_tiled_decoding(config: Config) -> None:
    gpu = FakeGpu()
    rm = manager(gpu)
    acquire(rm, config, "realvis_xl", "flux_dev")
    run = FakeRun(oom(DECODE_PHASE))
    assert rm.run_with_recovery_blocking(config.model("flux_dev"), run, job_id="j1") == "image"
    assert run.calls == [("gpu", False), ("gpu", True)]
    assert "realvis_xl" in where(rm)  # decoding in tiles needed no eviction


def test_oom_while_denoising_frees_the_others_then_offloads(config: Config) -> None:
    gpu = FakeGpu()
    rm = manager(gpu, cpu_ram_gb=32)
    acquire(rm, config, "realvis_xl", "flux_dev")
    run = FakeRun(oom("generating with"), oom("generating with"))
    assert rm.run_with_recovery_blocking(config.model("flux_dev"), run) == "image"
    assert run.calls == [("gpu", False), ("gpu", False), ("model-offload", False)]
    assert where(rm) == {"flux_dev": "offloaded", "realvis_xl": "cpu-ram"}
    assert rm.status().gpu_used_bytes == 3 * GB  # offloaded: its largest part counts
    rm.free_others_blocking(keep="realvis_xl")
    assert "flux_dev" not in where(rm)  # a demoted model is released, not parked


def test_oom_while_denoising_alone_goes_straight_to_offload(config: Config) -> None:
    gpu = FakeGpu()
    rm = manager(gpu)
    acquire(rm, config, "flux_dev")
    run = FakeRun(oom("generating with"))
    assert rm.run_with_recovery_blocking(config.model("flux_dev"), run) == "image"
    assert run.calls == [("gpu", False), ("model-offload", False)]


def test_oom_after_every_remedy_is_reported(config: Config) -> None:
    gpu = FakeGpu()
    rm = manager(gpu)
    acquire(rm, config, "realvis_xl", "flux_dev")
    run = FakeRun(*(oom("generating with") for _ in range(4)))
    with pytest.raises(OutOfMemoryError):
        rm.run_with_recovery_blocking(config.model("flux_dev"), run)
    assert len(run.calls) == 3  # first try, after freeing the others, with offload
    assert gpu.events[-1] == ("clear", "")


def test_oom_with_nothing_to_free_and_no_offload_is_reported(config: Config) -> None:
    gpu = FakeGpu(can_park=False)
    gpu.offload = lambda loaded: False  # type: ignore[method-assign]  # as on a CPU device
    rm = manager(gpu)
    acquire(rm, config, "flux_dev")
    run = FakeRun(oom("generating with"), oom("generating with"))
    with pytest.raises(OutOfMemoryError):
        rm.run_with_recovery_blocking(config.model("flux_dev"), run)
    assert run.calls == [("gpu", False)]


def test_a_cpu_device_cannot_offload() -> None:
    import torch

    loaded = LoadedPipeline(load_config(REPO / "config.toml", env={}).model("flux_dev"), object(), torch.device("cpu"),
                            torch.float32, "cpu", 10, 0.0)
    assert TorchOps(torch.device("cpu")).offload(loaded) is False and loaded.placement == "cpu"


def test_a_cancelled_run_is_not_retried(config: Config) -> None:
    from engine.errors import JobCancelledError

    gpu = FakeGpu()
    rm = manager(gpu)
    acquire(rm, config, "flux_dev")
    run = FakeRun(JobCancelledError("j"))
    with pytest.raises(JobCancelledError):
        rm.run_with_recovery_blocking(config.model("flux_dev"), run)
    assert len(run.calls) == 1


# -- sizes from weight files, and configuration -------------------------------------------------


def test_expected_size_is_read_from_safetensors_headers_in_the_load_dtype(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text('{"_class_name": "X", "unet": ["diffusers", "U"], "vae": ["diffusers", "V"], '
                                               '"safety_checker": [null, null]}')
    save_file({"w": torch.zeros(100, 10), "step": torch.zeros(4, dtype=torch.int64)}, tmp_path / "unet" / "m.safetensors")
    save_file({"w": torch.zeros(1000)}, tmp_path / "unet" / "m.fp16.safetensors")  # a variant: not loaded
    save_file({"w": torch.zeros(50, dtype=torch.float16)}, tmp_path / "vae" / "m.safetensors")
    assert weights_nbytes(tmp_path, 2) == {"unet": 1000 * 2 + 4 * 8, "vae": 50 * 2}
    assert weights_nbytes(tmp_path, 4) == {"unet": 1000 * 4 + 4 * 8, "vae": 50 * 4}


def test_expected_size_of_a_real_tiny_pipeline_matches_what_loads(tiny_config: Config) -> None:
    import torch

    from engine.pipelines import load_pipeline_blocking

    spec = tiny_config.model("sd3_medium")
    expected = TorchOps(torch.device("cpu")).expected_bytes(spec, torch.float32)
    loaded = load_pipeline_blocking(spec, torch.device("cpu"), torch.float32)
    assert expected is not None and abs(expected - loaded.nbytes) <= 0.02 * loaded.nbytes


def test_residency_config_is_validated() -> None:
    assert validate_table(ResidencySettings, {}, "residency.") == ResidencySettings()
    assert validate_table(ResidencySettings, {"gpu_budget_gb": 20, "cpu_ram_gb": 48.5}, "residency.") == ResidencySettings(gpu_budget_gb=20.0, reserve_gb=3.0, cpu_ram_gb=48.5)
    with pytest.raises(ConfigError, match=r"`residency.reserve_gb` is -1, but it must be at least 0 GiB"):
        validate_table(ResidencySettings, {"reserve_gb": -1}, "residency.")
    with pytest.raises(ConfigError, match=r"`residency.cpu_ram_gb` is 'lots'"):
        validate_table(ResidencySettings, {"cpu_ram_gb": "lots"}, "residency.")
    with pytest.raises(ConfigError, match=r"`residency.ram_gb`.*not a known key"):
        validate_table(ResidencySettings, {"ram_gb": 3}, "residency.")


def test_repo_config_residency_section_parses() -> None:
    import tomllib

    raw = tomllib.loads((REPO / "config.toml").read_text(encoding="utf-8"))
    assert validate_table(ResidencySettings, raw.get("residency", {}), "residency.") == ResidencySettings()


# -- the real pipelines report an out-of-memory after the last step as the decode phase ------------


def test_real_generate_reports_an_oom_after_the_last_step_as_the_decode_phase(tiny_config: Config) -> None:
    import torch

    from engine.jobs import GenerationParams
    from engine.pipelines import generate_blocking, load_pipeline_blocking

    loaded = load_pipeline_blocking(tiny_config.model("realvis_xl"), torch.device("cpu"), torch.float32)
    real_decode = loaded.pipe.vae.decode
    calls: list[bool] = []

    def decode(*args: Any, **kwargs: Any) -> Any:
        calls.append(bool(loaded.pipe.vae.use_tiling))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decode(*args, **kwargs)

    loaded.pipe.vae.decode = decode
    params = GenerationParams("a fox", "", "realvis_xl", 2, 5.0, 64, 64, 1)
    rm = ResidencyManager(torch.device("cpu"), torch.float32, loader=lambda s, d, t: loaded, releaser=lambda p: None)
    rm.acquire_blocking(loaded.spec)
    image = rm.run_with_recovery_blocking(loaded.spec, lambda lp, tiled: generate_blocking(
        lp, params, on_step=lambda i, n: None, cancel=threading.Event(), tiled_decode=tiled))
    assert image.size == (64, 64) and calls == [False, True]
    assert loaded.pipe.vae.use_tiling is False  # tiling is for the retry only
