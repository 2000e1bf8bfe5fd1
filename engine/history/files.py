"""The history's files: where a job's PNG lives, the one atomic writer, and pruning old images.

Images live under ``<data_dir>/images/YYYY/MM/DD/<job_id>.png`` (UTC date of the finish).
``write_atomic`` (temp file in the same folder, fsync, rename, fsync of the folder) is the
engine's one way to write a file a reader must never see half of; the tiny cache and the
terminal's previews use it too.
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

IMAGES_DIR = "images"


def image_relpath(job_id: str, finished_at: float) -> Path:
    day = datetime.fromtimestamp(finished_at, tz=timezone.utc)
    return Path(IMAGES_DIR, f"{day:%Y}", f"{day:%m}", f"{day:%d}", f"{job_id}.png")


def thumbnail_path(png: Path) -> Path:
    """Where the web gallery caches a PNG's thumbnail: beside it, ``<job_id>.thumb.jpg``."""
    return png.with_name(f"{png.stem}.thumb.jpg")


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        _write_and_sync(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_and_sync(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def delete_images(data_dir: Path, found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Delete each file (a missing one counts as gone); returns the (job id, path) pairs now gone."""
    root = (data_dir / IMAGES_DIR).resolve()
    gone = []
    for job_id, relative in found:
        path = (data_dir / relative).resolve()
        if not path.is_relative_to(root):
            log.warning("history: job %s: image path %s is outside %s; left alone", job_id, relative, root)
            continue
        try:
            path.unlink(missing_ok=True)
            thumbnail_path(path).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("history: job %s: image %s could not be deleted: %s", job_id, path, exc)
            continue
        gone.append((job_id, relative))
        _remove_empty_parents(path.parent, root)
    return gone


def _remove_empty_parents(folder: Path, root: Path) -> None:
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            return
        folder = folder.parent
