"""Server-side SVG charts, small and dependency-free: stacked bars and lines over labelled
columns, a legend, a few y ticks. Every text is escaped; the SVG is inlined in the stats page.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 28, 56


def _nice_max(value: float) -> float:
    """The axis top: 1, 2 or 5 times a power of ten, at or above ``value``."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value)


def _number(value: float) -> str:
    return f"{value:g}" if value < 10_000 else f"{value / 1000:g}k"


def _frame(title: str, top: float, labels: Sequence[str], series_names: Sequence[str]) -> list[str]:
    plot_h = HEIGHT - TOP - BOTTOM
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(title)}">', f'<text x="{LEFT}" y="16" class="title">{escape(title)}</text>']
    for i in range(5):  # y ticks: 0, 1/4 .. top
        value = top * i / 4
        y = TOP + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_number(value)}</text>')
    step = max(1, math.ceil(len(labels) / 10))  # at most ~10 labels under the axis
    for i, label in enumerate(labels):
        if i % step == 0:
            x = _x(i, len(labels)) + _band(len(labels)) / 2
            parts.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle" class="tick">'
                         f'{escape(label)}</text>')
    for i, name in enumerate(series_names):  # legend, one row under the labels
        x = LEFT + i * 110
        parts.append(f'<rect x="{x}" y="{HEIGHT - 22}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>')
        parts.append(f'<text x="{x + 14}" y="{HEIGHT - 13}" class="legend">{escape(name[:14])}</text>')
    return parts


def _band(n: int) -> float:
    return (WIDTH - LEFT - RIGHT) / max(n, 1)


def _x(i: int, n: int) -> float:
    return LEFT + i * _band(n)


def bar_chart(title: str, labels: Sequence[str], series: Mapping[str, Sequence[float]]) -> str:
    """Stacked bars: one column per label, one colour per series."""
    totals = [sum(values[i] for values in series.values()) for i in range(len(labels))]
    top = _nice_max(max(totals, default=0))
    parts = _frame(title, top, labels, list(series))
    plot_h, band = HEIGHT - TOP - BOTTOM, _band(len(labels))
    for i in range(len(labels)):
        base = 0.0
        for k, (name, values) in enumerate(series.items()):
            if values[i] <= 0:
                continue
            h = plot_h * values[i] / top
            y = TOP + plot_h - plot_h * base / top - h
            parts.append(f'<rect x="{_x(i, len(labels)) + band * 0.1:.1f}" y="{y:.1f}" width="{band * 0.8:.1f}" '
                         f'height="{h:.1f}" fill="{PALETTE[k % len(PALETTE)]}">'
                         f'<title>{escape(name)} {escape(labels[i])}: {_number(values[i])}</title></rect>')
            base += values[i]
    if not any(totals):
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="empty">no data yet</text>')
    return "\n".join([*parts, "</svg>"])


def line_chart(title: str, labels: Sequence[str], series: Mapping[str, Sequence[float]]) -> str:
    """One polyline per series, a dot per point."""
    top = _nice_max(max((v for values in series.values() for v in values), default=0))
    parts = _frame(title, top, labels, list(series))
    plot_h, band = HEIGHT - TOP - BOTTOM, _band(len(labels))
    for k, (name, values) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        points = [(_x(i, len(labels)) + band / 2, TOP + plot_h - plot_h * v / top) for i, v in enumerate(values)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"><title>{escape(name)} '
                  f'{escape(labels[i])}: {_number(values[i])}</title></circle>' for i, (x, y) in enumerate(points)]
    return "\n".join([*parts, "</svg>"])


def histogram_bins(values: Sequence[float], bins: int = 12) -> tuple[list[str], list[float]]:
    """Equal-width bins from 0 to the largest value: (labels, edges' upper bounds)."""
    top = _nice_max(max(values, default=0))
    width = top / bins
    return [f"{width * (i + 1):.3g}s" for i in range(bins)], [width * (i + 1) for i in range(bins)]


def bin_counts(values: Sequence[float], uppers: Sequence[float]) -> list[float]:
    counts = [0.0] * len(uppers)
    for v in values:
        i = next((i for i, upper in enumerate(uppers) if v <= upper), len(uppers) - 1)
        counts[i] += 1
    return counts
