"""The web gallery's reads: one page of jobs for a filter and a full-text search, and the values
the filters offer. The SQL is built here from fixed fragments; user text only ever travels as a
bound parameter (an FTS5 phrase is quoted, never spliced into the statement).

Search (``jobs_fts``, schema v5): each whitespace-separated term must occur in the prompt, as a
substring, case-insensitively. Terms of three characters or more use the trigram index; shorter
ones (an emoji, "ox") cannot, and are checked with ``instr`` on the rows the rest let through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.history.records import StoredJob
from engine.history.store import HistoryStore

OUTCOMES = ("queued", "running", "succeeded", "failed", "cancelled")
MAX_PAGE_SIZE = 200
MAX_TERMS = 16  # a longer search is cut here: every term is one more condition on every row


@dataclass(frozen=True, slots=True)
class GalleryQuery:
    """What one gallery page shows; ``None`` or "" matches everything. Times are unix seconds."""

    text: str = ""
    platform: str | None = None  # with user_id: one requester
    user_id: str | None = None
    model: str | None = None
    channel: str | None = None
    since: float | None = None  # created_at >= since
    until: float | None = None  # created_at < until
    outcome: str | None = None  # one of OUTCOMES
    include_nsfw: bool = False  # jobs asked where adult images were allowed: admins only
    page: int = 1
    page_size: int = 48

    def __post_init__(self) -> None:
        if self.outcome is not None and self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r} must be one of {', '.join(OUTCOMES)}")
        if not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size {self.page_size!r} must be between 1 and {MAX_PAGE_SIZE}")
        if self.page < 1:
            raise ValueError(f"page {self.page!r} must be at least 1")


@dataclass(frozen=True, slots=True)
class GalleryPage:
    jobs: list[StoredJob]
    page: int
    has_next: bool
    query: GalleryQuery = field(repr=False)


@dataclass(frozen=True, slots=True)
class Facets:
    """The values the gallery's filters offer, most used first."""

    models: list[str]
    users: list[tuple[str, str, str]]  # (platform, user_id, latest display name)
    channels: list[tuple[str, str]]  # (platform, channel_id)


def search_terms(text: str) -> tuple[list[str], list[str]]:
    """``text`` -> (FTS5 phrases for terms of 3+ characters, short terms for ``instr``).

    Each long term becomes one quoted phrase with its double quotes doubled, so nothing in it
    (``"``, ``*``, ``AND``, ``NEAR(``, ``'; DROP TABLE``) is read as FTS5 syntax.
    """
    phrases, short = [], []
    for term in text.split()[:MAX_TERMS]:
        if len(term) >= 3:
            phrases.append('"' + term.replace('"', '""') + '"')
        else:
            short.append(term)
    return phrases, short


def build_query(q: GalleryQuery) -> tuple[str, dict[str, Any]]:
    """The SELECT for one page (one row more than the page, to tell whether another follows)."""
    where: list[str] = ["1"]
    args: dict[str, Any] = {}
    phrases, short = search_terms(q.text)
    if phrases:
        where.append("seq IN (SELECT rowid FROM jobs_fts WHERE jobs_fts MATCH :match)")
        args["match"] = " AND ".join(phrases)
    for i, term in enumerate(short):
        where.append(f"instr(lower(prompt), lower(:short{i})) > 0")  # i is our counter, not user text
        args[f"short{i}"] = term
    filters = {"requester_platform": q.platform, "requester_user_id": q.user_id, "model_used": q.model,
               "origin_channel_id": q.channel, "status": q.outcome}
    for column, value in filters.items():
        if value is not None and value != "":
            where.append(f"{column} = :{column}")  # the column names are this module's own
            args[column] = value
    if q.since is not None:
        where.append("created_at >= :since")
        args["since"] = q.since
    if q.until is not None:
        where.append("created_at < :until")
        args["until"] = q.until
    if not q.include_nsfw:
        where.append("nsfw_allowed = 0")
    args["limit"] = q.page_size + 1
    args["offset"] = (q.page - 1) * q.page_size
    sql = f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT :limit OFFSET :offset"
    return sql, args


class Gallery:
    """The gallery's reads on ``store``'s connection (``engine.gallery`` or ``Gallery(history)``)."""

    def __init__(self, store: HistoryStore) -> None:
        self._store = store

    async def page(self, q: GalleryQuery) -> GalleryPage:
        """Newest first; ``q.page_size`` jobs at most."""
        sql, args = build_query(q)
        jobs = await self._store._jobs(sql, args)
        return GalleryPage(jobs[:q.page_size], q.page, len(jobs) > q.page_size, q)

    async def facets(self, *, platform: str | None = None, user_id: str | None = None,
                     include_nsfw: bool = False) -> Facets:
        """Models, requesters and channels seen, within one requester's jobs when given."""
        where = "(:platform IS NULL OR requester_platform = :platform) AND (:user IS NULL OR requester_user_id = :user)"
        where += "" if include_nsfw else " AND nsfw_allowed = 0"
        args = {"platform": platform, "user": user_id}
        models = await self._store._rows(
            f"SELECT model_used FROM jobs WHERE {where} GROUP BY model_used ORDER BY count(*) DESC", args)
        users = await self._store._rows(
            f"SELECT requester_platform, requester_user_id, requester_name, max(seq) FROM jobs WHERE {where}"
            " GROUP BY requester_platform, requester_user_id ORDER BY count(*) DESC LIMIT 200", args)
        channels = await self._store._rows(
            f"SELECT origin_platform, origin_channel_id FROM jobs WHERE {where} AND origin_channel_id != ''"
            " GROUP BY origin_platform, origin_channel_id ORDER BY count(*) DESC LIMIT 200", args)
        return Facets(models=[r[0] for r in models], users=[(r[0], r[1], r[2]) for r in users],
                      channels=[(r[0], r[1]) for r in channels])
