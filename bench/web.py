"""Benchmark: the web gallery with N jobs in the history (default 1,000): p50/p95 latency of the
gallery page, a search, a filtered page, a job page and a member's gallery, over real HTTP to
uvicorn on 127.0.0.1 (one process, one worker, as `promptpics web` runs).

    python bench/web.py [--jobs 1000] [--requests 200]

Every job gets a real 64x48 PNG, so thumbnails are real too (made once on the first pass, which is
measured separately as "cold"). Prints a Markdown table for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from engine import GenerationParams, HistoryStore, Origin, Requester, Timings  # noqa: E402
from engine.config import parse_config  # noqa: E402
from web.app import build_app  # noqa: E402
from web.links import load_secret, sign_link  # noqa: E402
from web.server import WebServer  # noqa: E402
from web.settings import load_web_settings  # noqa: E402

WORDS = ("fox lighthouse whale castle neon city forest dragon portrait robot sunset harbour garden "
         "cat mountain river logo poster watercolor cyberpunk desert ship owl library bridge").split()
TOKEN = "bench-token-0123456789abcdef"


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (random.randrange(256), 90, 160)).save(out, "PNG")
    return out.getvalue()


async def fill(history: HistoryStore, n: int) -> list[str]:
    ids, t0 = [], time.time() - n * 600
    users = [Requester("discord", str(1000 + u), f"user{u}") for u in range(20)]
    models = ["flux_dev", "realvis_xl", "sd3_medium", "logo_sdxl"]
    for i in range(n):
        prompt = " ".join(random.choices(WORDS, k=8))
        params = GenerationParams(prompt, "", random.choice(models), 20, 4.5, 1024, 1024, i, route_reason="rule")
        who = random.choice(users)
        job = await history.record_queued(requester=who, origin=Origin("discord", f"c{i % 5}", "", "", "g"),
                                          model_asked=None, params=params, created_at=t0 + i * 600,
                                          nsfw_allowed=i % 25 == 0)
        a = await history.record_started(job.id, started_at=t0 + i * 600 + 1, model_id=params.model_id, prompt_used=prompt)
        await history.record_attempt_end(job.id, a, outcome="succeeded", verdicts={"nsfw": {"flagged": False, "score": 0.1}},
                                         finished_at=t0 + i * 600 + 5)
        await history.record_succeeded(job.id, png=png(), timings=Timings(1, 0, 4, 5), finished_at=t0 + i * 600 + 6)
        ids.append(job.id)
    return ids


async def timed(client: httpx.AsyncClient, url: str, count: int, **kw: object) -> list[float]:
    out = []
    for _ in range(count):
        t = time.perf_counter()
        r = await client.get(url, **kw)  # type: ignore[arg-type]
        out.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, (url, r.status_code)
    return out


def row(name: str, ms: list[float]) -> str:
    ms = sorted(ms)
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    return f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {p95:.1f} | {max(ms):.1f} |"


async def main(jobs: int, requests: int) -> None:
    random.seed(17)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        raw = tomllib.loads((REPO / "config.toml").read_text())
        raw["engine"]["data_dir"] = str(data)
        config = parse_config(raw, {}, base_dir=REPO)
        settings = load_web_settings(config, {"PROMPTPICS_WEB_TOKEN": TOKEN})
        async with HistoryStore.open(data) as history:
            t = time.perf_counter()
            ids = await fill(history, jobs)
            fill_s = time.perf_counter() - t
            server = WebServer(build_app(config, settings, history), "127.0.0.1", 0)
            await server.start()
            member = sign_link(load_secret(data), "discord", "1003", "user3", 3600)
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", headers=headers) as client:
                cold = await timed(client, "/", 1)  # 48 thumbnails made on first view, in the browser's requests
                thumbs_t = time.perf_counter()
                for job_id in ids[-48:]:
                    await client.get(f"/thumb/{job_id}.jpg")
                thumbs_ms = (time.perf_counter() - thumbs_t) * 1000 / 48
                rows = [
                    row("gallery page 1 (48 jobs)", await timed(client, "/", requests)),
                    row("gallery page 10", await timed(client, "/?page=10", requests)),
                    row("search 'fox'", await timed(client, "/?q=fox", requests)),
                    row("search 'neon city' + model filter", await timed(client, "/?q=neon+city&model=flux_dev", requests)),
                    row("job page", [m for job_id in random.sample(ids, requests)
                                     for m in await timed(client, f"/job/{job_id}", 1)]),
                    row("member gallery (signed link)", await timed(client, f"/g/{member}", requests)),
                    row("thumbnail (cached)", await timed(client, f"/thumb/{ids[-1]}.jpg", requests)),
                ]
            await server.stop()
    load = os.getloadavg()
    print(f"{jobs} jobs (filled in {fill_s:.1f} s), {requests} requests each, sequential, over HTTP to uvicorn; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    print(f"first gallery view {cold[0]:.1f} ms; a thumbnail made on first request {thumbs_ms:.1f} ms each\n")
    print("| request | n | p50 ms | p95 ms | max ms |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.requests))
