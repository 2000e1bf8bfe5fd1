"""The admin's dashboard: the live queue (page + server-sent events from the engine's events),
the stats charts, the actions (preload, unload, cancel) and ``/metrics``.

The event stream: each connection subscribes to the engine (``engine.subscribe()``) and sends
``queue`` (positions, ETAs, the running job, what is resident) whenever the queue moved or a job
changed state, ``progress`` for each denoising step and ``preview`` for each preview image. It
unsubscribes when the browser goes away.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from engine import Engine, EngineError, EngineEvent, JobPreviewed, JobProgressed, Timeline
from web import charts
from web.access import bearer_ok, check_csrf, require_admin
from web.metrics import metrics
from web.state import WebState, state_of

CHART_DAYS = 30
PING_S = 15.0  # keeps proxies from closing an idle stream


def routes() -> list[BaseRoute]:
    return [
        Route("/queue", queue_page), Route("/queue/events", queue_events),
        Route("/stats", stats_page), Route("/metrics", metrics),
        Route("/actions/{action}", action, methods=["POST"]),
    ]


def _engine(state: WebState) -> Engine:
    if state.engine is None:
        raise HTTPException(409, "The queue lives in the process that runs the jobs: set [web] enabled = true "
                                 "and use the dashboard that `promptpics run` serves.")
    return state.engine


# -- the queue -----------------------------------------------------------------------------------


def queue_snapshot(engine: Engine) -> dict[str, Any]:
    """The queue, and what every GPU worker holds (summed over the workers; each row names its worker)."""
    workers = engine.workers()
    statuses = [(w.info.name, w.status) for w in workers if w.status is not None]
    budgets = [s.gpu_budget_bytes for _, s in statuses if s.gpu_budget_bytes is not None]
    return {
        "entries": [{"job_id": e.job_id, "position": e.position, "model": e.model_id, "user": e.user,
                     "status": e.status.value, "waited_s": round(e.waited_s, 1),
                     "eta_s": None if e.eta_s is None else round(e.eta_s, 1), "worker": e.worker}
                    for e in engine.queue_snapshot()],
        "resident": [{"model": m.model_id, "where": m.where, "bytes": m.device_bytes or m.nbytes, "pinned": m.pinned,
                      "load_s": round(m.load_s, 2), "worker": name} for name, s in statuses for m in s.models],
        "gpu_used_bytes": sum(s.gpu_used_bytes for _, s in statuses),
        "gpu_budget_bytes": sum(budgets) if budgets else None,
        "workers": len(workers),
        "models": sorted(engine.config.models),
    }


async def queue_page(request: Request) -> Response:
    state = state_of(request)
    viewer = require_admin(request, state.settings)
    snapshot = queue_snapshot(state.engine) if state.engine is not None else None
    return state.render("queue.html", viewer, snapshot=snapshot, done=request.query_params.get("done", "")[:300])


def event_message(engine: Engine, event: EngineEvent) -> dict[str, str]:
    """One engine event -> one SSE message (``event`` name and JSON ``data``)."""
    if isinstance(event, JobProgressed):
        return {"event": "progress", "data": json.dumps({"job_id": event.job_id, "step": event.step,
                                                         "total": event.total})}
    if isinstance(event, JobPreviewed):
        src = f"data:{event.mime};base64,{base64.b64encode(event.image).decode()}" if event.image else ""
        return {"event": "preview", "data": json.dumps({"job_id": event.job_id, "step": event.step,
                                                        "total": event.total, "src": src})}
    return {"event": "queue", "data": json.dumps(queue_snapshot(engine))}


def coalesce(engine: Engine, batch: list[EngineEvent]) -> list[dict[str, str]]:
    """Every progress and preview message, in order, then one snapshot if anything else happened."""
    messages = [event_message(engine, e) for e in batch if isinstance(e, JobProgressed | JobPreviewed)]
    if len(messages) < len(batch):
        messages.append({"event": "queue", "data": json.dumps(queue_snapshot(engine))})
    return messages


async def _stream(engine: Engine) -> AsyncIterator[dict[str, str]]:
    events = engine.subscribe()
    try:
        yield {"event": "queue", "data": json.dumps(queue_snapshot(engine))}
        while True:
            batch = [await events.get()]
            while not events.empty():  # a burst of changes (a job ends, the next starts): one snapshot
                batch.append(events.get_nowait())
            for message in coalesce(engine, batch):
                yield message
    finally:
        engine.unsubscribe(events)


async def queue_events(request: Request) -> Response:
    state = state_of(request)
    require_admin(request, state.settings)
    return EventSourceResponse(_stream(_engine(state)), ping=int(PING_S))


# -- actions -------------------------------------------------------------------------------------


async def action(request: Request) -> Response:
    state = state_of(request)
    viewer = require_admin(request, state.settings)
    form = await check_csrf(request, viewer)
    engine = _engine(state)
    name, target = request.path_params["action"], form.get("target", "").strip()
    if name not in ("preload", "unload", "cancel") or not target:
        raise HTTPException(400, "POST /actions/preload|unload|cancel with a form field target=<model or job id>.")
    try:
        if name == "preload":
            message = f"{target} loaded in {await engine.preload(target):.1f} s"
        elif name == "unload":
            message = f"{target} unloaded" if await engine.unload(target) else f"{target} was not loaded"
        else:
            message = f"job {target} cancelled" if await engine.cancel(target) else f"job {target} is not queued or running"
    except EngineError as exc:
        raise HTTPException(400, exc.user_message) from None
    if bearer_ok(request, state.settings):
        return JSONResponse({"ok": True, "message": message})
    return RedirectResponse(f"/queue?{_query(done=message)}", status_code=303)


def _query(**values: str) -> str:
    return urlencode(values)


# -- stats ---------------------------------------------------------------------------------------


def chart_svgs(timeline: Timeline, today: date, days: int = CHART_DAYS) -> dict[str, str]:
    labels = [(today - timedelta(days=days - 1 - i)).isoformat() for i in range(days)]
    short = [label[5:] for label in labels]
    at = {label: i for i, label in enumerate(labels)}
    models = sorted({r.model_id for r in timeline.days})
    jobs = {m: [0.0] * days for m in models}
    loads = {m: [0.0] * days for m in models}
    safety = {k: [0.0] * days for k in ("flagged", "fixed by rewrite", "fell back", "refused")}
    for r in timeline.days:
        if r.day in at:
            jobs[r.model_id][at[r.day]] += r.jobs
            loads[r.model_id][at[r.day]] += r.loads
            safety["fixed by rewrite"][at[r.day]] += r.fixed
            safety["refused"][at[r.day]] += r.refused
    for day, (flagged, fell_back) in timeline.flags.items():
        if day in at:
            safety["flagged"][at[day]] += flagged
            safety["fell back"][at[day]] += fell_back
    every = [v for values in timeline.generate_times.values() for v in values]
    bin_labels, uppers = charts.histogram_bins(every)
    times = {m: charts.bin_counts(v, uppers) for m, v in sorted(timeline.generate_times.items())}
    return {
        "jobs": charts.bar_chart(f"Jobs per day per model (last {days} days)", short, jobs),
        "times": charts.bar_chart("Generation time (succeeded jobs)", bin_labels, times),
        "loads": charts.bar_chart("Model loads per day", short, loads),
        "safety": charts.line_chart("Safety incidents per day", short, safety),
    }


async def stats_page(request: Request) -> Response:
    state = state_of(request)
    viewer = require_admin(request, state.settings)
    since = time.time() - CHART_DAYS * 86400
    timeline = await state.timeline.timeline(since)
    svgs = chart_svgs(timeline, datetime.now(timezone.utc).date())  # SQLite's date() is UTC too
    return state.render("stats.html", viewer, charts=svgs, stats=await state.history.model_stats())
