"""``/metrics``: Prometheus text format, names prefixed ``promptpics_``. Counters and histograms are
read from the history at scrape time (so they survive restarts and agree with /stats); the queue
and the GPU come live from the engine when this process runs one. Behind the admin token
(Prometheus sends it as ``authorization: {credentials: ...}``, a bearer token; docs/WEB.md).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from engine import TIME_BUCKETS, Engine, Histogram, JobStatus, ModelStats, Totals
from web.access import require_admin
from web.state import state_of

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SAFETY_KINDS = ("nsfw_flagged", "black_flagged", "fixed_by_rewrite", "fell_back", "refused")


class Snapshot(Collector):
    """One scrape's numbers, gathered beforehand (the history is async; ``collect`` is not)."""

    def __init__(self, totals: Totals, stats: list[ModelStats], engine: Engine | None) -> None:
        self._totals, self._stats, self._engine = totals, stats, engine

    def collect(self) -> Iterator[Metric]:
        yield self._jobs()
        yield from self._queue()
        yield _histogram("promptpics_queue_wait_seconds", "Seconds a finished job waited in the queue.",
                         self._totals.wait)
        yield _histogram("promptpics_generate_seconds", "Seconds a succeeded job held the GPU (its model load apart).",
                         self._totals.generate)
        loads = CounterMetricFamily("promptpics_model_loads", "Jobs that had to load their model first.", labels=["model"])
        seconds = CounterMetricFamily("promptpics_model_load_seconds", "Seconds spent loading models for jobs.",
                                      labels=["model"])
        for model, (n, s) in sorted(self._totals.loads.items()):
            loads.add_metric([model], n)
            seconds.add_metric([model], s)
        yield loads
        yield seconds
        yield self._safety()
        yield from self._gpu()
        yield from self._workers()

    def _jobs(self) -> Metric:
        jobs = CounterMetricFamily("promptpics_jobs", "Finished jobs by final model and outcome.", labels=["model", "outcome"])
        for (model, status), n in sorted(self._totals.jobs.items()):
            if JobStatus(status).is_final:
                jobs.add_metric([model, status], n)
        return jobs

    def _queue(self) -> Iterator[Metric]:
        if self._engine is not None:
            entries = self._engine.queue_snapshot()
            queued, running = sum(e.position > 0 for e in entries), sum(e.position == 0 for e in entries)
        else:  # beside a bot: the history's view, as of its last write
            queued = sum(n for (_, s), n in self._totals.jobs.items() if s == "queued")
            running = sum(n for (_, s), n in self._totals.jobs.items() if s == "running")
        yield GaugeMetricFamily("promptpics_queue_depth", "Jobs waiting in the queue.", value=queued)
        yield GaugeMetricFamily("promptpics_jobs_running", "Jobs running now (one per busy GPU worker).", value=running)

    def _safety(self) -> Metric:
        safety = CounterMetricFamily("promptpics_safety_events", "Safety loop events by model and kind.",
                                     labels=["model", "kind"])
        for s in self._stats:
            for kind in SAFETY_KINDS:
                safety.add_metric([s.model_id, kind], getattr(s, kind))
        return safety

    def _gpu(self) -> Iterator[Metric]:
        """Summed over the GPU workers (per worker: ``_workers``)."""
        statuses = [w.status for w in self._engine.workers() if w.status is not None] if self._engine else []
        if not statuses:
            return
        yield GaugeMetricFamily("promptpics_gpu_memory_used_bytes", "Bytes the resident models count against the "
                                "GPU budgets, all workers.", value=sum(s.gpu_used_bytes for s in statuses))
        budgets = [s.gpu_budget_bytes for s in statuses if s.gpu_budget_bytes is not None]
        if budgets:
            yield GaugeMetricFamily("promptpics_gpu_memory_budget_bytes", "The GPU budgets for models, all workers.",
                                    value=sum(budgets))
        resident = GaugeMetricFamily("promptpics_model_resident", "How many workers hold each model in memory (1 "
                                     "with one GPU), by where it is.", labels=["model", "where"])
        counts: dict[tuple[str, str], int] = {}
        for m in (m for s in statuses for m in s.models):
            counts[(m.model_id, m.where)] = counts.get((m.model_id, m.where), 0) + 1
        for (model_id, where), n in sorted(counts.items()):
            resident.add_metric([model_id, where], n)
        yield resident


    def _workers(self) -> Iterator[Metric]:
        """Per GPU worker (one, ``gpu``, unless ``[cluster]`` says otherwise): up, busy, memory used."""
        if self._engine is None:
            return
        up = GaugeMetricFamily("promptpics_worker_up", "1 while a GPU worker can take jobs (0: restarting).",
                               labels=["worker"])
        busy = GaugeMetricFamily("promptpics_worker_busy", "1 while a GPU worker runs a job.", labels=["worker"])
        used = GaugeMetricFamily("promptpics_worker_gpu_memory_used_bytes",
                                 "Bytes a worker's resident models count against its GPU budget.", labels=["worker"])
        for w in self._engine.workers():
            up.add_metric([w.info.name], int(w.alive))
            busy.add_metric([w.info.name], int(w.job_id is not None))
            used.add_metric([w.info.name], w.status.gpu_used_bytes if w.status is not None else 0)
        yield from (up, busy, used)


def _histogram(name: str, doc: str, rows: list[Histogram]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["model"])
    for h in sorted(rows, key=lambda h: h.model_id):
        buckets = [(f"{b:g}", c) for b, c in zip(TIME_BUCKETS, h.cumulative)] + [("+Inf", h.count)]
        family.add_metric([h.model_id], buckets, sum_value=h.total)
    return family


async def metrics(request: Request) -> Response:
    state = state_of(request)
    require_admin(request, state.settings)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot(await state.timeline.totals(), await state.history.model_stats(), state.engine))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE)
