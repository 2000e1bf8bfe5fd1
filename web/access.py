"""Who is looking: an admin (session cookie from the login form, or ``Authorization: Bearer``) or a
member holding a signed gallery link; and the CSRF check on every form POST of a session.

Rules (docs/WEB.md): nothing from the history without one of the two (403); a member sees only
their own jobs, never one asked where adult images were allowed; an unknown id, or one the
viewer may not see, is 404 (a member cannot tell another's job from a missing one).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.requests import Request

from web.links import LinkError, Member, verify_link
from web.settings import WebSettings

log = logging.getLogger(__name__)
SESSION_KEY = "admin"
CSRF_KEY = "csrf"


@dataclass(frozen=True, slots=True)
class Viewer:
    """An admin (``member`` None) or one member; ``base`` prefixes every URL of their pages."""

    member: Member | None
    base: str  # "" for an admin, "/g/<token>" for a member
    csrf: str = ""  # the session's CSRF token ("" for a bearer or a member: they post no forms)

    @property
    def admin(self) -> bool:
        return self.member is None


def fingerprint(token: str) -> str:
    """What a session keeps of the token: a changed token ends every session."""
    return hashlib.sha256(b"promptpics-web-admin:" + token.encode()).hexdigest()[:32]


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use (the login form has one too)."""
    token = request.session.get(CSRF_KEY)
    if not isinstance(token, str) or len(token) < 16:
        token = secrets.token_urlsafe(24)
        request.session[CSRF_KEY] = token
    return token


def bearer_ok(request: Request, settings: WebSettings) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if settings.token is None or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), settings.token.encode())


def admin_viewer(request: Request, settings: WebSettings) -> Viewer | None:
    if settings.token is None:
        return None
    if bearer_ok(request, settings):
        return Viewer(member=None, base="")
    kept = request.session.get(SESSION_KEY)
    if isinstance(kept, str) and hmac.compare_digest(kept, fingerprint(settings.token)):
        return Viewer(member=None, base="", csrf=csrf_token(request))
    return None


def require_admin(request: Request, settings: WebSettings) -> Viewer:
    viewer = admin_viewer(request, settings)
    if viewer is None:
        raise HTTPException(403, "This page needs the admin login (or an Authorization: Bearer token).")
    return viewer


def member_viewer(request: Request, key: bytes, token: str) -> Viewer:
    try:
        member = verify_link(key, token)
    except LinkError as exc:  # one line for the admin; never the token itself
        log.info("web: gallery link refused from %s: %s", request.client.host if request.client else "?", exc)
        raise HTTPException(403, str(exc)) from None
    return Viewer(member=member, base=f"/g/{token}")


def log_in(request: Request, settings: WebSettings, given: str) -> bool:
    if settings.token is None or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
        return False
    request.session.clear()
    request.session[SESSION_KEY] = fingerprint(settings.token)
    csrf_token(request)  # a fresh one for the new session
    return True


async def check_csrf(request: Request, viewer: Viewer) -> dict[str, str]:
    """The POSTed form, once its CSRF token matches the session's (a bearer caller needs none)."""
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    if bearer_ok(request, _settings(request)):
        return form
    given = form.get("csrf", "")
    if not viewer.csrf or not hmac.compare_digest(given.encode(), viewer.csrf.encode()):
        raise HTTPException(403, "The form was stale or came from another site (CSRF check); reload the page and try again.")
    return form


def _settings(request: Request) -> WebSettings:
    settings: WebSettings = request.app.state.web.settings
    return settings
