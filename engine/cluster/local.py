"""``LocalWorker``: today's GPU thread and job runner in this process (embedded mode, the default).

Everything torch does for a job happens on its one ``WorkerThread`` ("promptpics-gpu"), as it did
before the worker seam: the runner is built there (device, TF32, the auto placement for this
card), jobs run there one at a time, admin calls (preload, unload, pin) and the router's LLM run
there between jobs. Imports no ray.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from engine.cluster import WorkerInfo
from engine.cluster.runner import JobRunner, RunOutput, default_runner_blocking
from engine.errors import EngineClosedError
from engine.llm import ChatLLM, LLMCache
from engine.pipelines import configure_torch_blocking, resolve_device_blocking, resolve_dtype
from engine.placement.start import auto_placement_blocking
from engine.workers import WorkerThread

if TYPE_CHECKING:
    from engine.config import Config
    from engine.jobs import GenerationParams
    from engine.pipelines import PreviewCallback
    from engine.residency import ResidencyStatus, ResidentModel
    from engine.safety import Attempt

T = TypeVar("T")

RunnerFactory = Callable[["Config", Any, Any], JobRunner]


class LocalWorker:
    """One GPU thread and its ``JobRunner`` (``runner_factory(config, device, dtype)``, built on the thread)."""

    def __init__(self, name: str = "gpu", *, runner_factory: RunnerFactory | None = None,
                 thread_name: str = "promptpics-gpu") -> None:
        self._name = name
        self._factory = runner_factory or default_runner_blocking
        self._thread = WorkerThread(thread_name)
        self._runner: JobRunner | None = None
        self._llms: LLMCache | None = None
        self._config: Config | None = None
        self._cancels: dict[str, threading.Event] = {}
        self._card = "not started"
        self._budget: int | None = None
        self._fits: frozenset[str] = frozenset()
        self._stopped = False
        self.device: Any = None

    # -- what the engine reads -------------------------------------------------------------

    @property
    def info(self) -> WorkerInfo:
        return WorkerInfo(self._name, self._card, "", self._budget)

    @property
    def alive(self) -> bool:
        return self._runner is not None and not self._stopped

    def placement_sets(self) -> tuple[frozenset[str], frozenset[str]]:
        return self._runner.residency.placement_sets() if self._runner else (frozenset(), frozenset())

    def residency_status(self) -> ResidencyStatus | None:
        return self._runner.residency.status() if self._runner else None

    def resident_models(self) -> tuple[ResidentModel, ...]:
        return self._runner.residency.snapshot() if self._runner else ()

    def fits(self, model_id: str) -> bool:
        return model_id in self._fits

    def set_needed_soon(self, models: Sequence[str]) -> None:
        if self._runner is not None:
            self._runner.residency.set_needed_soon(models)

    # -- lifetime --------------------------------------------------------------------------

    async def start(self, config: Config, shares: dict[str, float] | None = None) -> Config:
        self._thread.start()
        try:
            self._runner = await self._thread.submit(functools.partial(self._setup_blocking, config, shares))
        except BaseException:
            await self._thread.stop()
            raise
        assert self._config is not None
        return self._config

    def _setup_blocking(self, config: Config, shares: dict[str, float] | None) -> JobRunner:
        device = resolve_device_blocking(config.device)
        configure_torch_blocking(device)
        self.device = device
        self._card = _card_blocking(device)
        self._config = auto_placement_blocking(config, device, shares)
        runner = self._factory(self._config, device, resolve_dtype(device, self._config.cuda_dtype))
        budget = getattr(runner.residency, "gpu_budget_bytes", None)  # stand-in runners (bench) have none
        self._budget = budget() if budget is not None else None
        self._fits = frozenset(m for m in self._config.models if fits_blocking(runner, self._config, m, self._budget))
        return runner

    async def stop(self) -> None:
        """Unload everything, free the chat LLMs, end the thread (the job in progress, if any,
        was told to stop by its cancel flag and finishes its step first)."""
        if self._stopped:
            return
        self._stopped = True
        for cancel in list(self._cancels.values()):
            cancel.set()
        try:
            if self._runner is not None:
                await self._thread.submit(self._runner.residency.unload_all_blocking)
            llms = self._llms or getattr(self._runner, "llms", None)
            if llms is not None:
                await self._thread.submit(llms.release_all_blocking)
        finally:
            await self._thread.stop()

    # -- jobs ------------------------------------------------------------------------------

    async def run(self, job_id: str, params: GenerationParams, *, nsfw_allowed: bool, cancel: threading.Event,
                  on_step: Callable[[int, int], None], on_attempt: Callable[[Attempt], None],
                  on_preview: PreviewCallback | None) -> RunOutput:
        runner = self._check_open()
        self._cancels[job_id] = cancel
        try:
            return await self._thread.submit(runner.run_blocking, job_id, params, on_step, cancel, nsfw_allowed,
                                             on_attempt, on_preview)
        finally:
            self._cancels.pop(job_id, None)

    def cancel(self, job_id: str) -> None:
        cancel = self._cancels.get(job_id)
        if cancel is not None:
            cancel.set()  # the step callback sees it on the GPU thread

    # -- admin, between jobs ---------------------------------------------------------------

    async def preload(self, model_id: str, *, pin: bool = False) -> float:
        runner = self._check_open()
        assert self._config is not None
        spec = self._config.model(model_id)
        return float(await self._thread.submit(functools.partial(runner.residency.preload_blocking, spec, pin=pin)))

    async def unload(self, model_id: str) -> bool:
        runner = self._check_open()
        return bool(await self._thread.submit(runner.residency.unload_blocking, model_id))

    async def pin(self, model_id: str, pinned: bool = True) -> None:
        runner = self._check_open()
        await self._thread.submit(runner.residency.pin_blocking, model_id, pinned)

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return self._thread.submit(fn, *args)

    async def with_llm(self, llm_id: str, fn: Callable[..., T], *args: Any) -> T:
        self._check_open()
        return await self._thread.submit(lambda: fn(self.chat_llm_blocking(llm_id), *args))

    def chat_llm_blocking(self, model_id: str) -> ChatLLM:
        """On this worker's thread: a chat LLM from the runner's cache (the safety rewriter's), or
        one of our own when the runner has none (the router's LLM shares the GPU with the jobs)."""
        if self._llms is None:
            self._llms = getattr(self._runner, "llms", None) or LLMCache(
                self.device, resolve_dtype(self.device, self._config.cuda_dtype if self._config else "bfloat16"))
        return self._llms.get_blocking(model_id)

    def _check_open(self) -> JobRunner:
        if self._stopped or self._runner is None:
            raise EngineClosedError("admin")
        return self._runner


def fits_blocking(runner: JobRunner, config: Config, model_id: str, budget: int | None) -> bool:
    """Whether a model can run on this card: no budget (CPU), an offload placement (it streams
    through the card), its size unknown (the load tells), or its expected size within the budget."""
    spec = config.model(model_id)
    if budget is None or spec.offload != "none":
        return True
    expected = getattr(runner.residency, "expected_device_bytes", None)
    need = expected(spec) if expected is not None else None
    return need is None or need <= budget


def _card_blocking(device: Any) -> str:
    """"NVIDIA H200, 139.8 GiB" on CUDA; the device type otherwise."""
    if getattr(device, "type", "") == "cuda":
        import torch

        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
    return str(getattr(device, "type", device))
