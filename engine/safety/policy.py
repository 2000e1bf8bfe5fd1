"""The safety loop for one job: check the prompt, generate, check the image, then post, rewrite and
retry, fall back to another model, or refuse with a sentence that says why.

It runs on the GPU thread inside ``JobRunner.run_blocking``; ``generate`` is the runner's closure
(make the model resident, run the pipeline). A flagged image never leaves ``run_blocking``: the
outcome holds only an image that passed, and a refusal holds none. Every generation becomes one
plain ``Attempt``, reported live through ``on_attempt`` (once when it starts, once when it ends)
and returned in the outcome or the refusal, so the caller can write the attempts table.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.config import ModelSpec, SafetyConfig
from engine.jobs import GenerationParams
from engine.safety.detectors import (
    BlackImageDetector,
    Detector,
    NudeModel,
    NudeNetDetector,
    PipelineFlagDetector,
    PromptCheck,
    PromptFinding,
    Verdict,
    load_nudenet_blocking,
)
from engine.safety.attempts import Attempt
from engine.safety.errors import BlankImageError, ImageRefusedError, NonFiniteError, UnsafeContentError
from engine.safety.rewrite import ChatModels, PromptRewriter

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1
_SIDE_MULTIPLE = 16  # valid for every family (engine.core.normalise.SIZE_MULTIPLE): a fallback keeps a legal size
_NEGATIVE_NSFW = "nudity, nsfw"


@dataclass(frozen=True, slots=True)
class Generated:
    """What ``generate`` may return instead of a bare image: the image and the pipeline's output."""

    image: Any
    pipeline_output: Any = None


@dataclass(frozen=True, slots=True)
class SafetyOutcome:
    image: Any  # passed every check (NSFW ones skipped where the channel allows)
    params: GenerationParams  # what made it: prompt, seed and model may differ from the request
    attempts: tuple[Attempt, ...]
    notice: str = ""  # a sentence for the user when the prompt or the model was changed


AttemptCallback = Callable[[Attempt], None]


