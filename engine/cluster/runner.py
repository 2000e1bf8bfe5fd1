"""What the GPU thread does for one job (``JobRunner.run_blocking``), in numbered steps: make the
model resident, generate, check (the safety loop may rewrite, retry or fall back), encode the PNG.

Everything here runs on a worker's GPU thread (local.py; inside a Ray actor for ray_worker.py); the
dispatcher (engine/core/dispatch.py) hands it over and awaits it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import Config
from engine.images import encode_png
from engine.jobs import GenerationParams
from engine.llm import LLMCache
from engine.pipelines import LoadedPipeline, PreviewCallback, generate_blocking, preview_callback
from engine.residency import ResidencyManager, TorchOps
from engine.safety import Attempt, SafetyPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunOutput:
    png: bytes
    width: int
    height: int
    load_s: float  # every attempt together
    generate_s: float
    params: GenerationParams | None = None  # what made the image; the safety loop may have changed it
    attempts: tuple[Attempt, ...] = ()
    notice: str = ""  # a sentence for the user when the prompt or the model was changed


class JobRunner:
    """What the GPU thread does for one job. Holds the residency manager and the safety policy
    (GPU-thread state). Without a policy given, one is built from ``config.safety`` with the
    rewrite LLM taken from ``llms`` (the router's shared cache; none: the sanitiser only)."""

    def __init__(self, config: Config, residency: ResidencyManager, *, safety: SafetyPolicy | None = None,
                 llms: LLMCache | None = None) -> None:
        self._config = config
        self.residency = residency
        self.llms = llms  # the chat LLM cache the router and the safety rewriter share
        self.safety = safety or SafetyPolicy.from_config(config.safety, config.models, llms=llms,
                                                         llm_source=config.rewrite_llm_id)

    def run_blocking(self, job_id: str, params: GenerationParams, on_step: Callable[[int, int], None],
                     cancel: threading.Event, nsfw_allowed: bool = False,
                     on_attempt: Callable[[Attempt], None] | None = None,
                     on_preview: PreviewCallback | None = None) -> RunOutput:
        spent = {"load": 0.0, "generate": 0.0}

        def generate(p: GenerationParams) -> Any:  # one attempt; the policy may call it again
            spec = self._config.model(p.model_id)
            # 1. make the model resident: evicts by the cost rule (what the queue needs soon stays);
            #    a load that runs out of memory evicts the others and retries once
            loaded, load_s = self.residency.acquire_blocking(spec)
            spent["load"] += load_s
            # 2. generate; out of memory is recovered by phase (engine/residency/)
            started = time.perf_counter()
            # each attempt starts with previews on again; under "checked" each one is checked first
            previews = preview_callback(self._config.previews, on_preview, nsfw_allowed=nsfw_allowed, job_id=job_id,
                                        check=lambda picture: self.safety.preview_problem_blocking(
                                            picture, nsfw_allowed=nsfw_allowed))
            try:
                return self._generate_blocking(job_id, loaded, p, on_step, cancel, previews)
            finally:
                spent["generate"] += time.perf_counter() - started

        def tell(attempt: Attempt) -> None:
            if attempt.outcome is not None:
                log.info("job %s: attempt %d on %s %s (%s)%s", job_id, attempt.n, attempt.model_id, attempt.outcome,
                         attempt.action, f": {attempt.problem}" if attempt.problem else "")
            if on_attempt is not None:
                on_attempt(attempt)

        # 3. check; flagged or black -> rewrite, retry, fall back, or refuse (ImageRefusedError)
        outcome = self.safety.run_blocking(params, generate, nsfw_allowed=nsfw_allowed, on_attempt=tell)
        # 4. encode with the parameters that made it embedded
        final, image = outcome.params, outcome.image
        png = encode_png(image, final, self._config.model(final.model_id).display_name)
        return RunOutput(png, image.width, image.height, spent["load"], spent["generate"], final,
                         outcome.attempts, outcome.notice)

    def _generate_blocking(self, job_id: str, loaded: LoadedPipeline, params: GenerationParams,
                           on_step: Callable[[int, int], None], cancel: threading.Event,
                           on_preview: PreviewCallback | None = None) -> Any:
        """Out of memory in the VAE decode: again with tiled decoding; while denoising: free the
        other models and retry, then CPU offload and retry (ResidencyManager decides)."""
        previews = self._config.previews
        return self.residency.run_with_recovery_blocking(loaded.spec, lambda ready, tiled: generate_blocking(
            ready, params, on_step=on_step, cancel=cancel, tiled_decode=tiled, on_preview=on_preview,
            previews=previews), job_id=job_id)


def default_runner_blocking(config: Config, device: Any, dtype: Any) -> JobRunner:
    """The production runner (GPU thread): residency, the shared chat LLM cache, the safety policy
    with its detectors loaded now, so a missing NudeNet stops start-up instead of the first job."""
    quant_cache = config.data_dir / "quantised" if config.residency.quantised_cache else None
    residency = ResidencyManager(device, dtype, settings=config.residency, ops=TorchOps(device, quant_cache=quant_cache))
    runner = JobRunner(config, residency, llms=LLMCache(device, dtype))
    runner.safety.preload_blocking()
    return runner
