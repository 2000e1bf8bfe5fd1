"""Measure a router on a labelled JSONL file: accuracy, per-model precision/recall, confusion, latency.

File format (../shared/eval/README.md): one JSON object a line with ``prompt``, ``expected``
(the best model) and ``acceptable`` (``expected`` first, then any model that could fairly
serve). Used by ``promptpics eval-router`` and ``bench/router_eval.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.router.cascade import RouteDecision, Router


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str
    expected: str
    acceptable: tuple[str, ...]


def read_examples(path: str | Path, model_ids: Iterable[str]) -> list[Example]:
    """Every line checked: a bad one names the line, the field and the rule."""
    known = set(model_ids)
    rows: list[Example] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{Path(path).name}:{n}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(where, line[:40], f"each line must be one JSON object ({exc.msg})") from None
        prompt, expected = raw.get("prompt"), raw.get("expected")
        acceptable = raw.get("acceptable") or [expected]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(where + " prompt", prompt, "it must be a non-empty string")
        for model in [expected, *acceptable]:
            if model not in known:
                raise ConfigError(where + " expected/acceptable", model, f"it must be one of the models: {', '.join(sorted(known))}")
        rows.append(Example(prompt, expected, tuple(dict.fromkeys([expected, *acceptable]))))
    return rows


def percentile(values: Sequence[float], q: int) -> float:
    """The ``q``-th percentile (q in 1..99) as ``statistics.quantiles`` gives it, "inclusive"
    method (linear between the two nearest values, never outside min..max); 0.0 for no values,
    the value itself for one (quantiles needs two)."""
    if len(values) < 2:
        return float(values[0]) if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def evaluate(router: Router, examples: Sequence[Example], model_ids: Sequence[str]) -> dict[str, Any]:
    """Route every example (one at a time, as users would) and score the decisions."""
    decisions: list[RouteDecision] = []
    totals: list[float] = []
    for example in examples:
        started = time.perf_counter()
        decisions.append(await router.route(example.prompt))
        totals.append((time.perf_counter() - started) * 1000)
    return score(examples, decisions, totals, model_ids)


def score(examples: Sequence[Example], decisions: Sequence[RouteDecision], totals_ms: Sequence[float],
          model_ids: Sequence[str]) -> dict[str, Any]:
    n = len(examples)
    confusion = {e: {p: 0 for p in model_ids} for e in model_ids}  # expected -> predicted -> count
    strict = lenient = 0
    for example, decision in zip(examples, decisions, strict=True):
        confusion[example.expected][decision.model_id] += 1
        strict += decision.model_id == example.expected
        lenient += decision.model_id in example.acceptable
    recall = {m: _ratio(confusion[m][m], sum(confusion[m].values())) for m in model_ids}
    precision = {m: _ratio(confusion[m][m], sum(confusion[e][m] for e in model_ids)) for m in model_ids}
    stages: dict[str, int] = {}
    stage_ms: dict[str, list[float]] = {}
    for decision in decisions:
        stages[decision.stage] = stages.get(decision.stage, 0) + 1
        for stage, ms in decision.timings_ms.items():
            stage_ms.setdefault(stage, []).append(ms)
    offline = [sum(ms for st, ms in d.timings_ms.items() if st in ("rules", "embeddings")) for d in decisions]
    return {
        "n": n,
        "strict_accuracy": _ratio(strict, n),
        "lenient_accuracy": _ratio(lenient, n),
        "recall": recall,
        "precision": precision,
        "confusion": confusion,
        "decided_by": stages,
        "latency_ms": _latency(totals_ms),
        "latency_ms_by_stage": {stage: _latency(ms) for stage, ms in stage_ms.items()},
        "latency_ms_rules_embeddings": _latency(offline),
    }


def _latency(values: Sequence[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), 3), "p95": round(percentile(values, 95), 3),
            "max": round(max(values, default=0.0), 3), "n": len(values)}


def _ratio(a: int, b: int) -> float:
    return round(a / b, 4) if b else 0.0


def format_report(report: dict[str, Any], model_ids: Sequence[str]) -> str:
    """The report as a few plain-text tables (what ``eval-router`` prints without --json)."""
    lines = [
        f"{report['n']} prompts: strict accuracy {report['strict_accuracy']:.1%}, "
        f"lenient accuracy {report['lenient_accuracy']:.1%}",
        "decided by: " + ", ".join(f"{s} {c}" for s, c in sorted(report["decided_by"].items())),
        "",
        f"{'model':<12} {'precision':>9} {'recall':>7}",
    ]
    lines += [f"{m:<12} {report['precision'][m]:>9.1%} {report['recall'][m]:>7.1%}" for m in model_ids]
    width = max(len(m) for m in model_ids)
    lines += ["", "confusion (rows: expected, columns: predicted)", " " * (width + 1) + " ".join(f"{m:>{width}}" for m in model_ids)]
    for e in model_ids:
        lines.append(f"{e:<{width}} " + " ".join(f"{report['confusion'][e][p]:>{width}}" for p in model_ids))
    lines += ["", f"{'latency (ms)':<20} {'p50':>8} {'p95':>8} {'max':>8} {'n':>5}"]
    rows = [("total", report["latency_ms"]), ("rules+embeddings", report["latency_ms_rules_embeddings"])]
    rows += sorted(report["latency_ms_by_stage"].items())
    lines += [f"{name:<20} {v['p50']:>8.2f} {v['p95']:>8.2f} {v['max']:>8.2f} {v['n']:>5}" for name, v in rows]
    return "\n".join(lines)
