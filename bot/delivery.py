"""Engine events -> the platform that asked: status messages, throttled progress, results.

The engine speaks plain data; this module keeps the link between a job id and the platform
messages that show it (in the history's ``deliveries`` table, so reactions keep working after
a restart). Each platform plugs in an ``Outlet`` (bot/outlet.py); one ``Delivery`` serves them
all from one subscription to the engine, made *before* the engine is entered so that jobs taken
back from the history after a restart (``JobQueued(resumed=True)``) reach their original channel too.

One small task per live job handles that job's events in order, so a slow platform call for
one job never holds up another's. When the queue moves, the engine publishes one ``QueueMoved``
with every waiting job's place and ETA (from one cached plan); the first
``POSITION_UPDATES_UP_TO`` jobs get it in their inbox. Nothing here asks the engine for a plan.

Previews (``JobPreviewed``) ride on the status edits, under the same throttle: the latest
preview goes out with the next edit. An outlet shows them if it has the optional method
``edit_status_with_preview`` (see ``Outlet``); one without it shows text only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from cachetools import LRUCache

from bot import messages
from bot.commands import Commands
from bot.outlet import MessageGone, MessageRef, Outlet, Picture, PreviewPicture
from bot.posting import ResultNotPosted, ResultPoster
from engine import (
    EngineEvent,
    JobCancelled,
    JobEvent,
    JobFailed,
    JobFinished,
    JobPreviewed,
    JobProgressed,
    JobQueued,
    JobStarted,
    JobStatus,
    QueueMoved,
    StoredJob,
)

log = logging.getLogger(__name__)

JOBS_REMEMBERED = 5000  # jobs whose delivery began, and whether it settled
CATCH_UP_WINDOW_S = 24 * 3600  # results finished but never recorded as posted are posted at start
CATCH_UP_JOBS = 50
POSITION_UPDATES_UP_TO = 10  # queued jobs further back are not re-edited each time the queue moves
ETA_CHANGE_SHOWN = (10.0, 0.25)  # a queued job's ETA is re-edited when it moves this much (s, share)


@dataclass(frozen=True, slots=True)
class _Moved:
    """For a queued job's inbox: its place and ETA in the queue's latest plan."""

    position: int
    eta_s: float | None


@dataclass(eq=False)
class _Track:
    job: StoredJob
    outlet: Outlet
    interval_s: float
    status: MessageRef | None = None
    last_edit: float = -math.inf
    pending: str | None = None  # an edit held back by the throttle, shown when it allows
    position: int = 0
    started: float | None = None
    unpostable: bool = False  # posting the status failed: retry only for the final word, not every step
    eta_s: float | None = None  # the ETA the status message shows
    text: str = ""  # the text shown (or held back) last
    preview: JobPreviewed | None = None  # arrived, not shown yet (withdrawn: remove the one shown)
    preview_shown: bool = False  # the status message carries a preview image now


class Delivery:
    """``delivery.attach()`` before ``async with engine``; then run ``delivery.run()`` as a task."""

    def __init__(self, commands: Commands, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._commands = commands
        self._engine = commands.engine
        self._clock = clock
        self._outlets: dict[str, Outlet] = {}
        self._events: asyncio.Queue[EngineEvent] | None = None
        self._inboxes: dict[str, asyncio.Queue[JobEvent | _Moved]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._seen: LRUCache[str, bool] = LRUCache(maxsize=JOBS_REMEMBERED)  # job id -> settled
        self._changed = asyncio.Condition()
        self._poster = ResultPoster(self._engine)

    def add_outlet(self, outlet: Outlet) -> None:
        self._outlets[outlet.platform] = outlet
        self._commands.groups.add_outlet(outlet)  # contact sheets of /compare and /sweep go out through it too

    def attach(self) -> None:
        """Subscribe to the engine's events; call before entering the engine."""
        if self._events is None:
            self._events = self._engine.subscribe()

    # -- the main loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: route each event to its job's task. Needs the engine entered."""
        self.attach()
        assert self._events is not None
        catching_up: asyncio.Task[None] | None = None
        try:
            self._route_waiting()  # jobs taken back at start are known before catching up
            # In the background: a platform still connecting must not hold up the others' events.
            catching_up = asyncio.create_task(self._catch_up(), name="delivery-catch-up")
            while True:
                self._route(await self._events.get())
        finally:
            if catching_up is not None:
                catching_up.cancel()
            self._engine.unsubscribe(self._events)
            self._events = None

    async def drain(self, timeout_s: float) -> None:
        """Let every job task finish its queued work (at shutdown, after the engine stopped)."""
        self._route_waiting()
        if self._workers:
            await asyncio.wait(set(self._workers), timeout=timeout_s)

    async def settled(self, job_id: str) -> None:
        """Wait until ``job_id``'s final event has been shown (the terminal waits on this)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._seen.get(job_id, False))

    def _route_waiting(self) -> None:
        while self._events is not None and not self._events.empty():
            self._route(self._events.get_nowait())

    def _route(self, event: EngineEvent) -> None:
        if isinstance(event, QueueMoved):
            self._route_moves(event)
            return
        inbox = self._inboxes.get(event.job_id)
        if inbox is None:
            if self._seen.get(event.job_id):
                return  # settled already; a late duplicate
            inbox = self._inboxes[event.job_id] = asyncio.Queue()
            self._remember(event.job_id, settled=False)
            task = asyncio.create_task(self._work(event.job_id, inbox), name=f"deliver-{event.job_id}")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
        inbox.put_nowait(event)

    def _route_moves(self, event: QueueMoved) -> None:
        """Jobs near the front are told their new place; further back they are not edited each
        time the queue moves (their status says where they were when queued)."""
        for place in event.places[:POSITION_UPDATES_UP_TO]:
            inbox = self._inboxes.get(place.job_id)
            if inbox is not None:
                inbox.put_nowait(_Moved(place.position, place.eta_s))

    def _remember(self, job_id: str, *, settled: bool) -> None:
        self._seen[job_id] = settled

    # -- one job -----------------------------------------------------------------------------

    async def _work(self, job_id: str, inbox: asyncio.Queue[JobEvent | _Moved]) -> None:
        try:
            job = await self._engine.history.get_job(job_id)
            outlet = self._outlets.get(job.origin.platform) if job else None
            if job is None or outlet is None:
                log.debug("job %s: no outlet for its platform here; not shown", job_id)
                while not isinstance(await inbox.get(), JobFinished | JobFailed | JobCancelled):
                    pass
                return
            interval = outlet.progress_interval_s
            track = _Track(job, outlet, self._commands.settings.progress_interval_s if interval is None else interval)
            while True:
                event = await self._next(track, inbox)
                if event is None:
                    continue
                try:
                    if await self._handle(track, event):
                        return
                except Exception:  # one boundary per job: log it, keep the bot and the other jobs going
                    log.exception("job %s: could not be shown on %s", job_id, outlet.platform)
                    if isinstance(event, JobFinished | JobFailed | JobCancelled):
                        return
                    track.unpostable = track.status is None
        finally:
            self._inboxes.pop(job_id, None)
            self._remember(job_id, settled=True)
            async with self._changed:
                self._changed.notify_all()

    async def _next(self, track: _Track, inbox: asyncio.Queue[JobEvent | _Moved]) -> JobEvent | _Moved | None:
        """The next event; or None after showing a held-back edit once the throttle allows."""
        if track.pending is None:
            return await inbox.get()
        remaining = track.last_edit + track.interval_s - self._clock()
        if remaining > 0:
            try:
                return await asyncio.wait_for(inbox.get(), remaining)
            except TimeoutError:
                pass
        text, track.pending = track.pending, None
        await self._show(track, text, force=True)
        return None

    async def _handle(self, track: _Track, event: JobEvent | _Moved) -> bool:
        """Show one event; True when it was the job's last."""
        job, c = track.job, self._commands
        match event:
            case JobQueued(position=position, params=params, resumed=resumed, eta_s=eta_s):
                # queued again after a GPU worker was lost under it: waiting once more, not running
                track.position, track.eta_s, track.started = position, eta_s, None
                if resumed:
                    track.status = await self._existing_status(job, track.outlet)
                await self._show(track, messages.status_queued(
                    job_id=job.id, mention=self._mention(track), params=params, model_name=c.model_name(params.model_id),
                    position=position, eta_s=eta_s, resumed=resumed), force=True)
            case _Moved(position=position, eta_s=eta_s) if track.started is None and track.status is not None:
                if position != track.position or _eta_moved(track.eta_s, eta_s):
                    track.position, track.eta_s = position, eta_s
                    await self._show(track, messages.status_queued(
                        job_id=job.id, mention=self._mention(track), params=job.params,
                        model_name=c.model_name(job.params.model_id), position=position, eta_s=eta_s))
            case JobStarted(model_id=model_id):
                track.started = self._clock()
                await self._show(track, messages.status_running(
                    job_id=job.id, mention=self._mention(track), params=job.params, model_name=c.model_name(model_id)))
            case JobProgressed(step=step, total=total):
                elapsed = None if track.started is None else self._clock() - track.started
                await self._show(track, messages.status_running(
                    job_id=job.id, mention=self._mention(track), params=job.params,
                    model_name=c.model_name(job.params.model_id), step=step, total=total, elapsed_s=elapsed,
                    left_s=self._eta(job.id) if step < total else None))
            case JobPreviewed() as preview:
                if _preview_editor(track.outlet) is None:
                    return False
                if preview.withdrawn and not track.preview_shown:
                    track.preview = None  # nothing shown yet: drop the one waiting, if any
                    return False
                track.preview = preview
                if track.status is not None:
                    await self._show(track, track.pending or track.text)
            case JobFinished(result=result):
                t = result.timings
                caption = messages.caption(job_id=job.id, mention=self._mention(track), params=result.params,
                                           model_name=c.model_name(result.params.model_id), timings=t,
                                           notice=result.notice)
                track.pending = None
                await self._post_result(track.outlet, job, Picture(result.png, result.image_path), caption,
                                        result.params.model_id, track.status)
                return True
            case JobFailed(error_kind=kind, message=message):
                build = messages.status_stopped if kind == "EngineStopped" else messages.status_failed
                track.pending = None
                self._withdraw_preview(track)  # no image came of it: the preview goes too
                await self._show(track, build(job_id=job.id, mention=self._mention(track), message=message), force=True)
                return True
            case JobCancelled():
                track.pending = None
                self._withdraw_preview(track)
                await self._show(track, messages.status_cancelled(job_id=job.id, mention=self._mention(track)), force=True)
                return True
        return False

    async def _show(self, track: _Track, text: str, *, force: bool = False) -> None:
        """Post the status message, or edit it at most once per interval (``force``: wait for it).
        A preview that arrived since the last edit goes out with this one."""
        outlet, job = track.outlet, track.job
        track.text = text
        if track.status is None and track.unpostable and not force:
            return
        if track.status is not None:
            wait = track.last_edit + track.interval_s - self._clock()
            if wait > 0 and not force:
                track.pending = text
                return
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self._edit(track, text)
                track.last_edit, track.pending = self._clock(), None
                return
            except MessageGone:
                log.info("job %s: status message was deleted; posting a new one", job.id)
        track.status = await outlet.post_status(job, text)
        track.last_edit, track.pending, track.preview_shown = self._clock(), None, False
        await self._engine.deliveries.record(job.id, platform=outlet.platform, channel_id=track.status.channel_id,
                                             message_id=track.status.message_id, kind="status")
        await self._react(outlet, job, track.status, self._commands.status_reactions())

    async def _post_result(self, outlet: Outlet, job: StoredJob, picture: Picture, caption: str, model_id: str,
                           status: MessageRef | None, *, look_first: bool = False) -> None:
        """Posted once and recorded (bot/posting.py); refused past the retry bound: a note, and the
        catch-up at the next start posts it."""
        try:
            posted = await self._poster.post(outlet, job, picture, caption, status, look_first=look_first)
        except ResultNotPosted as exc:
            log.error("%s; it stays in the history and is posted at the next start", exc)
            await self._poster.tell_not_posted(outlet, job, status, exc, CATCH_UP_WINDOW_S / 3600)
            return
        log.info("job %s: result %s on %s", job.id, "found posted" if posted.found else "posted", outlet.platform)
        await self._react(outlet, job, posted.ref, self._commands.result_reactions(model_id))
        if status is not None:
            await outlet.retire_status(job, status)

    async def _edit(self, track: _Track, text: str) -> None:
        assert track.status is not None
        editor = _preview_editor(track.outlet)
        preview, track.preview = track.preview, None
        if editor is None or preview is None or (preview.withdrawn and not track.preview_shown):
            await track.outlet.edit_status(track.job, track.status, text)
            return
        picture = None
        if not preview.withdrawn:
            ext = "webp" if preview.mime == "image/webp" else "jpg"
            picture = PreviewPicture(preview.image, preview.mime, f"{track.job.id}-preview.{ext}", preview.step,
                                     preview.total)
        try:
            await editor(track.job, track.status, text, picture)
        except BaseException:
            track.preview = track.preview or preview  # shown with the next edit, if there is one
            raise
        track.preview_shown = picture is not None

    @staticmethod
    def _withdraw_preview(track: _Track) -> None:
        if track.preview_shown or track.preview is not None:
            track.preview = JobPreviewed(track.job.id, 0, 0, b"", "")

    @staticmethod
    async def _react(outlet: Outlet, job: StoredJob, ref: MessageRef, emojis: Sequence[str]) -> None:
        """Reactions are a convenience: a failure (no Add Reactions permission) is logged, not fatal."""
        try:
            await outlet.add_reactions(job, ref, emojis)
        except Exception as exc:
            log.warning("job %s: could not add reactions on %s: %s", job.id, outlet.platform, exc)

    # -- helpers -------------------------------------------------------------------------------

    def _mention(self, track: _Track) -> str:
        r = track.job.requester
        return track.outlet.mention(r.user_id) if r.platform == track.outlet.platform else ""

    def _eta(self, job_id: str) -> float | None:
        """The engine's ETA (recorded timings over the planned order); None where it has none
        yet, or from an engine without ETAs (test doubles)."""
        eta = getattr(self._engine, "eta", None)
        return eta(job_id) if callable(eta) else None

    async def _existing_status(self, job: StoredJob, outlet: Outlet) -> MessageRef | None:
        found = [d for d in await self._engine.deliveries.of_job(job.id)
                 if d.kind == "status" and d.platform == outlet.platform]
        return MessageRef(found[-1].channel_id, found[-1].message_id) if found else None

    async def _catch_up(self) -> None:
        """Post results that finished but whose delivery was never recorded (the process died in
        between, or the platform refused every try): an earlier post is looked for first."""
        cutoff = time.time() - CATCH_UP_WINDOW_S
        for platform, outlet in self._outlets.items():
            for job in await self._engine.history.recent_jobs(platform=platform, limit=CATCH_UP_JOBS):
                if (job.id in self._seen or job.status is not JobStatus.SUCCEEDED or job.image_path is None
                        or (job.finished_at or 0) < cutoff or job.origin.platform != platform):
                    continue
                deliveries = await self._engine.deliveries.of_job(job.id)
                if any(d.kind == "result" for d in deliveries):
                    continue
                try:
                    png = await asyncio.to_thread(job.image_path.read_bytes)
                    status = await self._existing_status(job, outlet)
                    caption = messages.caption(job_id=job.id, mention=outlet.mention(job.requester.user_id),
                                               params=job.params, model_name=self._commands.model_name(job.params.model_id),
                                               timings=job.timings)
                    log.info("job %s: a result whose delivery was never recorded: looking for it, else posting it",
                             job.id)
                    await self._post_result(outlet, job, Picture(png, str(job.image_path)), caption, job.params.model_id,
                                            status, look_first=True)
                except Exception:
                    log.exception("job %s: the undelivered result could not be posted", job.id)


def _preview_editor(outlet: Outlet) -> Callable[..., Awaitable[None]] | None:
    """The outlet's optional ``edit_status_with_preview``, or None."""
    editor = getattr(outlet, "edit_status_with_preview", None)
    return editor if callable(editor) else None


def _eta_moved(shown: float | None, now: float | None) -> bool:
    """Worth an edit: the ETA appeared, went, or moved by more than ETA_CHANGE_SHOWN."""
    if shown is None or now is None:
        return (shown is None) != (now is None)
    seconds, share = ETA_CHANGE_SHOWN
    return abs(now - shown) > max(seconds, share * shown)