class SafetyPolicy:
    """Build with ``SafetyPolicy.from_config``; call ``run_blocking`` once per job (GPU thread)."""

    def __init__(self, config: SafetyConfig, *, models: Mapping[str, ModelSpec], prompt_check: PromptCheck,
                 detectors: Sequence[Detector], rewriter: PromptRewriter) -> None:
        self._config, self._models = config, models
        self._check, self._rewriter = prompt_check, rewriter
        self._detectors = tuple(detectors)
        # "black" is also the verdict for NaN latents (no image to give a detector)
        self._kind = {"black": "black", **{d.name: d.kind for d in self._detectors}}

    @classmethod
    def from_config(cls, config: SafetyConfig, models: Mapping[str, ModelSpec], *, llms: ChatModels | None = None,
                    llm_source: str = "", nudenet_loader: Callable[[], NudeModel] = load_nudenet_blocking,
                    ) -> SafetyPolicy:
        """``llms`` is the engine's shared ``LLMCache`` and ``llm_source`` the config's rewrite_llm_id."""
        check = PromptCheck(config.blocked_terms, config.drug_terms, config.minor_terms)
        detectors: list[Detector] = [BlackImageDetector(
            dark_level=config.dark_level, dark_fraction=config.dark_fraction, blank_max_std=config.blank_max_std)]
        if config.nudenet_enabled:
            detectors.append(NudeNetDetector(config.nudenet_thresholds, loader=nudenet_loader))
        detectors.append(PipelineFlagDetector())
        rewriter = PromptRewriter(
            check, llms=llms if config.use_llm else None, llm_source=llm_source, replacements=config.replacements,
            blocked_terms=config.blocked_terms, max_chars=config.rewrite_max_chars,
            max_new_tokens=config.rewrite_max_new_tokens, timeout_s=config.rewrite_timeout_s)
        return cls(config, models=models, prompt_check=check, detectors=detectors, rewriter=rewriter)

    def preload_blocking(self) -> None:
        """Load the detectors' models now (start-up), so a missing one stops the bot, not a job."""
        for detector in self._detectors:
            load = getattr(detector, "load_blocking", None)
            if load is not None:
                load()

    def preview_problem_blocking(self, image: Any, *, nsfw_allowed: bool = False) -> str | None:
        """The loop's image rule on a preview picture: ``"black"`` in any channel, ``"nsfw"`` unless
        the channel allows it, else ``None``. Where NSFW is allowed the NSFW detectors do not run
        at all; with ``[safety] enabled = false`` nothing runs, as for the final image."""
        if not self._config.enabled:
            return None
        verdicts = {d.name: d.check_blocking(image) for d in self._detectors
                    if not (nsfw_allowed and d.kind == "nsfw")}
        return self._problem(verdicts, nsfw_allowed)

    # -- the loop --------------------------------------------------------------------------

    def run_blocking(self, params: GenerationParams, generate: Callable[[GenerationParams], Any], *,
                     nsfw_allowed: bool = False, on_attempt: AttemptCallback | None = None) -> SafetyOutcome:
        if not self._config.enabled:
            return self._unchecked(params, generate, on_attempt)
        # 1. the prompt, before any GPU time: refuse, rewrite, or keep
        current, first_note, prompt_verdict = self._precheck(params, nsfw_allowed)
        attempts: list[Attempt] = []
        for n in range(1, self._config.max_attempts + 1):
            # 2. generate and check
            attempt = Attempt(n, current.model_id, current.prompt, current.seed, time.time(),
                              note=first_note if n == 1 else "")
            _tell(on_attempt, attempt)
            image, verdicts = self._generate_and_check(current, generate)
            if prompt_verdict is not None and n == 1:
                verdicts = {"prompt": prompt_verdict, **verdicts}
            problem = self._problem(verdicts, nsfw_allowed)
            if problem is None:
                attempts.append(self._end(attempt, on_attempt, "succeeded", verdicts, None, "posted"))
                return SafetyOutcome(image, current, tuple(attempts), self._notice(params, current))
            # 3. flagged: the image goes no further
            del image
            log.info("safety: attempt %d on %s flagged %s (%s)", n, current.model_id, problem,
                     "; ".join(f"{v.detector}: {v.detail}" for v in verdicts.values() if v.flagged))
            if n == self._config.max_attempts:
                attempts.append(self._end(attempt, on_attempt, "failed", verdicts, problem, "refused"))
                raise self._refusal(problem, attempts)
            # 4. retry: fall back to another model, or rewrite the prompt with a new seed
            try:
                following, action = self._next(params, current, problem, n, attempts, nsfw_allowed)
            except ImageRefusedError as refusal:
                attempts.append(self._end(attempt, on_attempt, "failed", verdicts, problem, "refused"))
                refusal.attempts = tuple(attempts)
                raise
            attempts.append(self._end(attempt, on_attempt, "retried", verdicts, problem, action))
            current = following
        raise AssertionError("unreachable: max_attempts >= 1")  # pragma: no cover

    # -- steps -----------------------------------------------------------------------------

    def _precheck(self, params: GenerationParams, nsfw_allowed: bool) -> tuple[GenerationParams, str, Verdict | None]:
        if not self._config.prompt_check:
            return params, "", None
        finding = self._check.check(params.prompt)
        if finding.refuse:
            raise UnsafeContentError("prompt", _minors_refusal(finding))
        if not finding.verdict.flagged:
            return params, "", finding.verdict
        if nsfw_allowed:  # an adult channel: the prompt runs as written, the image checks still record
            return params, f"prompt flagged ({finding.verdict.detail}); kept: NSFW allowed here", finding.verdict
        rewrite = self._rewriter.rewrite_blocking(params.prompt, reason="prompt")
        if not rewrite.prompt:
            raise UnsafeContentError("prompt", f"Your prompt was refused: without the words that are not allowed "
                                               f"here ({', '.join(finding.terms)}) nothing is left to draw. "
                                               "Nothing was generated.")
        note = f"prompt flagged ({finding.verdict.detail}); rewritten by {rewrite.method}"
        return dataclasses.replace(params, prompt=rewrite.prompt), note, finding.verdict

    def _generate_and_check(self, params: GenerationParams,
                            generate: Callable[[GenerationParams], Any]) -> tuple[Any, dict[str, Verdict]]:
        try:
            produced = generate(params)
        except NonFiniteError as exc:  # stopped at the step it broke: there is no image to check
            return None, {"black": Verdict("black", True, 1.0, f"NaN/Inf in the {exc.where}")}
        image, output = produced, None
        if isinstance(produced, Generated):
            image, output = produced.image, produced.pipeline_output
        return image, {d.name: d.check_blocking(image, pipeline_output=output) for d in self._detectors}

    def _problem(self, verdicts: Mapping[str, Verdict], nsfw_allowed: bool) -> str | None:
        kinds = {self._kind.get(name) for name, v in verdicts.items() if v.flagged}
        if "black" in kinds:
            return "black"  # never skipped: a black square helps nobody, in any channel
        if "nsfw" in kinds and not nsfw_allowed:
            return "nsfw"
        return None

    def _next(self, original: GenerationParams, current: GenerationParams, problem: str, n: int,
              attempts: Sequence[Attempt], nsfw_allowed: bool) -> tuple[GenerationParams, str]:
        seed = (original.seed + n) % (MAX_SEED + 1)
        if self._should_fall_back(current, problem, n, attempts):
            return self._fallback(original, current, seed, nsfw_allowed), f"fell back to {self._config.fallback_model}"
        if nsfw_allowed:  # a black image in an adult channel: same prompt, new seed (no "make it safe")
            return dataclasses.replace(current, seed=seed), "new seed"
        rewrite = self._rewriter.rewrite_blocking(current.prompt, reason=problem)
        prompt = rewrite.prompt or (current.prompt if problem == "black" else "")
        if not prompt:
            raise UnsafeContentError("nsfw", "Nothing was posted: the image was flagged as not safe for work, "
                                             "and without the flagged words nothing is left to draw.")
        negative = _with_nsfw_negative(current.negative_prompt) if problem == "nsfw" else current.negative_prompt
        following = dataclasses.replace(current, prompt=prompt, negative_prompt=negative, seed=seed)
        return following, f"rewrote the prompt ({rewrite.method})" if prompt != current.prompt else "new seed"

    def _should_fall_back(self, current: GenerationParams, problem: str, n: int, attempts: Sequence[Attempt]) -> bool:
        """Black again on a fallback family (or no attempt left for a second try): switch models."""
        target = self._config.fallback_model
        if problem != "black" or current.model_id == target or target not in self._models:
            return False
        if self._models[current.model_id].family not in self._config.fallback_families:
            return False
        blacks_here = 1 + sum(a.model_id == current.model_id and a.problem == "black" for a in attempts)
        return blacks_here >= 2 or n + 1 == self._config.max_attempts

    def _fallback(self, original: GenerationParams, current: GenerationParams, seed: int,
                  nsfw_allowed: bool) -> GenerationParams:
        target = self._models[self._config.fallback_model]
        prompt = current.prompt
        if prompt == original.prompt and not nsfw_allowed:  # nothing rewritten yet: "with the rewritten prompt"
            prompt = self._rewriter.rewrite_blocking(prompt, reason="black").prompt or prompt
        source = self._models[current.model_id]
        # The old model's defaults become the new one's; values the user chose are kept.
        steps = target.steps if current.steps == source.steps else current.steps
        guidance = target.guidance if current.guidance == source.guidance else current.guidance
        return dataclasses.replace(
            current, model_id=target.id, prompt=prompt, seed=seed, steps=steps, guidance=guidance,
            width=_legal_side(current.width), height=_legal_side(current.height),
            route_reason=f"{target.display_name}: {source.display_name} kept returning black images")

    def _unchecked(self, params: GenerationParams, generate: Callable[[GenerationParams], Any],
                   on_attempt: AttemptCallback | None) -> SafetyOutcome:
        attempt = Attempt(1, params.model_id, params.prompt, params.seed, time.time(), note="safety disabled")
        _tell(on_attempt, attempt)
        produced = generate(params)
        image = produced.image if isinstance(produced, Generated) else produced
        done = self._end(attempt, on_attempt, "succeeded", {}, None, "posted")
        return SafetyOutcome(image, params, (done,))

    # -- records and sentences -------------------------------------------------------------

    @staticmethod
    def _end(attempt: Attempt, on_attempt: AttemptCallback | None, outcome: str, verdicts: Mapping[str, Verdict],
             problem: str | None, action: str) -> Attempt:
        done = dataclasses.replace(attempt, finished_at=time.time(), outcome=outcome, verdicts=dict(verdicts),
                                   problem=problem, action=action)
        _tell(on_attempt, done)
        return done

    def _refusal(self, problem: str, attempts: Sequence[Attempt]) -> ImageRefusedError:
        tried = len(attempts)
        if problem == "nsfw":
            flagged = [v for a in attempts for v in a.verdicts.values()
                       if v.flagged and self._kind.get(v.detector) == "nsfw"]
            worst = max(flagged, key=lambda v: v.score or 0.0)
            return UnsafeContentError("nsfw", f"Nothing was posted: the image check flagged the result as not safe "
                                              f"for work on all {tried} attempts ({worst.detail}), even with a "
                                              "rewritten prompt. Please try a different prompt.", attempts)
        names = list(dict.fromkeys(self._models[a.model_id].display_name for a in attempts))
        return BlankImageError(f"Nothing was posted: {' and '.join(names)} returned black or blank images on all "
                               f"{tried} attempts, even with a rewritten prompt. Please try again or rephrase.",
                               attempts)

    def _notice(self, original: GenerationParams, final: GenerationParams) -> str:
        parts = []
        if final.model_id != original.model_id:
            parts.append(f"{self._models[original.model_id].display_name} kept returning black images, so "
                         f"{self._models[final.model_id].display_name} made this one.")
        if final.prompt != original.prompt:
            parts.append(f"Your prompt was rewritten for safety: “{final.prompt}”.")
        return " ".join(parts)


def _tell(on_attempt: AttemptCallback | None, attempt: Attempt) -> None:
    if on_attempt is not None:
        on_attempt(attempt)


def _minors_refusal(finding: PromptFinding) -> str:
    return (f"Your prompt was refused: it pairs words that are not allowed here ({', '.join(finding.terms)}) "
            f"with words about minors ({', '.join(finding.minor_terms)}). Nothing was generated.")


def _with_nsfw_negative(negative: str) -> str:
    if _NEGATIVE_NSFW in negative:
        return negative
    return f"{negative}, {_NEGATIVE_NSFW}" if negative else _NEGATIVE_NSFW


def _legal_side(side: int) -> int:
    return max(side - side % _SIDE_MULTIPLE, _SIDE_MULTIPLE)

