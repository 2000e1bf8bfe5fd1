"""Detectors: the prompt check (before any GPU time) and the image checks behind one Protocol.

Each image detector answers one ``Verdict`` per image; its ``kind`` tells the policy which rule a
flag triggers: ``"black"`` (never skipped; may fall back to another model) or ``"nsfw"`` (skipped
in NSFW-allowed channels). The verdicts go to the attempts table as they are.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from engine.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One detector's answer. ``score`` is 0..1, higher is worse; ``None`` when not measured."""

    detector: str
    flagged: bool
    score: float | None
    detail: str = ""


class Detector(Protocol):
    name: str
    kind: str  # "black" or "nsfw"

    def check_blocking(self, image: Any, *, pipeline_output: Any = None) -> Verdict: ...


# -- pixels ----------------------------------------------------------------------------------


def has_nonfinite(image: Any) -> bool:
    """True when a float array holds NaN or Inf (a PIL image never can: its pixels are integers)."""
    import numpy as np

    if isinstance(image, np.ndarray) and image.dtype.kind == "f":
        return not bool(np.isfinite(image).all())
    return False


def rgb_array(image: Any) -> Any:
    """A PIL image or an HxW[xC] array (uint8, or float in 0..1) as an HxWx3 uint8 RGB array.
    NaN and Inf become 0, as diffusers' own float -> uint8 conversion makes them."""
    import numpy as np

    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"an image must be a PIL image or a numpy array, not {type(image).__name__}")
    pixels = image
    if pixels.dtype.kind == "f":
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=0.0, neginf=0.0)
        pixels = np.clip(pixels * 255.0 if pixels.max(initial=0.0) <= 1.0 else pixels, 0, 255).round()
    pixels = pixels.astype(np.uint8, copy=False)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise TypeError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, not {pixels.shape}")
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])


# -- black, blank or NaN ---------------------------------------------------------------------


class BlackImageDetector:
    """Near-all-dark output (fp16 VAE overflow decodes to 0), NaN/Inf pixels, and optionally
    near-constant images of any colour (``blank_max_std`` > 0). Plain numpy; a few ms at 768 px."""

    name = "black"
    kind = "black"

    def __init__(self, *, dark_level: int = 10, dark_fraction: float = 0.98, blank_max_std: float = 0.0) -> None:
        self._dark_level, self._dark_fraction, self._blank_max_std = dark_level, dark_fraction, blank_max_std

    def check_blocking(self, image: Any, *, pipeline_output: Any = None) -> Verdict:
        import numpy as np

        if has_nonfinite(image):
            return Verdict(self.name, True, 1.0, "NaN/Inf pixels")
        pixels = rgb_array(image)
        # Rec. 601 luma on a 2x2 subsample: the same answer for a black frame, a quarter the work.
        luma = pixels[::2, ::2].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        dark = float((luma <= self._dark_level).mean())
        std = float(luma.std())
        if dark >= self._dark_fraction:
            return Verdict(self.name, True, dark, f"{dark:.1%} of pixels dark (<= {self._dark_level})")
        if std < self._blank_max_std:
            return Verdict(self.name, True, 1.0, f"near-constant image (std {std:.2f} < {self._blank_max_std:g})")
        return Verdict(self.name, False, dark, f"{dark:.1%} dark, std {std:.1f}")


# -- NudeNet ---------------------------------------------------------------------------------


class NudeModel(Protocol):
    """What ``nudenet.NudeDetector`` offers: detections as {"class", "score", "box"} dicts."""

    def detect(self, image: Any) -> list[dict[str, Any]]: ...


def load_nudenet_blocking() -> NudeModel:
    """The ONNX model shipped inside the ``nudenet`` wheel: nothing is downloaded. One copy per
    process (an onnxruntime session is read-only and safe to share), so engines started again
    in one process do not load it again."""
    return _shared_nudenet(4)


@functools.cache
def _shared_nudenet(threads: int) -> NudeModel:
    # The session is rebuilt with spinning off: onnxruntime's idle workers otherwise busy-wait
    # after each image and take CPU time from the pipeline that runs next.
    try:
        import nudenet
        import onnxruntime
    except ImportError as exc:
        raise ConfigError("safety.nudenet.enabled", True,
                          "the `nudenet` package is not installed (pip install nudenet), or set it to false") from exc
    detector = nudenet.NudeDetector()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, min(threads, os.cpu_count() or 1))
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model_path = os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx")
    detector.onnx_session = onnxruntime.InferenceSession(model_path, sess_options=options,
                                                         providers=["CPUExecutionProvider"])
    return detector


