"""What a job is expected to cost, learned from recorded timings; the engine turns it into ETAs.

The scheduler's ``TimingBook`` knows one number per model. A job's time depends on what it
asks for too (4 steps or 50, 256 px or 768 px), so ``CostBook`` keeps, per model, the recent
jobs' ``(work, seconds)`` with ``work = steps x megapixels`` and fits

    generate_s = per_work * work + fixed            (both >= 0; least squares)

where ``generate_s`` is the time the job held the GPU thread, its model load apart, and ``fixed``
is what does not grow with steps: text encoders, VAE decode, safety checks, PNG, history.
With one kind of job only (no spread in ``work``) it falls back to a line through the origin.
It is a ``TimingBook`` as well (the per-model means the planner uses), so one object feeds both
the scheduler's plan and the ETAs, and it is seeded from the history at start: ETAs are right
after a restart, not only after the first jobs of the day.

A job is not guessed at for users when nothing recorded is like it: ``confident`` wants
recorded jobs of its model whose work spans within ``REACH`` times of its own (one 2-step
warm-up says little about a 300-step job: most of its time was the fixed part). The engine
shows no ETA then rather than a made-up one; the queue listing still gets a number.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.jobs import GenerationParams
from engine.scheduler import TimingBook

WINDOW = 64  # recent jobs per model: old enough to average, young enough to follow a new GPU
REACH = 3.0  # how far (as a factor of work) beyond the recorded jobs an estimate is still shown


def work_units(steps: int, width: int, height: int) -> float:
    """steps x megapixels: what the denoising time grows with."""
    return steps * width * height / 1e6


@dataclass(frozen=True, slots=True)
class Fit:
    per_work: float  # seconds per step-megapixel
    fixed: float  # seconds per job, whatever its size

    def seconds(self, work: float) -> float:
        return self.per_work * work + self.fixed


def fit_costs(samples: Iterable[tuple[float, float]]) -> Fit | None:
    """Least squares ``y = a x + c`` with ``a, c >= 0`` over ``(work, seconds)`` pairs, fitted
    again without the outliers (the first run after a load warming kernels up, a job slowed by
    a safety retry): residuals further than 3 scaled MADs from the median are dropped."""
    pts = [(x, y) for x, y in samples if x > 0 and y >= 0]
    fit = _least_squares(pts)
    if fit is None or len(pts) < 5:
        return fit
    residuals = [y - fit.seconds(x) for x, y in pts]
    centre = statistics.median(residuals)
    spread = 1.4826 * statistics.median(abs(r - centre) for r in residuals)  # a standard deviation, robustly
    limit = 3 * spread + 0.02 * statistics.mean(y for _, y in pts)
    kept = [p for p, r in zip(pts, residuals) if abs(r - centre) <= limit]
    return _least_squares(kept) if 3 <= len(kept) < len(pts) else fit


def _least_squares(pts: list[tuple[float, float]]) -> Fit | None:
    if not pts:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if n >= 3 and max(x for x, _ in pts) >= 1.5 * min(x for x, _ in pts):  # enough spread to tell a from c
        a = sum((x - mx) * (y - my) for x, y in pts) / sxx
        c = my - a * mx
        if a >= 0 and c >= 0:
            return Fit(a, c)
        if a < 0:  # more work took less time: noise; the mean is the honest answer
            return Fit(0.0, my)
    # through the origin: the ratio of sums
    return Fit(sum(y for _, y in pts) / sum(x for x, _ in pts), 0.0)


@dataclass(slots=True)
class CostBook(TimingBook):
    """Per-model job costs from recorded timings (see the module docstring)."""

    samples: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    fits: dict[str, Fit | None] = field(default_factory=dict)

    def record_job(self, params: GenerationParams, *, generate_s: float, load_s: float = 0.0) -> None:
        """One finished job (its final parameters: the model that made the image)."""
        self.record(params.model_id, generate_s=generate_s, load_s=load_s)
        window = self.samples.setdefault(params.model_id, deque(maxlen=WINDOW))
        window.append((work_units(params.steps, params.width, params.height), generate_s))
        self.fits.pop(params.model_id, None)

    def seed(self, jobs: Iterable[tuple[GenerationParams, float, float]]) -> int:
        """``(params, generate_s, load_s)`` of succeeded jobs, oldest first. Returns how many."""
        count = 0
        for params, generate_s, load_s in jobs:
            if generate_s > 0:
                self.record_job(params, generate_s=generate_s, load_s=load_s)
                count += 1
        return count

    def known(self, model_id: str) -> bool:
        return bool(self.samples.get(model_id))

    def confident(self, params: GenerationParams) -> bool:
        """Recorded jobs of this model come within ``REACH`` times of this one's work."""
        samples = self.samples.get(params.model_id)
        if not samples:
            return False
        work = work_units(params.steps, params.width, params.height)
        return min(x for x, _ in samples) / REACH <= work <= max(x for x, _ in samples) * REACH

    def knows_load(self, model_id: str) -> bool:
        return model_id in self.load_s

    def fit(self, model_id: str) -> Fit | None:
        if model_id not in self.fits:
            self.fits[model_id] = fit_costs(self.samples.get(model_id, ()))
        return self.fits[model_id]

    def job_s(self, params: GenerationParams) -> float:
        """Expected generate seconds of this job (every model it may need, not the load)."""
        fit = self.fit(params.model_id)
        if fit is None:
            return self.expected_generate_s(params.model_id)
        return fit.seconds(work_units(params.steps, params.width, params.height))

    def remaining_s(self, params: GenerationParams, elapsed_s: float, step: int = 0,
                    step_pace_s: float | None = None) -> float:
        """What is left of a running job: from its own pace once two steps are known, else the
        expected total less what has gone by. Never below the fixed part still to come (the
        decode), nor below zero."""
        expected = self.job_s(params)
        fit = self.fit(params.model_id)
        tail = min(fit.fixed, 0.5 * expected) if fit is not None else 0.0
        if step_pace_s is not None and step >= 2:
            return max(0.0, (params.steps - step) * step_pace_s + tail)
        return max(tail, expected - elapsed_s)
