"""The dashboard on a real tiny-profile engine, served by uvicorn on 127.0.0.1: the SSE stream
delivers a queue change and progress, /metrics parses and its counters move when a job runs,
the stats page draws its charts, and the admin actions reach the engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import Engine, JobRequest, Requester
from tests.conftest import make_tiny_config
from tests.webkit import KEY, TOKEN, with_every_preview
from web.app import build_app
from web.server import WebServer
from web.settings import load_web_settings

BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def sse_messages(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    event, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data += line.split(":", 1)[1].strip()
        elif not line and data:
            yield event, json.loads(data)
            event, data = "message", ""


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
async def served(tiny_models: Any, tmp_path: Path) -> AsyncIterator[tuple[Engine, httpx.AsyncClient]]:
    config = with_every_preview(make_tiny_config(tiny_models, tmp_path / "data"))
    settings = load_web_settings(config, {"PROMPTPICS_WEB_TOKEN": TOKEN})
    async with Engine(config) as engine:
        server = WebServer(build_app(config, settings, engine.history, engine, key=KEY), "127.0.0.1", 0)
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=60) as client:
                yield engine, client
        finally:
            await server.stop()


async def test_the_event_stream_delivers_a_queue_change_and_progress(served: tuple[Engine, httpx.AsyncClient]) -> None:
    engine, client = served
    async with asyncio.timeout(120):
        assert (await client.get("/queue/events")).status_code == 403
        async with client.stream("GET", "/queue/events", headers=BEARER) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            messages = sse_messages(response)
            event, first = await anext(messages)
            assert event == "queue" and first["entries"] == []
            handle = await engine.submit(JobRequest("a lighthouse at dusk", steps=3, width=64, height=64,
                                                    requester=Requester("cli", "u1", "Ulla")))
            seen_in_queue, steps, previews = False, [], []
            async for event, data in messages:
                if event == "queue":
                    seen_in_queue |= any(e["job_id"] == handle.id for e in data["entries"])
                elif event == "progress" and data["job_id"] == handle.id:
                    steps.append(data["step"])
                    assert data["total"] == 3
                elif event == "preview" and data["job_id"] == handle.id:
                    previews.append(data["src"])
                if seen_in_queue and steps and steps[-1] == 3 and previews:
                    break
        await handle.result()
    assert seen_in_queue and steps[-1] == 3
    assert previews[0].startswith("data:image/jpeg;base64,")


async def test_metrics_parse_and_the_counters_move_when_a_job_runs(served: tuple[Engine, httpx.AsyncClient]) -> None:
    engine, client = served
    assert (await client.get("/metrics")).status_code == 403
    before = await client.get("/metrics", headers=BEARER)
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    handle = await engine.submit(JobRequest("a red barn", steps=2, width=64, height=64))
    result = await asyncio.wait_for(handle.result(), 120)
    after = samples((await client.get("/metrics", headers=BEARER)).text)
    was = samples(before.text)
    model = result.params.model_id
    done = ("promptpics_jobs_total", frozenset({("model", model), ("outcome", "succeeded")}))
    assert after[done] == was.get(done, 0) + 1
    count = ("promptpics_generate_seconds_count", frozenset({("model", model)}))
    assert after[count] == was.get(count, 0) + 1
    assert after[("promptpics_generate_seconds_sum", frozenset({("model", model)}))] > 0
    assert after[("promptpics_queue_depth", frozenset())] == 0
    assert ("promptpics_gpu_memory_used_bytes", frozenset()) in after
    gpu = frozenset({("worker", "gpu")})  # the embedded worker, idle again, its model resident
    assert after[("promptpics_worker_up", gpu)] == 1 and after[("promptpics_worker_busy", gpu)] == 0
    assert after[("promptpics_worker_gpu_memory_used_bytes", gpu)] == after[("promptpics_gpu_memory_used_bytes", frozenset())]
    assert any(name == "promptpics_safety_events_total" for name, _ in after)
    assert all(name.startswith("promptpics_") for name, _ in after)


async def test_the_stats_page_draws_four_charts(served: tuple[Engine, httpx.AsyncClient]) -> None:
    engine, client = served
    handle = await engine.submit(JobRequest("a small boat", steps=2, width=64, height=64))
    await asyncio.wait_for(handle.result(), 120)
    page = await client.get("/stats", headers=BEARER)
    assert page.status_code == 200
    assert page.text.count("<svg") == 4
    for title in ("Jobs per day per model", "Generation time", "Model loads per day", "Safety incidents per day"):
        assert title in page.text


async def test_admin_actions_reach_the_engine(served: tuple[Engine, httpx.AsyncClient]) -> None:
    engine, client = served
    model = engine.config.default_model
    answer = await client.post("/actions/preload", data={"target": model}, headers=BEARER)
    assert answer.status_code == 200 and answer.json()["ok"]
    assert model in {m.model_id for m in engine.resident_models()}
    page = await client.get("/queue", headers=BEARER)
    assert page.status_code == 200 and model in page.text
    answer = await client.post("/actions/unload", data={"target": model}, headers=BEARER)
    assert answer.json()["message"] == f"{model} unloaded"
    assert model not in {m.model_id for m in engine.resident_models()}
    bad = await client.post("/actions/preload", data={"target": "no_such_model"}, headers=BEARER)
    assert bad.status_code == 400 and "no_such_model" in bad.text
    assert (await client.post("/actions/explode", data={"target": "x"}, headers=BEARER)).status_code == 400
    assert (await client.post("/actions/cancel", data={"target": model})).status_code == 403


async def test_promptpics_run_serves_the_dashboard_from_its_own_engine_when_enabled(
        tiny_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.cli.webui import web_beside

    monkeypatch.setenv("PROMPTPICS_WEB_TOKEN", TOKEN)
    config = make_tiny_config(tiny_models, tmp_path / "data")
    off = config.model_copy(update={"platform_tables": {"web": {"enabled": False}}})
    on = config.model_copy(update={"platform_tables": {"web": {"enabled": True, "port": 0}}})
    async with Engine(config) as engine:
        async with web_beside(off, engine) as nothing:
            assert nothing is None
        async with web_beside(on, engine) as server:
            assert server is not None
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                page = await client.get("/queue", headers=BEARER)
        assert page.status_code == 200 and "/queue/events" in page.text  # the live queue: this engine's
