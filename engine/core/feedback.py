"""The engine's side of routing feedback: record a user's choice (best effort), and start the
router with what ``router learn`` applied. Engine's ``record_feedback`` and ``record_switch`` call here."""

from __future__ import annotations

import logging
from typing import Any

from engine.history import HistoryError, RoutingFeedback, StoredJob
from engine.jobs import JobRequest
from engine.router.learn import learned_for_router

log = logging.getLogger(__name__)


async def record_quietly(feedback: RoutingFeedback, kind: str, **fields: Any) -> bool:
    """Record one row; a history error is logged and swallowed: feedback must never cost a user their job."""
    try:
        return await feedback.record(kind, **fields)
    except HistoryError:
        log.warning("routing feedback (%s) not recorded", kind, exc_info=True)
        return False


def switch_fields(job: StoredJob, chosen_model: str, user_key: str) -> dict[str, Any] | None:
    """A switch by reaction on ``job``'s result; None when it is no switch (the same model)."""
    if chosen_model == job.params.model_id:
        return None
    return {"prompt": job.params.prompt, "chosen_model": chosen_model, "from_model": job.params.model_id,
            "router_pick": job.params.model_id if job.model_asked is None else None,
            "server_id": job.origin.server_id, "job_id": job.id, "user_key": user_key}


def explicit_fields(job_id: str, request: JobRequest, prompt: str, chosen_model: str) -> dict[str, Any]:
    """An explicit --model at submit: the router was not asked (router_pick None)."""
    return {"prompt": prompt, "chosen_model": chosen_model, "server_id": request.origin.server_id,
            "job_id": job_id, "user_key": f"{request.requester.platform}:{request.requester.user_id}"}


async def start_with_learned(router: Any, feedback: RoutingFeedback) -> int:
    """Hand the router the learned examples and thresholds (a router without ``use_learned``, a
    test's fake, is left alone). Returns how many learned examples it got."""
    use = getattr(router, "use_learned", None)
    if use is None:
        return 0
    learned, thresholds = await learned_for_router(feedback, router.settings)
    if not learned and not thresholds:
        return 0
    use(learned, thresholds)
    count = sum(len(texts) for texts in learned.values())
    log.info("router: %d learned example(s) from the community in use", count)
    return count
