"""Plain data the history returns (a job, an attempt, a delivery row), job ids, and the
translation of requests and verdicts into column values."""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.jobs import GenerationParams, JobStatus, Origin, Requester, Timings

ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no 0/o and 1/l: easy to read out and type
ID_LENGTH = 6  # 32**6 ~ 10**9 ids; a collision is rare and retried on insert


@dataclass(frozen=True, slots=True)
class StoredJob:
    id: str
    seq: int
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    requester: Requester
    origin: Origin
    model_asked: str | None  # None: the router chose
    params: GenerationParams  # params.model_id is the model used
    image_path: Path | None  # absolute; None until succeeded, or after pruning
    error_kind: str | None
    error_message: str | None
    timings: Timings
    attempt_count: int
    nsfw_allowed: bool = False  # the channel allowed adult images when the job was asked


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    job_id: str
    n: int  # 1-based
    model_id: str
    prompt_used: str
    started_at: float
    finished_at: float | None
    outcome: str | None  # one of ATTEMPT_OUTCOMES; None while running
    verdicts: dict[str, dict[str, Any]]  # detector -> {"flagged": bool, "score": float | None}
    retry_reason: str | None
    worker: str = ""  # which GPU worker ran it ("gpu" embedded; "w0", "w1", ... on Ray; "" before schema v8)


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    job_id: str
    platform: str
    channel_id: str
    message_id: str
    kind: str  # 'status' | 'result'
    created_at: float


def new_job_id() -> str:
    """A fresh random id such as ``k7mq2x``; uniqueness is checked on insert."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


# -- column values --------------------------------------------------------------------------


def requester_values(r: Requester) -> dict[str, Any]:
    return {"requester_platform": r.platform, "requester_user_id": r.user_id,
            "requester_name": r.display_name}


def origin_values(o: Origin) -> dict[str, Any]:
    return {"origin_platform": o.platform, "origin_channel_id": o.channel_id,
            "origin_thread_id": o.thread_id, "origin_message_ref": o.message_ref, "origin_server_id": o.server_id}


def params_values(p: GenerationParams) -> dict[str, Any]:
    return {"prompt": p.prompt, "negative_prompt": p.negative_prompt, "model_used": p.model_id,
            "route_reason": p.route_reason, "steps": p.steps, "guidance": p.guidance,
            "width": p.width, "height": p.height, "seed": p.seed}


def verdicts_json(verdicts: Mapping[str, Any] | None) -> str | None:
    """Detector name -> {"flagged": bool, "score": float | None}, as JSON text SQLite can query."""
    if verdicts is None:
        return None
    return json.dumps({str(name): _verdict(v) for name, v in verdicts.items()}, sort_keys=True)


def _verdict(v: Any) -> dict[str, Any]:
    flagged, score = (v.get("flagged"), v.get("score")) if isinstance(v, Mapping) else (
        getattr(v, "flagged"), getattr(v, "score", None))
    score = None if score is None or not math.isfinite(float(score)) else float(score)
    return {"flagged": bool(flagged), "score": score}

