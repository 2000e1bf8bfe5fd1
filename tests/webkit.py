"""Helpers for the web tests: a history seeded with jobs, a TestClient whose loop is the one the
history was opened on (aiosqlite's futures belong to one loop), and signed links."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio.from_thread
from PIL import Image
from starlette.testclient import TestClient

from engine import Config, GenerationParams, HistoryStore, Origin, Requester, Timings
from engine.config import parse_config
from tests.conftest import REPO, repo_config_raw
from web.app import build_app
from web.settings import WebSettings, load_web_settings

TOKEN = "admin-token-0123456789abcdef"
KEY = b"k" * 32
ALICE = ("discord", "111", "alice")
BOB = ("discord", "222", "bob")
T = TypeVar("T")


def png_bytes(colour: str = "red", size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def plain_config(data_dir: Path, web: dict[str, Any] | None = None) -> Config:
    raw = repo_config_raw()
    raw["engine"].update(data_dir=str(data_dir))
    if web is not None:
        raw["web"] = web
    return parse_config(raw, {}, base_dir=REPO)


async def add_job(history: HistoryStore, prompt: str, who: tuple[str, str, str] = ALICE, *, model: str = "flux_dev",
                  channel: str = "c1", outcome: str = "succeeded", nsfw: bool = False, created_at: float | None = None,
                  verdicts: dict[str, Any] | None = None) -> str:
    t = time.time() if created_at is None else created_at
    params = GenerationParams(prompt, "blurry", model, 4, 3.5, 64, 48, 1234, route_reason="rule: photo")
    job = await history.record_queued(requester=Requester(*who), origin=Origin(who[0], channel, "", "", "g1"),
                                      model_asked=None, params=params, created_at=t, nsfw_allowed=nsfw)
    if outcome == "queued":
        return job.id
    n = await history.record_started(job.id, started_at=t + 1, model_id=model, prompt_used=prompt)
    await history.record_attempt_end(job.id, n, outcome="succeeded" if outcome == "succeeded" else "failed",
                                     verdicts=verdicts or {"nsfw": {"flagged": False, "score": 0.02}}, finished_at=t + 2)
    timings = Timings(queue_wait_s=1.0, load_s=0.5, generate_s=1.5, total_s=3.0)
    if outcome == "succeeded":
        await history.record_succeeded(job.id, png=png_bytes(), timings=timings, finished_at=t + 3)
    else:
        await history.record_failed(job.id, error_kind="GenerationError", error_message="it broke", timings=timings,
                                    finished_at=t + 3)
    return job.id


@dataclass
class Site:
    client: TestClient
    history: HistoryStore
    portal: anyio.from_thread.BlockingPortal
    settings: WebSettings

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the loop the history and the app live on."""
        async def call() -> T:
            return await fn(*args, **kwargs)
        return self.portal.call(call)

    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


@contextlib.contextmanager
def site(data_dir: Path, *, token: str | None = TOKEN, engine: Any = None,
         web: dict[str, Any] | None = None, key: bytes | None = KEY) -> Iterator[Site]:
    config = plain_config(data_dir, web)
    settings = load_web_settings(config, {"PROMPTPICS_WEB_TOKEN": token} if token else {})
    with anyio.from_thread.start_blocking_portal() as portal:
        history = portal.call(_open, data_dir)
        try:
            client = TestClient(build_app(config, settings, history, engine, key=key), follow_redirects=False)
            client.portal = portal  # every request on the history's loop
            yield Site(client, history, portal, settings)
        finally:
            portal.call(history.close)


async def _open(data_dir: Path) -> HistoryStore:
    return await HistoryStore.open(data_dir)


def with_every_preview(config: Config) -> Config:
    """Previews at every step, unchecked: the live queue shows one on the tiny twins too."""
    previews = config.previews.model_copy(update={"every_steps": 1, "min_interval_s": 0.0, "policy": "unchecked"})
    return config.model_copy(update={"previews": previews})
