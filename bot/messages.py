"""Every sentence a chat user can see, as pure builders: data in, text out, nothing sent.

The text uses only what Discord, Slack and a terminal all show sensibly: plain lines,
`code` spans, "> " quotes and ``<@id>`` mentions (the same syntax on Discord and Slack; the
console passes an empty mention). Adapters cut the text to their platform's length limit
with ``fit_text``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from engine import (
    EngineError,
    GenerationParams,
    ModelStats,
    QueueEntry,
    StoredJob,
    SwitchAway,
    Timings,
    WorkerState,
    WorkerStats,
)

log = logging.getLogger(__name__)

PROMPT_PREVIEW = 300  # characters of the prompt quoted in a status message


# -- errors --------------------------------------------------------------------------------------


def describe_error(exc: BaseException, job_id: str | None = None) -> str:
    """The sentence a user sees for ``exc``. An EngineError carries its own; anything else is
    logged with its traceback under a short reference and the user gets only that reference."""
    if isinstance(exc, EngineError):
        return exc.user_message
    ref = job_id or f"ref {secrets.token_hex(3)}"
    log.error("unexpected error (%s)", ref, exc_info=exc)
    what = f"job `{job_id}`" if job_id else f"`{ref}`"
    return f"Sorry, something went wrong ({what}). The admin can find the details in the log."


# -- small pieces --------------------------------------------------------------------------------


def fit_text(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters at a line break where possible, saying so."""
    if len(text) <= limit:
        return text
    marker = "\n… (cut to fit)"
    room = max(limit - len(marker), 0)
    cut = text.rfind("\n", 0, room)
    return text[: cut if cut > room // 2 else room] + marker


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quote(prompt: str, limit: int = PROMPT_PREVIEW) -> str:
    return "> " + clip(prompt, limit)


def _who(mention: str) -> str:
    return f"{mention} " if mention else ""


def settings_line(p: GenerationParams, model_name: str) -> str:
    parts = [model_name, f"seed {p.seed}", f"{p.steps} steps", f"guidance {p.guidance:g}", f"{p.width}×{p.height}"]
    return " · ".join(parts)


# -- a job's status message ----------------------------------------------------------------------


def status_queued(*, job_id: str, mention: str, params: GenerationParams, model_name: str, position: int,
                  eta_s: float | None, resumed: bool = False) -> str:
    where = "next in line" if position <= 1 else f"queued #{position}"
    head = f"🕒 {_who(mention)}{where}"
    if resumed:
        head = f"🕒 {_who(mention)}back after a restart: {where}"
    if eta_s is not None:
        head += f" · ETA ~{duration(max(eta_s, 1.0))}"
    return "\n".join([head, routing_line(params, model_name), quote(params.prompt), f"job `{job_id}`"])


def routing_line(params: GenerationParams, model_name: str) -> str:
    reason = params.route_reason or "the default model"
    if reason.startswith("you chose"):
        return f"model: {model_name}, as you asked"
    if "->" in reason:  # the router's own sentence already names the model: "text to render -> HiDream-I1"
        return f"routed: {reason}"
    return f"routed to {model_name}: {reason}"


def status_running(*, job_id: str, mention: str, params: GenerationParams, model_name: str, step: int = 0,
                   total: int = 0, elapsed_s: float | None = None, left_s: float | None = None) -> str:
    if total:
        filled = 10 * step // max(total, 1)
        progress = f"`{'█' * filled}{'░' * (10 - filled)}` step {step}/{total}"
    else:
        progress = "loading the model…"
    if elapsed_s is not None:
        progress += f" · {duration(elapsed_s)}"
    if left_s is not None and left_s >= 1:  # under a second: the image is as good as there
        progress += f" · ~{duration(left_s)} left"
    return "\n".join([f"🎨 {_who(mention)}rendering on {model_name}", progress, quote(params.prompt),
                      f"job `{job_id}`"])


def status_failed(*, job_id: str, mention: str, message: str) -> str:
    return f"⚠️ {_who(mention)}{message}\njob `{job_id}`"


def status_stopped(*, job_id: str, mention: str, message: str) -> str:
    return f"⏸️ {_who(mention)}{message}\njob `{job_id}`"


def status_cancelled(*, job_id: str, mention: str) -> str:
    return f"🚫 {_who(mention)}cancelled.\njob `{job_id}`"


def result_not_posted(*, job_id: str, mention: str, why: str, tries: int, catch_up_h: float) -> str:
    """The image is made and kept, but the platform refused every try to post it (5xx, 429, no
    connection); the bot posts it at its next start if that comes within ``catch_up_h`` hours."""
    return (f"⚠️ {_who(mention)}your image is ready, but posting it failed {tries} times ({why}). It is kept: "
            f"I'll post it here when I next start (if within {catch_up_h:g} hours), and `show {job_id}` "
            f"shows it meanwhile.\njob `{job_id}`")


def caption(*, job_id: str, mention: str, params: GenerationParams, model_name: str, timings: Timings,
            notice: str = "") -> str:
    """The text under a finished image: prompt, model, seed, steps, guidance, size, time; and the
    safety loop's notice when it changed the prompt or the model."""
    lines = [_who(mention) + clip(params.prompt, 1000)]
    if params.negative_prompt:
        lines.append(f"not: {params.negative_prompt}")
    if notice:
        lines.append(f"ℹ️ {notice}")
    lines.append(f"{settings_line(params, model_name)} · {duration(timings.total_s)} · job `{job_id}`")
    return "\n".join(lines)


# -- replies to commands -------------------------------------------------------------------------


def imagine_ack(*, job_id: str, position: int, where: str = "here") -> str:
    place = "next in line" if position <= 1 else f"queued #{position}"
    return f"Got it: job `{job_id}` is {place}. Progress and the image will appear {where}."


def missing_permissions(names: Sequence[str]) -> str:
    return (f"I can't post images in this channel: I am missing {', '.join(names)}. "
            "Please ask a server admin to allow these for me here.")


def admin_only(command: str) -> str:
    return f"Sorry, `/{command}` is for the bot's admins."


def not_yours(job_id: str, action: str) -> str:
    return f"Only the person who asked for job `{job_id}` or an admin can {action} it."


def cooldown(*, wait_s: float, every_s: float) -> str:
    return (f"Please wait {duration(max(wait_s, 0.1))} before your next image "
            f"(one image every {duration(every_s)} per person).")


def unknown_job(job_id: str) -> str:
    return f"There is no job `{job_id}` in the history."


def image_withheld(job_id: str) -> str:
    return (f"The image of job `{job_id}` is not attached here: it was made in a channel that allows adult "
            "images, so it is shown only in such a channel.")


def job_not_active(job_id: str, status: str) -> str:
    return f"Job `{job_id}` has already {status}; there is nothing to cancel."


def cancelled(job_id: str) -> str:
    return f"Cancelled job `{job_id}`."


def preload_done(model_name: str, seconds: float, worker: str | None = None) -> str:
    on = f" on `{worker}`" if worker else ""
    if seconds <= 0:
        return f"{model_name} was already loaded{on}."
    return f"{model_name} is loaded{on} ({duration(seconds)})."


def workers_reply(workers: Sequence[WorkerState], model_name: Callable[[str], str]) -> str:
    """``/workers``: each GPU worker, its card, what it holds, its job."""
    lines = [f"{len(workers)} GPU worker(s):"]
    for w in workers:
        state = "up" if w.alive else "down (restarting)"
        held = ", ".join(f"{model_name(m.model_id)} ({m.where})" for m in w.resident) or "nothing loaded"
        status = w.status
        memory = ""
        if status is not None and status.gpu_budget_bytes is not None:
            memory = f"; {status.gpu_used_bytes / 2**30:.1f} of {status.gpu_budget_bytes / 2**30:.1f} GiB used"
        job = (f"; running `{w.job_id}` on {model_name(w.job_model or '')} for {duration(w.running_s)}"
               if w.job_id else "; idle")
        host = f" on {w.info.host}" if w.info.host else ""
        lines.append(f"`{w.info.name}` {state}{host}, {w.info.card}: {held}{memory}{job}")
    return "\n".join(lines)


def worker_stats_reply(stats: Iterable[WorkerStats]) -> str:
    lines = [f"`{s.worker}`: {s.attempts} attempt(s), {s.succeeded} ok, {s.interrupted} interrupted"
             + (f"; mean {duration(s.mean_attempt_s)}" if s.mean_attempt_s is not None else "") for s in stats]
    return "Per GPU worker:\n" + "\n".join(lines) if lines else "Per GPU worker: nothing run yet."


def unload_done(model_name: str, was_loaded: bool) -> str:
    return f"{model_name} is unloaded." if was_loaded else f"{model_name} was not loaded."


def models_reply(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["Models:"]
    for r in rows:
        state = "not loaded"
        if r.get("loaded"):
            state = f"loaded ({r.get('placement') or 'ready'}, {r.get('memory_mb') or 0:,.0f} MB)"
        lines.append(f"{r.get('emoji') or '•'} `{r['id']}` {r['display_name']}: {state}; good at {r.get('good_at') or '-'}; "
                     f"steps {r['steps']}, guidance {r['guidance']:g}{' (preset from /sweep)' if r.get('preset') else ''}; "
                     f"weights {r.get('weights', '?')}")
    return "\n".join(lines)


def queue_reply(entries: Sequence[QueueEntry]) -> str:
    """The engine's view of the queue: running first, then the order its scheduler will run."""
    if not entries:
        return "The queue is empty."
    lines = [f"{len(entries)} job(s):"]
    for e in entries:
        where = ("running" + (f" on `{e.worker}`" if e.worker and e.worker != "gpu" else "")) if e.position == 0 \
            else f"#{e.position}"
        eta_text = f", ETA ~{duration(e.eta_s)}" if e.eta_s is not None and e.position > 0 else ""
        lines.append(f"{where} `{e.job_id}` {e.model_id} for {e.user}, waited {duration(e.waited_s)}{eta_text}")
    return "\n".join(lines)


def stats_reply(stats: Iterable[ModelStats], away: Iterable[SwitchAway] = ()) -> str:
    """``away``: the switch-away rates (a routing-miss signal), before/after the last `router learn`."""
    rates = {a.model_id: a for a in away}
    lines = []
    for s in stats:
        mean = "-" if s.mean_generate_s is None else duration(s.mean_generate_s)
        p95 = "-" if s.p95_generate_s is None else duration(s.p95_generate_s)
        lines.append(f"`{s.model_id}`: {s.count} job(s), {s.succeeded} ok, {s.failed} failed; "
                     f"generate mean {mean}, p95 {p95}; flagged nsfw {s.nsfw_flagged}, black {s.black_flagged}; "
                     f"fixed by rewrite {s.fixed_by_rewrite}, fell back {s.fell_back}, refused {s.refused}"
                     + _switch_away(rates.get(s.model_id)))
    return "Per model:\n" + "\n".join(lines) if lines else "No jobs yet."


def _switch_away(a: SwitchAway | None) -> str:
    if a is None or not a.switched:
        return ""
    learn = "" if a.rate_before is None else f" ({_percent(a.rate_before)} before the last router learn, " \
        f"{_percent(a.rate_after)} after)"
    return f"; switched away from {a.switched} of {a.results} results, {_percent(a.rate)}{learn}"


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def history_reply(jobs: Sequence[StoredJob]) -> str:
    if not jobs:
        return "You have no jobs here yet. Try `/imagine`."
    lines = ["Your recent jobs here:"]
    for j in jobs:
        when = datetime.fromtimestamp(j.created_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        prompt = j.params.prompt if len(j.params.prompt) <= 60 else j.params.prompt[:59] + "…"
        lines.append(f"`{j.id}` {when} {j.status.value} on {j.params.model_id}: {prompt}")
    return "\n".join(lines)


def show_reply(job: StoredJob, model_name: str) -> str:
    p, t = job.params, job.timings
    lines = [f"Job `{job.id}`: {job.status.value}", quote(p.prompt, 1000)]
    if p.negative_prompt:
        lines.append(f"not: {p.negative_prompt}")
    lines.append(settings_line(p, model_name))
    lines.append(routing_line(p, model_name))
    lines.append(f"asked by {job.requester.display_name or job.requester.user_id} on {job.requester.platform}")
    if job.status.is_final:
        lines.append(f"waited {duration(t.queue_wait_s)}, loaded {duration(t.load_s)}, "
                     f"generated {duration(t.generate_s)}, total {duration(t.total_s)}")
    if job.error_message:
        lines.append(f"outcome: {job.error_message}")
    elif job.status.value == "succeeded" and job.image_path is None:
        lines.append("The image was deleted by the retention policy.")
    return "\n".join(lines)


# -- text options (console, Slack) --------------------------------------------------------------


def option_error(problem: str, usage: str) -> str:
    return f"{problem}\n{usage}"


def gallery_link(url: str, expires_at: float) -> str:
    until = datetime.fromtimestamp(expires_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"Your gallery: {url}\nThis link is yours alone: it shows only your images and works until {until}. "
            "Ask /gallery again for a fresh one.")


def gallery_off() -> str:
    return "The web gallery is not set up on this bot."


def help_text(entries: Iterable[tuple[str, str, bool]], is_admin: bool) -> str:
    lines = ["Commands:"]
    for usage, summary, admin in entries:
        if admin and not is_admin:
            continue
        lines.append(f"{usage}: {summary}" + (" (admins)" if admin else ""))
    return "\n".join(lines)


# -- Slack ---------------------------------------------------------------------------------------

_CANNOT_POST = {
    "not_in_channel": "I'm not a member of this channel. Invite me with `/invite @{bot}` and ask again.",
    "channel_not_found": ("I can't see this conversation (a private channel I'm not in, or a direct message "
                          "between people). Invite me with `/invite @{bot}`, or ask in a channel where I am."),
    "is_archived": "This channel is archived. Please ask in another channel.",
}


def cannot_post_here(error: str, bot_name: str) -> str:
    """Slack refused to show a job in the channel it came from (``error`` is Slack's code); no job runs."""
    why = _CANNOT_POST.get(error, "Slack doesn't let me post in this channel ({error}). "
                                  "Please ask in another channel, or ask a workspace admin.")
    return "I can't post the image here: " + why.format(bot=bot_name, error=error)


def status_done_in_thread(*, job_id: str, params: GenerationParams) -> str:
    """A Slack status message once its image is posted: it heads the thread the image is in."""
    return "\n".join(["✅ done: the image is in this thread.", quote(params.prompt), f"job `{job_id}`"])


def prompt_needed(command: str) -> str:
    return f"`{command}` needs a prompt: what should the image show?"


def unknown_subcommand(command: str, name: str, names: Sequence[str]) -> str:
    return f"`{command} {name}` is not a command. Try {', '.join(f'`{command} {n}`' for n in names)}."
