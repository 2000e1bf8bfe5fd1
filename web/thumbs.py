"""Gallery thumbnails: made once per image with Pillow, cached beside the PNG as
``<job_id>.thumb.jpg`` (``engine.thumbnail_path``; pruning an image removes its thumbnail too).
Made off the loop, in a worker thread; a thumbnail being made twice at once costs only time
(``write_atomic``: the last rename wins, a reader never sees half a file)."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

from PIL import Image

from engine import thumbnail_path, write_atomic

log = logging.getLogger(__name__)


def make_thumbnail_blocking(png: Path, side: int) -> Path:
    """The cached thumbnail of ``png``, made now if missing or older than the PNG."""
    thumb = thumbnail_path(png)
    try:
        if thumb.stat().st_mtime >= png.stat().st_mtime:
            return thumb
    except FileNotFoundError:
        pass
    with Image.open(png) as image:
        image.thumbnail((side, side))
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=82, optimize=True)
    write_atomic(thumb, out.getvalue())
    return thumb


async def thumbnail(png: Path, side: int) -> Path:
    return await asyncio.to_thread(make_thumbnail_blocking, png, side)