class NudeNetDetector:
    """NudeNet 3.x (YOLOv8n, 320 px): flags when any configured class reaches its threshold."""

    name = "nsfw"
    kind = "nsfw"

    def __init__(self, thresholds: Mapping[str, float], *,
                 loader: Callable[[], NudeModel] = load_nudenet_blocking) -> None:
        self._thresholds = dict(thresholds)
        self._loader = loader
        self._model: NudeModel | None = None

    def load_blocking(self) -> None:
        """Load now (start-up), so a missing package stops the bot instead of the first job."""
        if self._model is None:
            started = time.perf_counter()
            self._model = self._loader()
            log.info("safety: NudeNet loaded in %.2f s", time.perf_counter() - started)

    def check_blocking(self, image: Any, *, pipeline_output: Any = None) -> Verdict:
        self.load_blocking()
        assert self._model is not None
        # An RGB array: nudenet swaps channels twice on this path, so the model sees RGB as trained.
        detections = self._model.detect(rgb_array(image))
        scores: dict[str, float] = {}
        for d in detections:
            if d["class"] in self._thresholds:
                scores[d["class"]] = max(scores.get(d["class"], 0.0), float(d["score"]))
        hits = {c: s for c, s in scores.items() if s >= self._thresholds[c]}
        shown = hits or scores
        detail = ", ".join(f"{c} {s:.2f}" for c, s in sorted(shown.items(), key=lambda kv: -kv[1])) or "nothing found"
        return Verdict(self.name, bool(hits), max(scores.values(), default=0.0), detail)


# -- the pipeline's own checker ----------------------------------------------------------------


class PipelineFlagDetector:
    """A pipeline output's ``nsfw_content_detected`` when it has one (none of our four does;
    an SD 1.x-style pipeline with a safety checker would)."""

    name = "pipeline_nsfw"
    kind = "nsfw"

    def check_blocking(self, image: Any, *, pipeline_output: Any = None) -> Verdict:
        flags = getattr(pipeline_output, "nsfw_content_detected", None)
        if flags is None:
            return Verdict(self.name, False, None, "not reported by the pipeline")
        flagged = bool(flags[0]) if isinstance(flags, list | tuple) else bool(flags)
        return Verdict(self.name, flagged, 1.0 if flagged else 0.0, "the pipeline's own safety checker")


# -- the prompt check ------------------------------------------------------------------------


class PromptClassifier(Protocol):
    """Room for a learned prompt classifier beside the term lists: 0..1, higher is worse."""

    def score_blocking(self, prompt: str) -> float: ...


@dataclass(frozen=True, slots=True)
class PromptFinding:
    verdict: Verdict
    terms: tuple[str, ...]  # flagged words as written in the prompt
    refuse: bool  # a blocked term together with a minor term: never generated, never rewritten
    minor_terms: tuple[str, ...] = ()


_WORD = r"[^\W_]"  # a letter or digit: "_" and "-" separate words here ("nude_art" holds "nude")


def term_pattern(terms: Iterable[str]) -> re.Pattern[str] | None:
    """One case-insensitive regex for whole-word matches of ``terms`` (a trailing * = any ending)."""
    parts = []
    for term in sorted(set(terms), key=len, reverse=True):
        words = term.rstrip("*").split()
        body = r"[\s_-]+".join(re.escape(w) for w in words) + (f"{_WORD}*" if term.endswith("*") else "")
        parts.append(body)
    if not parts:
        return None
    return re.compile(rf"(?<!{_WORD})(?:{'|'.join(parts)})(?!{_WORD})", re.IGNORECASE)


def normalise_text(text: str) -> str:
    """NFKC folds look-alike forms (full-width letters, ligatures) into plain ones before matching."""
    return unicodedata.normalize("NFKC", text)


class PromptCheck:
    """Term lists, word-boundary aware, plus an optional classifier. Microseconds, no GPU."""

    name = "prompt"

    def __init__(self, blocked_terms: Iterable[str], drug_terms: Iterable[str] = (),
                 minor_terms: Iterable[str] = (), *, classifier: PromptClassifier | None = None,
                 classifier_threshold: float = 0.5) -> None:
        self.flagged_pattern = term_pattern([*blocked_terms, *drug_terms])
        self._blocked = term_pattern(blocked_terms)
        self._minors = term_pattern(minor_terms)
        self._classifier, self._classifier_threshold = classifier, classifier_threshold

    def check(self, prompt: str) -> PromptFinding:
        text = normalise_text(prompt)
        terms = _found(self.flagged_pattern, text)
        score = 1.0 if terms else 0.0
        if self._classifier is not None:
            score = max(score, float(self._classifier.score_blocking(text)))
        flagged = bool(terms) or score >= self._classifier_threshold
        minors = _found(self._minors, text) if _found(self._blocked, text) else ()
        refuse = bool(minors)
        detail = f"matched: {', '.join(terms)}" if terms else ("classifier" if flagged else "")
        if refuse:
            detail += f"; with: {', '.join(minors)}"
        return PromptFinding(Verdict(self.name, flagged, score, detail), terms, refuse, minors)


def _found(pattern: re.Pattern[str] | None, text: str) -> tuple[str, ...]:
    if pattern is None:
        return ()
    return tuple(dict.fromkeys(m.group(0).lower() for m in pattern.finditer(text)))
