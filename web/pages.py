"""The history's pages, for an admin (``/``, ``/job/ID``) and for a member's signed link
(``/g/<token>``, ``/g/<token>/job/ID``): the gallery with its filters and search, one job in
full, the PNG download and the cached thumbnail; and the login form.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from engine import GalleryQuery, JobStatus, StoredJob
from web.access import Viewer, admin_viewer, check_csrf, csrf_token, log_in, member_viewer, require_admin
from web.present import imagine_command, routing_text, verdict_text
from web.state import WebState, state_of
from web.thumbs import thumbnail

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_PAGE = 10_000
OUTCOMES = tuple(s.value for s in JobStatus)


def routes() -> list[BaseRoute]:
    return [
        Route("/", admin_gallery), Route("/job/{job_id}", admin_job),
        Route("/image/{job_id}.png", admin_image), Route("/thumb/{job_id}.jpg", admin_thumb),
        Route("/g/{link}", member_gallery), Route("/g/{link}/job/{job_id}", member_job),
        Route("/g/{link}/image/{job_id}.png", member_image), Route("/g/{link}/thumb/{job_id}.jpg", member_thumb),
        Route("/login", login_form, methods=["GET"]), Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]


# -- who: each route asks once, then shares the code below -----------------------------------------


def _admin(request: Request) -> tuple[WebState, Viewer]:
    state = state_of(request)
    return state, require_admin(request, state.settings)


def _member(request: Request) -> tuple[WebState, Viewer]:
    state = state_of(request)
    return state, member_viewer(request, state.key, request.path_params["link"])


async def admin_gallery(request: Request) -> Response:
    return await _gallery(request, *_admin(request))


async def member_gallery(request: Request) -> Response:
    return await _gallery(request, *_member(request))


async def admin_job(request: Request) -> Response:
    return await _job(request, *_admin(request))


async def member_job(request: Request) -> Response:
    return await _job(request, *_member(request))


async def admin_image(request: Request) -> Response:
    return await _image(request, *_admin(request))


async def member_image(request: Request) -> Response:
    return await _image(request, *_member(request))


async def admin_thumb(request: Request) -> Response:
    return await _thumb(request, *_admin(request))


async def member_thumb(request: Request) -> Response:
    return await _thumb(request, *_member(request))


# -- the gallery ---------------------------------------------------------------------------------


def gallery_query(params: Any, viewer: Viewer, page_size: int) -> GalleryQuery:
    """The query string -> a GalleryQuery; a member's is pinned to their own jobs, adult ones never."""
    user = params.get("user", "")
    platform, _, user_id = user.partition(":") if user else ("", "", "")
    if viewer.member is not None:
        platform, user_id = viewer.member.platform, viewer.member.user_id
    outcome = params.get("outcome") or None
    if outcome is not None and outcome not in OUTCOMES:
        raise HTTPException(400, f"outcome {outcome!r} must be one of {', '.join(OUTCOMES)}.")
    since, until = _day(params, "from"), _day(params, "to")
    return GalleryQuery(
        text=params.get("q", "")[:500], platform=platform or None, user_id=user_id or None,
        model=params.get("model") or None, channel=params.get("channel") or None,
        since=None if since is None else _midnight(since),
        until=None if until is None else _midnight(until + timedelta(days=1)),
        outcome=outcome, include_nsfw=viewer.admin, page=_page(params), page_size=page_size)


def _day(params: Any, name: str) -> date | None:
    value = params.get(name, "")
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise HTTPException(400, f"{name} is {value[:40]!r}, but it must be a date such as 2026-12-01.") from None


def _midnight(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()


def _page(params: Any) -> int:
    value = params.get("page", "1")
    if not value.isdigit() or not 1 <= int(value) <= MAX_PAGE:
        raise HTTPException(400, f"page is {value[:20]!r}, but it must be a whole number from 1 to {MAX_PAGE}.")
    return int(value)


async def _gallery(request: Request, state: WebState, viewer: Viewer) -> Response:
    query = gallery_query(request.query_params, viewer, state.settings.page_size)
    page = await state.gallery.page(query)
    m = viewer.member
    facets = await state.gallery.facets(platform=m.platform if m else None, user_id=m.user_id if m else None,
                                        include_nsfw=viewer.admin)
    kept = {k: v for k, v in request.query_params.items() if k != "page" and v}
    return state.render("gallery.html", viewer, page=page, facets=facets, filters=kept, outcomes=OUTCOMES)


# -- one job -------------------------------------------------------------------------------------


async def visible_job(state: WebState, viewer: Viewer, job_id: str) -> StoredJob:
    """The job if this viewer may see it; else 404, whether it is missing or someone else's."""
    job = await state.history.get_job(job_id.lower()) if _JOB_ID.fullmatch(job_id) else None
    if job is None or not _may_see(viewer, job):
        raise HTTPException(404, f"There is no job {job_id[:64]!r} here.")
    return job


def _may_see(viewer: Viewer, job: StoredJob) -> bool:
    m = viewer.member
    if m is None:
        return True
    return (job.requester.platform, job.requester.user_id) == (m.platform, m.user_id) and not job.nsfw_allowed


async def _job(request: Request, state: WebState, viewer: Viewer) -> Response:
    job = await visible_job(state, viewer, request.path_params["job_id"])
    attempts = await state.history.attempts(job.id)
    has_image = job.image_path is not None and job.image_path.is_file()
    return state.render("job.html", viewer, job=job, attempts=attempts, has_image=has_image,
                        command=imagine_command(job), routing=routing_text(job), verdicts=verdict_text,
                        model_name=_model_name(state, job.params.model_id))


def _model_name(state: WebState, model_id: str) -> str:
    spec = state.config.models.get(model_id)
    return spec.display_name if spec else model_id


async def _image(request: Request, state: WebState, viewer: Viewer) -> Response:
    job = await visible_job(state, viewer, request.path_params["job_id"])
    if job.image_path is None or not job.image_path.is_file():
        raise HTTPException(404, f"Job {job.id} has no image (it failed, or its image was pruned).")
    # The PNG as the history keeps it, with its text chunks (prompt, model, seed: the metadata).
    return FileResponse(job.image_path, media_type="image/png", filename=f"promptpics-{job.id}.png",
                        content_disposition_type="attachment" if "download" in request.query_params else "inline")


async def _thumb(request: Request, state: WebState, viewer: Viewer) -> Response:
    job = await visible_job(state, viewer, request.path_params["job_id"])
    if job.image_path is None or not job.image_path.is_file():
        raise HTTPException(404, f"Job {job.id} has no image.")
    path = await thumbnail(job.image_path, state.settings.thumb_side)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


# -- login ---------------------------------------------------------------------------------------


async def login_form(request: Request) -> Response:
    state = state_of(request)
    if admin_viewer(request, state.settings) is not None:
        return RedirectResponse("/", status_code=303)
    return state.render("login.html", None, csrf=csrf_token(request), configured=state.settings.token is not None)


async def login(request: Request) -> Response:
    state = state_of(request)
    form = await check_csrf(request, Viewer(member=None, base="", csrf=csrf_token(request)))
    if not log_in(request, state.settings, form.get("token", "")):
        return state.render("login.html", None, 403, csrf=csrf_token(request),
                            configured=state.settings.token is not None, failed=True)
    return RedirectResponse("/", status_code=303)


async def logout(request: Request) -> Response:
    state = state_of(request)
    viewer = require_admin(request, state.settings)
    await check_csrf(request, viewer)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)
