"""Serving the app with uvicorn inside our own event loop: beside the bot in `promptpics run`
(same process, same engine) or on its own in `promptpics web`. The caller owns the signals:
uvicorn's own handlers are left out, and ``stop`` ends the server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator

import uvicorn
from starlette.types import ASGIApp

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # SIGINT/SIGTERM belong to the caller (bot/cli/serve.py): it sets ``stop``


class WebServer:
    """``await server.start()`` binds (errors such as a port in use surface there), ``await server.stop()``."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                                server_header=False, timeout_graceful_shutdown=2)
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        servers = getattr(self._server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self._server.config.port)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="web")
        while not self._server.started:
            if self._task.done():  # bind failed: uvicorn logged why and exited
                self._task.result()
                raise OSError(f"the web server could not listen on {self._server.config.host}:{self._server.config.port}")
            await asyncio.sleep(0.02)
        log.info("web: serving on http://%s:%d", self._server.config.host, self.port)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, SystemExit):
                await self._task

    async def wait(self) -> None:
        if self._task is not None:
            await self._task
