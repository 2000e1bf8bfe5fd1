"""The safety loop's errors: refusals a user reads, and the non-finite signal the pipelines raise.

    EngineError (engine.errors)
    ├── ImageRefusedError        nothing was posted; ``reason`` and ``attempts`` say why
    │   ├── UnsafeContentError   the prompt or every image was flagged NSFW
    │   └── BlankImageError      every image came out black, blank or NaN (fallback included)
    └── NonFiniteError           NaN/Inf in the latents or the decoded image; raised on the GPU
                                 thread from the step callback or the VAE decode guard and
                                 turned into a "black" verdict by the policy (a user never sees it)
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.errors import EngineError
from engine.safety.attempts import Attempt


class ImageRefusedError(EngineError):
    """Nothing was posted. ``attempts`` holds every generation tried, for the history."""

    reason: str = "refused"

    def __init__(self, message: str, attempts: Sequence[Attempt] = ()) -> None:
        self.attempts = tuple(attempts)
        super().__init__(message)


class UnsafeContentError(ImageRefusedError):
    """``reason`` is ``"prompt"`` (refused before any GPU time) or ``"nsfw"`` (every image flagged)."""

    def __init__(self, reason: str, message: str, attempts: Sequence[Attempt] = ()) -> None:
        self.reason = reason
        super().__init__(message, attempts)


class BlankImageError(ImageRefusedError):
    reason = "black"


class NonFiniteError(EngineError):
    """NaN or Inf where a picture should be. ``where`` is e.g. ``"latents at step 3"``."""

    def __init__(self, model_id: str, where: str) -> None:
        self.model_id, self.where = model_id, where
        super().__init__(f"`{model_id}` produced an invalid image (NaN/Inf in the {where}).")
