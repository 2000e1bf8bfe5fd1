"""Contact sheets: a grid of finished images, each tile under a label strip, as one PNG.

/compare lays its four models out 2x2; /sweep lays steps across and guidance down. A tile is
numbered (the number reactions 1️⃣-9️⃣ pick it) and labelled with what made it and how long it
took. Pure CPU work with Pillow: call ``contact_sheet_blocking`` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage
    from PIL.ImageFont import FreeTypeFont, ImageFont

NUMBER_EMOJIS = ("1️⃣", "2️⃣", "3️⃣", "4️⃣", "5️⃣", "6️⃣", "7️⃣", "8️⃣", "9️⃣")
TILE_SIDE = 384  # each image is fitted into this square: four tiles stay well under 8 MB as PNG
LABEL_HEIGHT = 44
HEADER_HEIGHT = 30
GAP = 6
BACKGROUND = (24, 24, 28)
LABEL_STRIP = (44, 44, 52)
TEXT = (240, 240, 240)
FONT_FILES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf")


@dataclass(frozen=True, slots=True)
class SheetTile:
    png: bytes | None  # None: the job failed or was cancelled (an empty tile, labelled)
    title: str  # "1 · FLUX.1-dev 🎨"
    detail: str  # "3.2 s" or "24 steps · 4.5 · 3.2 s"


def sheet_columns(count: int) -> int:
    """Four tiles make 2x2, nine 3x3; otherwise as square as it gets."""
    return max(1, math.ceil(math.sqrt(count)))


def number_emoji(tile: int) -> str:
    """1-based tile -> its reaction."""
    return NUMBER_EMOJIS[tile - 1]


def tile_of_emoji(emoji: str, count: int) -> int | None:
    """A number reaction -> its 1-based tile (None: not a number, or beyond the sheet)."""
    wanted = emoji.replace("\ufe0f", "")
    for n, e in enumerate(NUMBER_EMOJIS[:count], start=1):
        if e.replace("\ufe0f", "") == wanted:
            return n
    return None


def contact_sheet_blocking(tiles: Sequence[SheetTile], *, columns: int | None = None, header: str = "") -> bytes:
    """The tiles in reading order (left to right, then down) on one PNG. Emoji the font lacks
    are dropped from the picture (the caption beside it keeps them)."""
    from PIL import Image, ImageDraw

    columns = columns or sheet_columns(len(tiles))
    rows = math.ceil(len(tiles) / columns)
    top = HEADER_HEIGHT if header else 0
    width = GAP + columns * (TILE_SIDE + GAP)
    height = top + GAP + rows * (TILE_SIDE + LABEL_HEIGHT + GAP)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    big, small = _font(17), _font(14)
    if header:
        draw.text((GAP + 2, 6), _drawable(header), fill=TEXT, font=big)
    for i, tile in enumerate(tiles):
        x = GAP + (i % columns) * (TILE_SIDE + GAP)
        y = top + GAP + (i // columns) * (TILE_SIDE + LABEL_HEIGHT + GAP)
        draw.rectangle((x, y, x + TILE_SIDE - 1, y + LABEL_HEIGHT - 1), fill=LABEL_STRIP)
        draw.text((x + 6, y + 3), _drawable(tile.title), fill=TEXT, font=big)
        draw.text((x + 6, y + 24), _drawable(tile.detail), fill=TEXT, font=small)
        if tile.png is not None:
            sheet.paste(_fitted(tile.png), (x, y + LABEL_HEIGHT))
    out = io.BytesIO()
    sheet.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _fitted(png: bytes) -> PILImage:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as opened:
        image = opened.convert("RGB")
    scale = TILE_SIDE / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _font(size: int) -> FreeTypeFont | ImageFont:
    from PIL import ImageFont

    for name in FONT_FILES:
        if name.startswith("/") and not Path(name).is_file():
            continue
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()  # type: ignore[return-value]


def _drawable(text: str) -> str:
    # DejaVu has no colour emoji: outside the Basic Multilingual Plane it would draw empty boxes
    return " ".join("".join(ch for ch in text if ord(ch) < 0x10000 and ch != "\ufe0f").split())
