"""How a job reads on a page: the exact /imagine that makes it again, times, sizes, verdicts.
Pure functions; the templates use them as filters."""

from __future__ import annotations

import math
from datetime import datetime, timezone

from engine import AttemptRecord, StoredJob


def imagine_command(job: StoredJob) -> str:
    """The /imagine line that asks for this job again: same prompt, model, steps, guidance,
    size and seed (``--no`` last: it takes every word up to the next flag)."""
    p = job.params
    parts = ["/imagine", p.prompt, "--model", p.model_id, "--steps", str(p.steps), "--guidance", repr(float(p.guidance)),
             "--size", f"{p.width}x{p.height}", "--seed", str(p.seed)]
    if p.negative_prompt:
        parts += ["--no", p.negative_prompt]
    return " ".join(parts)


def when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def mebibytes(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f} MiB"


def verdict_text(attempt: AttemptRecord) -> list[str]:
    """One line per detector: 'nsfw: flagged (0.91)' or 'black: clear'."""
    lines = []
    for name, v in sorted(attempt.verdicts.items()):
        score = v.get("score")
        shown = "" if score is None else f" ({score:.2f})"
        lines.append(f"{name}: {'flagged' if v.get('flagged') else 'clear'}{shown}")
    return lines


def routing_text(job: StoredJob) -> str:
    if job.model_asked:
        return f"asked for {job.model_asked}"
    return "chosen by the router"


FILTERS = {"when": when, "seconds": seconds, "mebibytes": mebibytes}
