"""A small Chrome DevTools Protocol client for the browser test: launch headless Chromium, open
a page, navigate, evaluate JavaScript, take a screenshot. aiohttp's websocket client only
(Playwright's browser download does not work here; Debian's chromium does)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """``PROMPTPICS_CHROMIUM`` or the first Chromium on PATH."""
    given = os.environ.get("PROMPTPICS_CHROMIUM")
    if given:
        return given
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


class Browser:
    """``async with Browser(executable, profile_dir) as b: page = await b.new_page()``."""

    def __init__(self, executable: str, profile_dir: Path) -> None:
        self._executable, self._profile = executable, profile_dir
        self._proc: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Browser:
        self._proc = await asyncio.create_subprocess_exec(
            self._executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={self._profile}",
            "--window-size=1280,900", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        url = await self._devtools_url()
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(url, max_msg_size=64 * 2**20)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _devtools_url(self) -> str:
        assert self._proc is not None and self._proc.stderr is not None
        async with asyncio.timeout(60):
            while line := (await self._proc.stderr.readline()).decode(errors="replace"):
                if match := re.search(r"DevTools listening on (ws://\S+)", line):
                    return match[1]
        raise RuntimeError("Chromium exited before it opened its DevTools port")

    async def __aexit__(self, *exc: object) -> None:
        if self._reader:
            self._reader.cancel()
        if self._ws:
            await self._ws.close()
        if self._http:
            await self._http.close()
        if self._proc and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            data = json.loads(msg.data)
            if "id" in data and (fut := self._waiting.pop(data["id"], None)) and not fut.done():
                if "error" in data:
                    fut.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                else:
                    fut.set_result(data.get("result", {}))
            elif "method" in data:
                for fut in self._events.pop(f"{data.get('sessionId', '')}:{data['method']}", []):
                    if not fut.done():
                        fut.set_result(data.get("params", {}))

    async def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        assert self._ws is not None
        call_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = fut
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        await self._ws.send_str(json.dumps(message))
        return await fut

    def expect(self, session: str, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``method`` event of ``session``: make it before the action."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._events.setdefault(f"{session}:{method}", []).append(fut)
        return fut

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        await page.call("Page.enable")
        await page.call("Runtime.enable")
        return page


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self._browser, self._session = browser, session

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._browser.send(method, params, self._session)

    async def goto(self, url: str) -> None:
        loaded = self._browser.expect(self._session, "Page.loadEventFired")
        await self.call("Page.navigate", {"url": url})
        await loaded

    async def run(self, expression: str) -> Any:
        """Evaluate JavaScript in the page; returns its (JSON) value."""
        answer = await self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in answer:
            raise RuntimeError(f"JavaScript failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def submit(self, expression: str) -> None:
        """Run ``expression`` (which submits a form or clicks a link) and wait for the next page."""
        loaded = self._browser.expect(self._session, "Page.loadEventFired")
        await self.run(expression)
        await loaded

    async def wait_for(self, expression: str, timeout_s: float = 60) -> Any:
        """Until ``expression`` is truthy in the page (re-checked every animation frame)."""
        return await self.run(f"""new Promise((resolve, reject) => {{
            const t0 = performance.now();
            const check = () => {{
                const v = ({expression});
                if (v) return resolve(v);
                if (performance.now() - t0 > {timeout_s * 1000}) return reject(new Error("timed out: " + {json.dumps(expression)}));
                requestAnimationFrame(check);
            }};
            check();
        }})""")

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(shot["data"]))
