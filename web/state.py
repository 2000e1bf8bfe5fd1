"""What every request handler reads: the history, the engine (when this process runs one), the
settings, the signing key and the templates (``request.app.state.web``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

from engine import Config, Engine, Gallery, HistoryStore, HistoryTimeline
from web.access import Viewer
from web.present import FILTERS
from web.settings import WebSettings

HERE = Path(__file__).resolve().parent


@dataclass
class WebState:
    """What every handler reads (``request.app.state.web``)."""

    config: Config
    settings: WebSettings
    history: HistoryStore
    engine: Engine | None  # None: `promptpics web` beside a bot (no live queue, no actions)
    key: bytes  # signs members' links (web/links.py)
    gallery: Gallery = field(init=False)
    timeline: HistoryTimeline = field(init=False)
    templates: Environment = field(init=False)

    def __post_init__(self) -> None:
        self.gallery = Gallery(self.history)
        self.timeline = HistoryTimeline(self.history)
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"),
                                     autoescape=select_autoescape(["html"]), enable_async=False)
        self.templates.filters.update(FILTERS)

    def render(self, name: str, viewer: Viewer | None, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(viewer=viewer, has_engine=self.engine is not None, **context)
        return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


SECURITY_HEADERS = {
    # everything is served from here: no CDN, no inline script, no framing by other sites
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a member's signed link must not leak to another site
}


def state_of(request: Request) -> WebState:
    state: WebState = request.app.state.web
    return state
