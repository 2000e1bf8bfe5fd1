"""Which previews may leave the GPU thread: ``[previews] policy`` applied to one job, and under
``"checked"`` the image check of each preview picture before it is handed on.

    checked             every preview picture (the encoded bytes that would be posted, decoded
                        again) goes through the cheap image detectors first; a flagged one is
                        dropped and that attempt shows no further previews
    nsfw_channels_only  previews only for jobs asked in an NSFW-allowed channel, unchecked
    unchecked           previews for every job, unchecked (withdrawn when the attempt is rejected)

Runs on the GPU thread, inside the step callback; the callback it returns is what
``generate_blocking`` calls with each ``Preview``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

from engine.config import PreviewSettings
from engine.pipelines.previews import Preview
from engine.pipelines.run import PreviewCallback

log = logging.getLogger(__name__)

# A preview picture (PIL, RGB) -> the problem the safety loop would see ("black", "nsfw") or None.
PreviewCheck = Callable[[Any], str | None]


def preview_callback(settings: PreviewSettings, emit: PreviewCallback | None, *, nsfw_allowed: bool,
                     check: PreviewCheck, job_id: str = "") -> PreviewCallback | None:
    """The callback for one attempt of one job; ``None``: this attempt makes no previews at all
    (nothing is projected either)."""
    if emit is None or not settings.enabled:
        return None
    if settings.policy == "unchecked":
        return emit
    if settings.policy == "nsfw_channels_only":
        return emit if nsfw_allowed else None
    return CheckedPreviews(check, emit, job_id)


def decode_preview(data: bytes) -> Any:
    """The JPEG or WebP bytes of a preview as the RGB picture a viewer would see."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        return picture.convert("RGB")


class CheckedPreviews:
    """Hands a preview on only after ``check`` passed it. The first flag (or a check that fails)
    stops previews for the rest of the attempt: what follows is the same picture, further along."""

    def __init__(self, check: PreviewCheck, emit: PreviewCallback, job_id: str = "") -> None:
        self._check, self._emit, self._job_id = check, emit, job_id
        self.stopped = False
        self.passed = 0

    def __call__(self, preview: Preview) -> None:
        if self.stopped:
            return
        try:
            problem = self._check(decode_preview(preview.image))
        except Exception:  # fail closed: a preview nobody could check is not shown
            log.warning("job %s: the preview at step %d/%d could not be checked; no more previews for this attempt",
                        self._job_id, preview.step, preview.total, exc_info=True)
            self.stopped = True
            return
        if problem is not None:
            log.info("job %s: the preview at step %d/%d was flagged %s; not shown, no more previews for this attempt",
                     self._job_id, preview.step, preview.total, problem)
            self.stopped = True
            return
        self.passed += 1
        self._emit(preview)
