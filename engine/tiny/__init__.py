"""Tiny random-weight twins of the four production pipelines and the chat LLM, built locally and cached.

    __init__.py   ensure_tiny_models: the cache (one build per version, a lock between processes, atomic folders)
    builders.py   one builder per twin (FLUX, SDXL, SD3, HiDream and its Llama, the chat LLM)
    parts.py      tokenizers built without the hub, text encoders, VAEs, schedulers, shared sizes
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.history import write_atomic
from engine.tiny.builders import (
    build_chat_llm,
    build_flux,
    build_hidream,
    build_hidream_llama,
    build_sd3,
    build_sdxl,
)

# Bump whenever a recipe below changes: it names the cache folder, so old twins are never reused.
TINY_VERSION = "tiny-v1"

_COMPLETE = "COMPLETE"  # written last in the version folder: its presence means every twin is in place
_MODEL_DONE = ".tiny-model-complete"  # written last inside each model folder before it is renamed into place


@dataclass(frozen=True, slots=True)
class TinyModels:
    root: Path
    flux: Path  # FluxPipeline folder
    sdxl: Path  # StableDiffusionXLPipeline folder
    sd3: Path  # StableDiffusion3Pipeline folder
    hidream: Path  # HiDreamImagePipeline folder (text_encoder_4/tokenizer_4 are null in model_index.json)
    hidream_llama: Path  # LlamaForCausalLM + tokenizer folder, passed as text_encoder_4/tokenizer_4
    chat_llm: Path  # tiny Qwen2ForCausalLM + ChatML tokenizer folder


def ensure_tiny_models(cache_dir: Path) -> TinyModels:
    """Build every twin once under cache_dir/<TINY_VERSION>/..., reuse afterwards."""
    root = Path(cache_dir) / TINY_VERSION
    models = _layout(root)
    # Fast path: one stat call, no torch import.
    if (root / _COMPLETE).is_file():
        return models
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root) as exclusive, _quiet_progress_bars():
        if (root / _COMPLETE).is_file():  # another process finished while we waited for the lock
            return models
        if exclusive:  # nobody else is building, so any temp folder is a crashed build's leftover
            _remove_leftovers(root)
        for name, builder in _builders().items():
            _build_once(root / name, builder)
        write_atomic(root / _COMPLETE, (TINY_VERSION + "\n").encode())
    return models


def _layout(root: Path) -> TinyModels:
    return TinyModels(
        root=root,
        flux=root / "flux",
        sdxl=root / "sdxl",
        sd3=root / "sd3",
        hidream=root / "hidream",
        hidream_llama=root / "hidream_llama",
        chat_llm=root / "chat_llm",
    )


def _builders() -> dict[str, Callable[[Path], None]]:
    return {
        "flux": build_flux,
        "sdxl": build_sdxl,
        "sd3": build_sd3,
        "hidream_llama": build_hidream_llama,
        "hidream": build_hidream,
        "chat_llm": build_chat_llm,
    }


# --------------------------------------------------------------------------- cache mechanics


@contextmanager
def _build_lock(root: Path) -> Iterator[bool]:
    """Serialise builders across processes; yields whether the lock is real (POSIX) or absent.

    The tmp+rename in _build_once still guards against crashes, and against races where there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic renames alone
        yield False
        return
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(root: Path) -> None:
    for leftover in root.glob(".*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(".*.trash-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' per-save "Writing model shards" bars during a build, then restore the setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _build_once(target: Path, builder: Callable[[Path], None]) -> None:
    """Build into a private sibling folder and rename it into place, so `target` is whole or absent."""
    if (target / _MODEL_DONE).is_file():
        return
    if target.exists():  # left by a crash or hand-edited: move aside first, rename is atomic
        _discard(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        builder(tmp)
        (tmp / _MODEL_DONE).write_text(TINY_VERSION + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            # Lost a race (target appeared meanwhile): the winner's copy is identical, keep it.
            if not (target / _MODEL_DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(path: Path) -> None:
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
