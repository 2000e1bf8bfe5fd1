"""Foreign errors translated at the diffusers seam: out-of-memory becomes ``OutOfMemoryError``,
a missing or broken model ``ModelLoadError`` (the original stays chained for the log)."""

from __future__ import annotations

from engine.errors import ModelLoadError, OutOfMemoryError


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def translate_error(exc: BaseException, model_id: str, phase: str) -> BaseException:
    """Map a foreign error to the engine's tree; engine errors and interrupts pass through."""
    from engine.errors import EngineError

    if isinstance(exc, EngineError | KeyboardInterrupt | SystemExit):
        return exc
    if is_out_of_memory(exc):
        return OutOfMemoryError(model_id, phase)
    if phase == "loading":
        return ModelLoadError(model_id, _load_reason(exc))
    return exc


def _load_reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OSError | EnvironmentError) or "does not appear to have" in text or "not found" in text.lower():
        return "its files are missing or incomplete (check the model's `source` and that the weights are downloaded)."
    if "gated" in text.lower() or "401" in text or "403" in text:
        return "the hub refused access (accept the model's licence and log in with `hf auth login`)."
    return "the weights could not be read (see the server log)."
