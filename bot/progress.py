"""A terminal progress bar for the command line: redrawn in place on a terminal, sparse lines elsewhere."""

from __future__ import annotations

import time
from typing import TextIO


class ProgressBar:
    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self._stream, self._width = stream, width
        self._tty = stream.isatty()
        self._label = ""
        self._started = 0.0
        self._open = False

    def start(self, label: str, total: int) -> None:
        self._label, self._started, self._open = label, time.perf_counter(), True
        self._draw(0, total)

    def update(self, step: int, total: int) -> None:
        self._label = "generating"
        if self._tty or step == total or step == 1:
            self._draw(step, total)

    def close(self) -> None:
        if self._open and self._tty:
            self._stream.write("\n")
        self._open = False
        self._stream.flush()

    def _draw(self, step: int, total: int) -> None:
        filled = self._width * step // max(total, 1)
        bar = "#" * filled + "-" * (self._width - filled)
        line = f"[{bar}] {step}/{total} steps  {time.perf_counter() - self._started:5.1f} s  {self._label}"
        self._stream.write(f"\r{line}\033[K" if self._tty else line + "\n")
        self._stream.flush()
