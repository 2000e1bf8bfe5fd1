"""Prompt -> model id, with a reason a user can read, a confidence and the stage that decided.

    explicit model   the user named one (core asks ``explicit_choice``, not the router)
    rules            regexes from config.toml [router.rules]         microseconds, on the loop
    embeddings       all-MiniLM-L6-v2 vs example prompts per model   a few ms, CPU, own thread
    llm              each model id scored as the chat answer          GPU thread, between jobs
    fallback         the embedding guess, else config.default_model

The first stage that is *sure* decides. A stage that is unsure leaves a guess; one that fails
or times out is skipped (a missing model is warned about once and then left off). The answer
is always a configured id: rules and examples are validated against the models at start-up,
and the LLM only ever scores the configured ids. See docs/ROUTER.md for the measurements.

Threads, and why (rule 1 of DESIGN.md: the loop never waits on torch):
- The embedding model is small (22M parameters) and runs on the CPU in a thread of its own
  (an ``engine.workers.WorkerThread``, one torch intra-op thread). Routing happens at submit
  time and must answer at once, while the GPU thread may be busy with a generation for a
  minute; a CPU encoder costs a few ms and never competes for GPU memory. It is a CPU-only
  torch object owned by exactly one thread, never moved to CUDA.
- The LLM (1.5B parameters) is too slow on the CPU (seconds) and so runs on the GPU thread via
  the injected ``run_on_gpu_thread`` (the GPU thread's ``WorkerThread.submit``): it is queued
  behind the job that is running and runs before the next one starts, so it never shares the GPU with a
generation. Its timeout counts the wait: when the GPU is busy for longer, the stage is
  skipped and the work item is marked abandoned, so the GPU thread drops it unrun.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from engine.config import Config, RouterConfig
from engine.errors import EngineError, ModelLoadError
from engine.llm import ChatLLM, LLMCache
from engine.router.embeddings import (
    EmbeddingUnavailable,
    ExampleIndex,
    SentenceEncoder,
    fit_thresholds,
    limit_torch_threads,
    load_shared_encoder_blocking,
    shared_index_blocking,
)
from engine.router.llm_stage import score_blocking, system_prompt
from engine.router.rules import RuleBook
from engine.workers import WorkerThread

log = logging.getLogger(__name__)

T = TypeVar("T")
GpuRunner = Callable[..., Awaitable[Any]]  # run_on_gpu_thread(fn, *args) -> awaitable result
EncoderLoader = Callable[[str, int, str], SentenceEncoder]  # (source, max_tokens, dtype)

# Cosine similarities of MiniLM sit in a narrow band (0.2..0.8): dividing by this before the
# softmax turns a 0.05 lead into about e to one, which reads as a probability.
EMBEDDING_TEMPERATURE = 0.05
# How long closing waits for a thread's call in progress (an embedding, a load) to finish.
WORKER_STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class RouteDecision:
    model_id: str
    reason: str
    confidence: float
    stage: str  # "explicit", "rules", "embeddings", "llm", "default"
    scores: Mapping[str, float] = field(default_factory=dict)  # the deciding stage's probability per model
    timings_ms: Mapping[str, float] = field(default_factory=dict)  # per stage that ran


class Router(Protocol):
    async def route(self, prompt: str, *, resident: frozenset[str] = frozenset()) -> RouteDecision: ...


def default_decision(config: Config, timings_ms: Mapping[str, float] | None = None) -> RouteDecision:
    model = config.model(config.default_model)
    return RouteDecision(model.id, "the default model", 0.0, "default", timings_ms=dict(timings_ms or {}))


def explicit_choice(model_id: str, config: Config) -> RouteDecision:
    return RouteDecision(model_id, f"you chose {config.model(model_id).display_name}", 1.0, "explicit")


@dataclass(frozen=True, slots=True)
class _Answer:
    """One stage's answer: ``sure`` decides at once; otherwise it is kept as a guess."""

    model_id: str
    confidence: float
    why: str  # "text to render": the reason before " -> model"
    stage: str
    sure: bool
    scores: Mapping[str, float] = field(default_factory=dict)


def softmax(scores: Mapping[str, float], temperature: float = 1.0) -> dict[str, float]:
    """Scores (similarities, log-probabilities) -> probabilities per model that sum to 1."""
    top = max(scores.values())
    weights = {m: math.exp((s - top) / temperature) for m, s in scores.items()}
    total = sum(weights.values())
    return {m: w / total for m, w in weights.items()}


