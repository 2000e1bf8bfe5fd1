"""The safety loop: detectors, prompt rewriting and the retry/fallback/refuse policy.

    detectors.py    Verdict, the Detector protocol, black/NaN, NudeNet, the pipeline's own flag,
                    and the prompt check (term lists, word-boundary aware; room for a classifier)
    rewrite.py      PromptRewriter: the shared chat LLM, validated, else a deterministic sanitiser
    prevention.py   float32 VAE decode under float16, NaN/Inf guards (called from engine.pipelines)
    attempts.py     Attempt: one generation, as the loop, its errors and the history see it
    policy.py       SafetyPolicy.run_blocking: generate -> check -> post / rewrite / fall back / refuse
    errors.py       ImageRefusedError (UnsafeContentError, BlankImageError) and NonFiniteError

SafetyConfig (the [safety] table) lives in engine.config with every other settings class.
Importing this package loads neither torch nor NudeNet; both are loaded on the GPU thread.
"""

from engine.safety.detectors import (
    BlackImageDetector,
    Detector,
    NudeNetDetector,
    PipelineFlagDetector,
    PromptCheck,
    PromptFinding,
    Verdict,
)
from engine.safety.errors import BlankImageError, ImageRefusedError, NonFiniteError, UnsafeContentError
from engine.safety.attempts import Attempt
from engine.safety.policy import Generated, SafetyOutcome, SafetyPolicy
from engine.safety.prevention import check_latents_blocking, guard_vae_decode_blocking
from engine.safety.rewrite import PromptRewriter, Rewrite

__all__ = [
    "Attempt", "BlackImageDetector", "BlankImageError", "Detector", "Generated", "ImageRefusedError",
    "NonFiniteError", "NudeNetDetector", "PipelineFlagDetector", "PromptCheck", "PromptFinding", "PromptRewriter",
    "Rewrite", "SafetyOutcome", "SafetyPolicy", "UnsafeContentError", "Verdict",
    "check_latents_blocking", "guard_vae_decode_blocking",
]
