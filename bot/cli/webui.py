"""``promptpics web``: the gallery and dashboard on their own, over the history (docs/WEB.md);
``web_beside``: the same app inside ``promptpics run`` when [web] enabled = true, on its engine;
and the /gallery command's link maker. The web package is imported only when it is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from bot.commands import Actor
from engine import Config, Engine, HistoryStore

if TYPE_CHECKING:
    from web.server import WebServer

GalleryLinks = Callable[[Actor], tuple[str, float]]  # actor -> (URL, expires at)


def add_web_command(subparsers: Any) -> None:
    web = subparsers.add_parser("web", help="serve the gallery and dashboard (127.0.0.1:8765 by default; docs/WEB.md)")
    web.add_argument("--host", help="address to listen on (default: [web] host, 127.0.0.1)")
    web.add_argument("--port", type=int, help="port (default: [web] port, 8765)")
    web.set_defaults(run=cmd_web)


NOT_INSTALLED = ("promptpics: the web gallery needs its extra packages (starlette, uvicorn, ...): "
                 "pip install -e \".[web]\" (docs/WEB.md). Missing: {}")


async def cmd_web(config: Config, args: argparse.Namespace) -> int:
    try:
        from web.app import build_app
        from web.server import WebServer
    except ImportError as exc:
        print(NOT_INSTALLED.format(exc.name), file=sys.stderr)
        return 2
    from web.settings import load_web_settings

    settings = load_web_settings(config, os.environ)
    host, port = args.host or settings.host, settings.port if args.port is None else args.port
    async with HistoryStore.open(config.data_dir, busy_timeout_s=config.history.busy_timeout_s) as history:
        server = WebServer(build_app(config, settings, history), host, port)
        await server.start()
        print(f"promptpics web: http://{host}:{server.port}/ (admin: /login with PROMPTPICS_WEB_TOKEN"
              f"{'' if settings.token else ', which is not set'}); Ctrl+C stops", file=sys.stderr)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        waiting = asyncio.create_task(stop.wait())
        serving = asyncio.create_task(server.wait())
        await asyncio.wait({waiting, serving}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        await server.stop()
    return 0


@contextlib.asynccontextmanager
async def web_beside(config: Config, engine: Engine) -> AsyncIterator[WebServer | None]:
    """Inside ``promptpics run``: serve the app on the running engine when [web] enabled = true."""
    from web.settings import load_web_settings

    settings = load_web_settings(config, os.environ)
    if not settings.enabled:
        yield None
        return
    from web.app import build_app
    from web.server import WebServer

    server = WebServer(build_app(config, settings, engine.history, engine), settings.host, settings.port)
    await server.start()
    print(f"promptpics: the dashboard is on http://{settings.host}:{server.port}/", file=sys.stderr)
    try:
        yield server
    finally:
        await server.stop()


def gallery_links(config: Config) -> GalleryLinks:
    """What /gallery hands out: a signed link to the asker's own images, valid for [web] link_ttl_days."""
    from web.links import gallery_url, load_secret, sign_link
    from web.settings import load_web_settings

    settings = load_web_settings(config, os.environ)  # a broken [web] stops start-up, not the first /gallery
    key: list[bytes] = []

    def make(actor: Actor) -> tuple[str, float]:
        if not key:  # the key file is made on first use, not at start
            key.append(load_secret(config.data_dir))
        ttl_s = settings.link_ttl_days * 86400
        token = sign_link(key[0], actor.platform, actor.user_id, actor.display_name, ttl_s)
        return gallery_url(settings.base_url, token), time.time() + ttl_s

    return make