class CascadeRouter:
    """rules -> embeddings -> LLM -> guess -> default. ``aclose()`` when done (or ``async with``)."""

    def __init__(
        self,
        config: Config,
        settings: RouterConfig | None = None,
        *,
        run_on_gpu_thread: GpuRunner | None = None,
        llm: Callable[[], ChatLLM] | None = None,
        remote_llm: GpuRunner | None = None,
        encoder_loader: EncoderLoader | None = None,
        index_wait_s: float | None = None,
        learned: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self._config = config
        self._learned = dict(learned or {})  # `router learn`'s examples per model (learning.py)
        # how long a prompt waits for the embedded examples while they load: None, as long as
        # embedding_load_timeout_s (stand-alone `route`); the engine's router waits a moment
        # only, so the first prompts after start-up are never held up by the load
        self._index_wait_s = index_wait_s
        self.settings = settings if settings is not None else getattr(config, "router", None) or RouterConfig()
        self._rules = RuleBook(self.settings.rules)
        self._model_ids = tuple(config.models)
        self._system = system_prompt(list(config.models.values()), self.settings.llm_guidance)
        # embeddings: CPU, one thread of their own
        self._encoder_loader = encoder_loader or load_shared_encoder_blocking
        threads = self.settings.embedding_threads
        self._embed_thread = WorkerThread("promptpics-embed",
                                          on_start=(lambda: limit_torch_threads(threads)) if threads else None)
        self._index: ExampleIndex | None = None
        self._index_task: asyncio.Future[ExampleIndex] | None = None
        self._embeddings_off: str | None = None  # why the stage is off, once warned
        # LLM: the GPU thread when injected; else a thread (and an LLM cache) of our own
        self._run_on_gpu = run_on_gpu_thread
        self._llm_provider = llm
        # Ray workers: remote_llm(fn, *args) runs fn(llm, *args) on a GPU worker (docs/CLUSTER.md)
        self._remote_llm = remote_llm
        self._llm_thread: WorkerThread | None = None  # only when no GPU thread is injected
        self._own_llms: LLMCache | None = None
        self._llm_off: str | None = None

    async def __aenter__(self) -> CascadeRouter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the cascade -------------------------------------------------------------------------

    async def route(self, prompt: str, *, resident: frozenset[str] = frozenset()) -> RouteDecision:
        timings: dict[str, float] = {}
        guesses: list[_Answer] = []
        loading = False  # the embedding stage was skipped: its model is still loading
        for stage in self.settings.stages:
            started = time.perf_counter()
            answer = await self._run_stage(stage, prompt)
            timings[stage] = (time.perf_counter() - started) * 1000
            loading = loading or (stage == "embeddings" and self._index_loading())
            if answer is None:
                continue
            if answer.sure:
                return _noting_loading(self._decide(answer, resident, timings), loading)
            guesses.append(answer)
        if guesses:  # nobody was sure: the first guess in stage order (embeddings before the LLM)
            return _noting_loading(self._decide(guesses[0], resident, timings), loading)
        return _noting_loading(default_decision(self._config, timings), loading)

    def _index_loading(self) -> bool:
        return self._index is None and self._index_task is not None and not self._index_task.done() \
            and not self._embeddings_off

    async def _run_stage(self, stage: str, prompt: str) -> _Answer | None:
        try:
            if stage == "rules":
                return self._by_rules(prompt)
            if stage == "embeddings":
                return await self._by_embeddings(prompt)
            return await self._by_llm(prompt)
        except asyncio.CancelledError:
            raise
        except Exception:  # a stage's bug must not lose the user's job: skip to the next stage
            log.warning("router: the %s stage failed; skipped", stage, exc_info=True)
            return None

    def _decide(self, answer: _Answer, resident: frozenset[str], timings: dict[str, float]) -> RouteDecision:
        """A near tie goes to a model that is already loaded (no load, no eviction)."""
        chosen, why = answer.model_id, answer.why
        if answer.scores and chosen not in resident:
            tied = [m for m in resident if m in answer.scores
                    and answer.scores[chosen] - answer.scores[m] <= self.settings.near_tie]
            if tied:
                loaded = max(tied, key=lambda m: answer.scores[m])
                why = (f"{why}: {self._name(chosen)} and {self._name(loaded)} nearly tied, "
                       f"{self._name(loaded)} is already loaded")
                chosen = loaded
        if not answer.sure:
            why = f"{why} (a guess)"
        confidence = answer.scores.get(chosen, answer.confidence) if answer.scores else answer.confidence
        return RouteDecision(chosen, f"{why} -> {self._name(chosen)}", round(confidence, 3), answer.stage,
                             scores=dict(answer.scores), timings_ms=dict(timings))

    def _name(self, model_id: str) -> str:
        return self._config.model(model_id).display_name

    # -- stage 1: rules ----------------------------------------------------------------------

    def _by_rules(self, prompt: str) -> _Answer | None:
        rule = self._rules.match(prompt)
        if rule is None:
            return None
        return _Answer(rule.model, rule.confidence, rule.name, "rules", sure=True)

    # -- stage 2: embeddings -----------------------------------------------------------------

    async def _by_embeddings(self, prompt: str) -> _Answer | None:
        s = self.settings
        if not s.examples and not self._learned:
            return None
        index = await self._example_index()
        if index is None:
            return None
        try:
            scores = await asyncio.wait_for(self._in_embed_thread(index.scores_blocking, prompt), s.embedding_timeout_s)
        except TimeoutError:
            log.warning("router: the embedding stage took over %.2f s; skipped", s.embedding_timeout_s)
            return None
        ranked = sorted(scores, key=scores.__getitem__, reverse=True)
        best = ranked[0]
        if scores[best] < s.embedding_floor:
            return None
        margin = scores[best] - scores[ranked[1]] if len(ranked) > 1 else 1.0
        sure = scores[best] >= s.thresholds.get(best, 1.0) and margin >= s.embedding_margin
        probs = softmax(scores, EMBEDDING_TEMPERATURE)
        good_at = self._config.model(best).good_at.split(";")[0].strip() or best
        return _Answer(best, probs[best], f"like the examples of {good_at}", "embeddings", sure, probs)

    async def _example_index(self, *, full_wait: bool = False) -> ExampleIndex | None:
        """The embedded examples, built once on first use (or by ``warm_up``, which waits for
        them: ``full_wait``); None when unavailable or still loading."""
        if self._index is not None or self._embeddings_off:
            return self._index
        if self._index_task is None:
            self._index_task = asyncio.ensure_future(self._in_embed_thread(self._build_index_blocking))
        wait_s = self.settings.embedding_load_timeout_s if self._index_wait_s is None or full_wait \
            else min(self._index_wait_s, self.settings.embedding_load_timeout_s)
        try:
            self._index = await asyncio.wait_for(asyncio.shield(self._index_task), wait_s)
        except TimeoutError:
            log.info("router: the embedding model is still loading; this prompt skips the embedding stage")
        except Exception as exc:  # EmbeddingUnavailable, or a broken folder: warn once, then stay off
            self._switch_embeddings_off(exc)
        return self._index

    def _build_index_blocking(self) -> ExampleIndex:
        s = self.settings
        if self._encoder_loader is load_shared_encoder_blocking:  # the production encoder: shared by every router in the process
            return shared_index_blocking(s.embedding_model, s.embedding_max_tokens, s.embedding_dtype, tuple(s.examples.items()),
                                 s.embedding_top_k, tuple(self._learned.items()))
        encoder = self._encoder_loader(s.embedding_model, s.embedding_max_tokens, s.embedding_dtype)
        return ExampleIndex(encoder, dict(s.examples), s.embedding_top_k, self._learned)

    def _switch_embeddings_off(self, exc: BaseException) -> None:
        if self._embeddings_off:
            return
        self._embeddings_off = str(exc) if isinstance(exc, EmbeddingUnavailable) else type(exc).__name__
        log.warning("router: embedding stage off: %s; routing uses the other stages", self._embeddings_off,
                    exc_info=not isinstance(exc, EmbeddingUnavailable))

    def _in_embed_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return self._embed_thread.submit(fn, *args)

    # -- stage 3: the LLM --------------------------------------------------------------------

    async def _by_llm(self, prompt: str) -> _Answer | None:
        if self._llm_off:
            return None
        abandoned = threading.Event()

        def work() -> dict[str, float] | None:  # on the GPU thread
            if abandoned.is_set():  # the router gave up waiting: do not spend GPU time on it
                return None
            return score_blocking(self._router_llm_blocking(), self._system, prompt, self._model_ids)

        scoring = self._on_llm_thread(work) if self._remote_llm is None else \
            self._remote_llm(score_blocking, self._system, prompt, self._model_ids)
        try:
            log_probs = await asyncio.wait_for(scoring, self.settings.llm_timeout_s)
        except TimeoutError:
            abandoned.set()
            log.info("router: the LLM stage took over %.1f s (GPU busy or loading); skipped", self.settings.llm_timeout_s)
            return None
        except ModelLoadError as exc:
            self._switch_llm_off(exc)
            return None
        except Exception as exc:  # remote: no GPU worker up, lost during the call, ...: this prompt only
            if self._remote_llm is None:
                raise
            log.info("router: the LLM stage skipped (%s: %s)", type(exc).__name__, exc)
            return None
        if log_probs is None:
            return None
        probs = softmax(log_probs)  # each id's share of the probability the LLM gives the set
        best = max(probs, key=probs.__getitem__)
        sure = probs[best] >= self.settings.llm_min_confidence
        return _Answer(best, probs[best], "the router LLM's choice", "llm", sure, probs)

    def _router_llm_blocking(self) -> ChatLLM:
        if self._llm_provider is not None:
            return self._llm_provider()
        if self._own_llms is None:
            from engine.pipelines import resolve_device_blocking, resolve_dtype

            device = resolve_device_blocking(self._config.device)
            self._own_llms = LLMCache(device, resolve_dtype(device, self._config.cuda_dtype))
        return self._own_llms.get_blocking(self._config.router_llm_id)

    def _on_llm_thread(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        if self._run_on_gpu is not None:
            return self._run_on_gpu(fn, *args)
        if self._llm_thread is None:  # stand-alone (CLI, bench): a thread of our own plays the GPU thread
            self._llm_thread = WorkerThread("promptpics-router-llm")
        return self._llm_thread.submit(fn, *args)

    def _switch_llm_off(self, exc: BaseException) -> None:
        if self._llm_off:
            return
        self._llm_off = exc.user_message if isinstance(exc, ModelLoadError) else type(exc).__name__
        log.warning("router: LLM stage off: %s; routing uses the other stages", self._llm_off)
        log.debug("router: why the LLM could not be loaded", exc_info=exc)

    # -- lifetime ----------------------------------------------------------------------------

    async def warm_up(self) -> None:
        """Load the embedding model and the router LLM now rather than on the first prompt.

        Failures are warned about once and switch that stage off, as on first use."""
        if "embeddings" in self.settings.stages and self.settings.examples:
            await self._example_index(full_wait=True)
        if "llm" in self.settings.stages and not self._llm_off:
            try:
                if self._remote_llm is not None:
                    await self._remote_llm(_loaded)
                else:
                    await self._on_llm_thread(self._router_llm_blocking)
            except ModelLoadError as exc:
                self._switch_llm_off(exc)
            except EngineError as exc:  # no worker up yet: the first prompt loads it
                log.info("router: the LLM was not warmed up on a GPU worker (%s)", exc)
            except Exception as exc:
                self._switch_llm_off(exc)

    def use_learned(self, learned: Mapping[str, tuple[str, ...]], thresholds: Mapping[str, float]) -> None:
        """Route with these learned examples per model and thresholds from now on (``router learn``'s,
        at start); the examples are embedded again on the next prompt."""
        self._learned = dict(learned)
        self.settings = self.settings.model_copy(update={"thresholds": {**self.settings.thresholds, **thresholds}})
        self._index = self._index_task = None

    async def refit_thresholds(self, precision: float = 0.9) -> dict[str, float]:
        """The thresholds ``fit_thresholds`` gives by leave-one-out over this router's examples
        (as bench/router_fit.py does); empty when the embedding stage is off."""
        index = await self._example_index(full_wait=True)
        if index is None:
            return {}
        samples = await self._in_embed_thread(index.leave_one_out_blocking)
        return fit_thresholds(samples, precision=precision)

    @property
    def stages_off(self) -> dict[str, str]:
        """Stages switched off after a failure, with the reason (for status output)."""
        off = {"embeddings": self._embeddings_off, "llm": self._llm_off}
        return {stage: why for stage, why in off.items() if why}

    async def aclose(self) -> None:
        """Free our own LLM (an injected one belongs to the engine) and stop our threads, after
        the call each is running (a load, an embedding) has finished."""
        if self._own_llms is not None and self._llm_thread is not None:
            self._llm_thread.submit(self._own_llms.release_all_blocking)
        for worker in (self._embed_thread, self._llm_thread):
            if worker is not None:
                await worker.stop(timeout_s=WORKER_STOP_TIMEOUT_S)


ENGINE_INDEX_WAIT_S = 0.25  # the most a submit waits for the embedding model to finish loading


def _loaded(llm: ChatLLM) -> None:
    """Warm-up on a GPU worker: getting the LLM there loaded it."""


def build_router(config: Config, *, run_on_gpu_thread: GpuRunner | None = None,
                 llm: Callable[[], ChatLLM] | None = None, remote_llm: GpuRunner | None = None) -> Router:
    """The router the engine uses: the cascade from ``config.router``. Until the embedding
    model has loaded (the bot warms it up in the background at start), prompts skip that
    stage after at most ``ENGINE_INDEX_WAIT_S``, and their reason says so."""
    return CascadeRouter(config, run_on_gpu_thread=run_on_gpu_thread, llm=llm, remote_llm=remote_llm,
                         index_wait_s=ENGINE_INDEX_WAIT_S)


def _noting_loading(decision: RouteDecision, loading: bool) -> RouteDecision:
    if not loading:
        return decision
    return dataclasses.replace(decision, reason=f"{decision.reason} (the embedding stage was skipped: still loading)")
