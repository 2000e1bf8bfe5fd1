"""What this machine offers the engine, read without loading any model: Python and torch,
CUDA and the card, the bundled embedding model and NudeNet's ONNX file. ``promptpics doctor``
asks; nothing here changes a setting.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TorchFacts:
    python: str
    torch: str | None  # None: torch is not installed
    cuda: str | None  # the CUDA torch was built with; None for a CPU build
    gpu: str | None  # the first card's name, when torch sees one
    gpu_total_bytes: int
    gpu_free_bytes: int
    gpu_count: int
    tf32_capable: bool  # Ampere or newer: TF32 is switched on at start-up
    error: str = ""  # why CUDA could not be asked, if it could not


def torch_facts_blocking() -> TorchFacts:
    """Imports torch (a few seconds the first time); asks CUDA about the first card."""
    python = platform.python_version()
    try:
        import torch
    except ImportError:
        return TorchFacts(python, None, None, None, 0, 0, 0, False)
    cuda_build = torch.version.cuda
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return TorchFacts(python, torch.__version__, cuda_build, None, 0, 0, 0, False)
        free, total = torch.cuda.mem_get_info(0)
        major, _ = torch.cuda.get_device_capability(0)
        return TorchFacts(python, torch.__version__, cuda_build, torch.cuda.get_device_name(0), int(total), int(free),
                          count, major >= 8)
    except Exception as exc:  # a driver mismatch, a busy or broken card: say so, don't crash the doctor
        return TorchFacts(python, torch.__version__, cuda_build, None, 0, 0, 0, False, error=str(exc).splitlines()[0])


def embedding_model_state(source: str) -> tuple[bool, str]:
    """(usable, where or why not) for the router's embedding model; a hub id is judged by the caller."""
    from engine.router.embeddings import EmbeddingUnavailable, resolve_embedding_source

    try:
        where, local = resolve_embedding_source(source)
    except EmbeddingUnavailable as exc:
        return False, str(exc)
    return True, "bundled in a Python package" if source.startswith("package:") else where


def nudenet_state() -> tuple[bool, str]:
    """NudeNet's ONNX model ships inside its wheel (engine.safety.detectors loads 320n.onnx)."""
    spec = importlib.util.find_spec("nudenet")  # without importing it: that pulls in OpenCV
    if spec is None or spec.origin is None:
        return False, "the `nudenet` package is not installed (pip install nudenet)"
    model = Path(spec.origin).parent / "320n.onnx"
    if not model.is_file():
        return False, f"the nudenet package has no {model.name}"
    return True, f"{model.name}, {model.stat().st_size / 1e6:.1f} MB, in the nudenet package"
