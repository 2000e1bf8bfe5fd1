"""The web app: ``build_app`` wires the state (history, engine, settings, signing key), the
routes of pages.py and dashboard.py, sessions, templates and static files into one Starlette app.

Errors: an ``HTTPException`` becomes a small HTML page (or plain text for /metrics and scripts)
carrying its sentence; anything else is logged with its traceback and answered 500 without one.
"""

from __future__ import annotations

import hashlib
import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from engine import Config, Engine, HistoryStore
from web import dashboard, pages
from web.links import load_secret
from web.settings import WebSettings
from web.state import HERE, WebState, state_of

log = logging.getLogger(__name__)
SESSION_COOKIE = "promptpics_session"


def build_app(config: Config, settings: WebSettings, history: HistoryStore, engine: Engine | None = None,
              *, key: bytes | None = None) -> Starlette:
    state = WebState(config, settings, history, engine, key if key is not None else load_secret(history.data_dir))
    routes = [*pages.routes(), *dashboard.routes(),
              Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static")]
    session_key = hashlib.sha256(b"promptpics-web-session:" + state.key).hexdigest()  # not the link key itself
    middleware = [Middleware(SessionMiddleware, secret_key=session_key, session_cookie=SESSION_COOKIE,
                             max_age=int(settings.session_hours * 3600), same_site="strict",
                             https_only=settings.secure_cookies)]
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.web = state
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if request.url.path == "/metrics" or "text/html" not in request.headers.get("accept", "text/html"):
        return PlainTextResponse(exc.detail + "\n", status_code=exc.status_code, headers=exc.headers)
    return state_of(request).render("error.html", None, exc.status_code, status=exc.status_code, message=exc.detail)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("web: %s %s failed", request.method, request.url.path, exc_info=exc)
    return PlainTextResponse("Sorry, something went wrong; the admin's log has the details.\n", status_code=500)
