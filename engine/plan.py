"""One cached queue plan: the order the scheduler expects to run the queue in, with positions
and ETAs, computed once per change of the queue, the loaded models or the recorded costs.

Before this, every status message asked for its own plan each time the queue moved: n waiting
jobs x an O(n^2 log n) plan on every job start. Now the engine computes one ``QueuePlan``
(O(n log n), ``engine.scheduler.plan``) when something it depends on changed, and every reader —
``Engine.eta``, ``queue_snapshot``, the ``QueueMoved`` event — reads it in O(1) per job.

A plan stores each job's *offset*: the seconds from the end of the running job until its image,
from the per-job costs (steps x size per model, loads where the plan expects one). An ETA is the
running job's time left, read live, plus that offset.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass

from engine.eta import CostBook
from engine.jobs import GenerationParams
from engine.scheduler import Planned, QueuedJob, Scheduler, plan


@dataclass(frozen=True, slots=True)
class QueuePlan:
    key: Hashable  # what it was computed from; another key: compute again
    planned: tuple[Planned, ...]
    offsets: tuple[float, ...]  # per planned job: seconds after the running job ends until its image
    grounded: int  # how many leading jobs have recorded costs behind them (the rest: no ETA shown)
    index: Mapping[str, int]  # job id -> index in ``planned``

    def position(self, job_id: str) -> int | None:
        i = self.index.get(job_id)
        return None if i is None else i + 1

    def eta(self, job_id: str, running_left_s: float, running_grounded: bool) -> float | None:
        """Seconds until ``job_id``'s image, or None where it would rest on defaults."""
        i = self.index.get(job_id)
        if i is None or not running_grounded or i >= self.grounded:
            return None
        return round(running_left_s + self.offsets[i], 1)

    def rough_eta(self, job_id: str, running_left_s: float) -> float:
        """The same, defaults included (the admin's queue listing wants a number for every job)."""
        return round(running_left_s + self.offsets[self.index[job_id]], 1)


def build_plan(key: Hashable, scheduler: Scheduler, queue: Sequence[QueuedJob],
               params: Mapping[str, GenerationParams], resident: Collection[str], parked: Collection[str],
               now: float, book: CostBook, busy_for_s: float) -> QueuePlan:
    """Plan the whole queue once, then walk it adding each job's own cost."""
    planned = tuple(plan(scheduler, queue, resident, now, book, parked=parked, busy_for_s=busy_for_s))
    offsets: list[float] = []
    grounded, still_grounded, t = 0, True, 0.0
    for p in planned:
        job = params[p.job_id]
        if p.loads:
            t += book.expected_load_s(p.model_id)
            still_grounded = still_grounded and book.knows_load(p.model_id)
        t += book.job_s(job)
        still_grounded = still_grounded and book.confident(job)
        grounded += still_grounded
        offsets.append(t)
    return QueuePlan(key, planned, tuple(offsets), grounded, {p.job_id: i for i, p in enumerate(planned)})
