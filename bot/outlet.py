"""What a platform implements to show jobs (the ``Outlet`` protocol) and what it is handed:
message references, pictures, previews; and fitting an image under a platform's upload limit.
``Delivery`` (bot/delivery.py) drives the outlets; each platform's own is bot/<platform>/outlet.py.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from engine import StoredJob


@dataclass(frozen=True, slots=True)
class MessageRef:
    channel_id: str
    message_id: str


@dataclass(frozen=True, slots=True)
class Picture:
    png: bytes
    path: str | None  # where the history keeps the PNG


@dataclass(frozen=True, slots=True)
class PreviewPicture:
    data: bytes  # JPEG or WebP, <= 256 px on the long side by default
    mime: str
    filename: str  # "<job id>-preview.jpg"
    step: int
    total: int


class MessageGone(Exception):
    """The message to edit no longer exists (deleted by someone); post a new one instead."""


class PlatformUnavailable(Exception):
    """The platform answered 5xx or 429, or could not be reached: the call may succeed if tried
    again later. An outlet translates its client's errors into this at the seam (``from exc``);
    the sentence names the platform and what it answered, never a token or a URL."""


class Outlet(Protocol):
    """One platform's way of showing a job. Methods raise on failure; Delivery logs and goes on.

    Optional, looked up with ``getattr`` (an outlet without it shows no previews)::

        async def edit_status_with_preview(self, job: StoredJob, ref: MessageRef, text: str,
                                           preview: PreviewPicture | None) -> None: ...

    It edits the status text and replaces the message's image with ``preview``; None removes
    the image (the job ended without one, or the safety loop rejected what it showed). It
    raises MessageGone like ``edit_status``.

    Optional too (bot/posting.py; an outlet without it is never asked, and its results are
    posted again at a restart when their delivery was not recorded)::

        async def find_result(self, job: StoredJob, status: MessageRef | None) -> MessageRef | None: ...

    It looks in the job's channel (or thread) for a result this bot posted earlier for ``job``,
    by the job id the result carries in a machine-readable place, and returns it or None.

    ``post_result`` raises PlatformUnavailable where a retry may help.
    """

    platform: str
    progress_interval_s: float | None  # None: [bot] progress_interval_s

    def mention(self, user_id: str) -> str: ...

    async def post_status(self, job: StoredJob, text: str) -> MessageRef: ...

    async def edit_status(self, job: StoredJob, ref: MessageRef, text: str) -> None: ...

    async def post_result(self, job: StoredJob, picture: Picture, caption: str,
                          status: MessageRef | None) -> MessageRef: ...

    async def add_reactions(self, job: StoredJob, ref: MessageRef, emojis: Sequence[str]) -> None: ...

    async def retire_status(self, job: StoredJob, ref: MessageRef) -> None: ...


# -- images that must fit a platform's upload limit ---------------------------------------------


class ImageTooLarge(Exception):
    pass


def fit_image_blocking(png: bytes, limit: int) -> tuple[bytes, str]:
    """The PNG if it fits in ``limit`` bytes; else WebP or JPEG, downscaled if need be.
    Returns ``(data, extension)``. CPU work: call it through ``asyncio.to_thread``."""
    if limit <= 0 or len(png) <= limit:
        return png, "png"
    from PIL import Image

    with Image.open(io.BytesIO(png)) as opened:
        image = opened.convert("RGB")
    for scale in (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1):
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        scaled = image if scale == 1.0 else image.resize(size, Image.Resampling.LANCZOS)
        for fmt, quality in (("WEBP", 90), ("JPEG", 90), ("WEBP", 70), ("JPEG", 70)):
            buffer = io.BytesIO()
            scaled.save(buffer, format=fmt, quality=quality)
            if buffer.tell() <= limit:
                return buffer.getvalue(), "webp" if fmt == "WEBP" else "jpg"
    raise ImageTooLarge(f"no encoding fits in {limit} bytes")
