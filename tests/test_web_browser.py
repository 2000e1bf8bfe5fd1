"""A real browser on the dashboard: headless Chromium (Debian's `chromium`, installed by .ci/run)
driven over the DevTools protocol (tests/cdp.py) logs in, opens the gallery, searches, opens a
job page, and watches a job's progress arrive live on the queue page; screenshots of the gallery
and the dashboard are saved in the test's tmp folder. Without Chromium the test is skipped and
says why (`pytest -rs`)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine import Engine, JobRequest, Requester
from tests.cdp import Browser, find_chromium
from tests.conftest import make_tiny_config
from tests.webkit import KEY, TOKEN, with_every_preview
from web.app import build_app
from web.server import WebServer
from web.settings import load_web_settings

CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium here: install Debian's `chromium` "
                       "(.ci/run does, as root) or set PROMPTPICS_CHROMIUM to a Chromium/Chrome executable"),
]


async def test_a_browser_logs_in_searches_opens_a_job_and_sees_progress_live(tiny_models: Any, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    config = with_every_preview(make_tiny_config(tiny_models, tmp_path / "data"))
    settings = load_web_settings(config, {"PROMPTPICS_WEB_TOKEN": TOKEN})
    async with Engine(config) as engine:
        first = await engine.submit(JobRequest("a lighthouse at dusk", steps=2, width=64, height=64,
                                               requester=Requester("cli", "u1", "Ulla")))
        await engine.submit(JobRequest("a crowded harbour", steps=2, width=64, height=64))
        await asyncio.wait_for(first.result(), 120)
        server = WebServer(build_app(config, settings, engine.history, engine, key=KEY), "127.0.0.1", 0)
        await server.start()
        base = f"http://127.0.0.1:{server.port}"
        try:
            async with asyncio.timeout(240), Browser(CHROMIUM, tmp_path / "chromium") as browser:
                page = await browser.new_page()
                # 1. log in through the form (a session cookie, the CSRF token in the form)
                await page.goto(f"{base}/login")
                await page.submit(f"document.querySelector('input[name=token]').value = {TOKEN!r};"
                                  "document.querySelector('form.login').submit()")
                assert await page.run("location.pathname") == "/"
                await page.wait_for(f"document.querySelector('[data-job=\"{first.id}\"] img')?.complete")
                await page.screenshot(tmp_path / "gallery.png")
                # 2. search
                await page.submit("document.querySelector('input[name=q]').value = 'lighthouse';"
                                  "document.getElementById('filters').submit()")
                found = await page.run("[...document.querySelectorAll('[data-job]')].map(a => a.dataset.job)")
                assert found == [first.id]
                # 3. the job page
                await page.submit("document.querySelector('[data-job]').click()")
                assert await page.run("document.getElementById('prompt').textContent") == "a lighthouse at dusk"
                command = await page.run("document.getElementById('command').textContent")
                assert command.startswith("/imagine a lighthouse at dusk --model ")
                assert await page.run("document.getElementById('image').naturalWidth") == 64
                # 4. the live queue: a job submitted now shows up running, its progress arrives step by step
                await page.goto(f"{base}/queue")
                await page.wait_for("document.getElementById('waiting').textContent.includes('empty')")
                live = await engine.submit(JobRequest("a slow storm at sea", steps=40, width=64, height=64))
                await page.wait_for(f"document.getElementById('running').dataset.job === {live.id!r}")
                step = await page.wait_for("Number(document.getElementById('progress').value) >= 1 && "
                                           "document.getElementById('progress').dataset.step")
                assert step.endswith("/40")
                await page.wait_for("!document.getElementById('preview').hidden && "
                                    "document.getElementById('preview').naturalWidth > 0")
                await page.screenshot(tmp_path / "dashboard.png")
                await asyncio.wait_for(live.result(), 180)
                await page.wait_for("document.getElementById('running').dataset.job === ''")
        finally:
            await server.stop()
    assert (tmp_path / "gallery.png").stat().st_size > 1000
    assert (tmp_path / "dashboard.png").stat().st_size > 1000
