"""Benchmark: the engine and the bot's delivery under a busy server (issue 12).

    python bench/load.py [--users 50] [--jobs 500] [--cap 5] [--queue-limit 200] [--cooldown 0.5]
                         [--duration 30] [--rush 8] [--rush-share 0.75] [--react-share 0.15]
                         [--scale 0.05] [--seed 12] [--max-seconds 900] [--json]

What is real and what is not. Real: ``engine.Engine`` (admission, the router from config.toml
with the tiny profile's LLM twin and the real all-MiniLM-L6-v2 embeddings, normalisation, the
affinity scheduler, the queue plan and ETAs, events, a real SQLite ``HistoryStore`` in a temp
data folder), ``bot.commands.Commands`` (cooldowns, reactions) and ``bot.delivery.Delivery``
(status messages, throttled progress, results, reactions), wired as the terminal adapter wires
them (``delivery.attach()`` before the engine is entered, ``delivery.run()`` as a task). Not
real: the GPU work. A stand-in runner (``Engine(config, runner_factory=...)``) sleeps, step by
step, what each model takes on an H200-class card (bench/eta.py's cost model), times
``--scale``; it calls ``on_step`` each step, honours the cancel event, reports its attempt to
the history like the safety loop does, and returns a small real PNG. At the default scale
(0.05, as bench/eta.py) a job takes about 0.25 s, a load 0.4-3 s. Its residency stand-in
keeps two models resident (HiDream alone), evicting the least recently used one that the queue
does not need soon, with the scaled load time, so the affinity scheduler has choices to make.
The outlet is terminal-style: it records posts, edits and reactions in memory and costs
nothing, with the chat throttle ([bot] progress_interval_s) on status edits.

The load (the schedule reproducible from ``--seed``): ``--users`` users with Zipf-like
activity (the busiest about twice the mean) share ``--jobs`` attempts, sent in bursts of 1-4
*concurrent* commands (65/20/10/5 %: a double-click, an impatient user; what the caps and the
cooldown must hold against), one user's bursts at least ``--cooldown`` + 0.1 s apart. ``--rush-share`` of the bursts come in the first ``--rush``
seconds (a busy evening: the queue fills to ``--queue-limit`` at once), the rest spread over
the remaining ``--duration`` seconds, about what the stand-in GPU serves, so the queue stays
near full while they last; a user whose answer came late sends the next burst at once. An
attempt is a ``Commands.react`` with the regenerate emoji on one of the user's delivered
results (``--react-share`` of attempts, when the user has one), else ``Commands.imagine``:
prompts from a pool written to reach all four models through the router's rules (most),
examples and LLM; 20 % name a model; 40 % ask for a size. The cap defaults to 5 so that 50 users
can reach the 200-job limit before all of them are capped. Before the clock starts the router
is warmed up (``engine.warm_up_router``) and four jobs run one by one (one per model; not
counted), so ETAs have recorded costs.

What is measured, and how:

- refusals by reason: the reply's sentence (queue full, per-user cap, cooldown, other).
- ``lost``: accepted jobs without a posted result (failed jobs included: the stand-in never
  fails); ``duplicates``: results posted more than once for one job, job ids accepted twice,
  final events seen twice; ``unfinished``: still queued or running when ``--max-seconds`` ran
  out (the run is then incomplete and exits 3).
- ``cap_violations`` (``cap_violations_snapshot`` for the second check): a subscriber to the engine's events replays the queue (``JobQueued``
  in, ``JobStarted``/final events out) and checks, at every change, each user's queued jobs
  against ``--cap`` and the queue's length against ``--queue-limit``; and after every accepted
  submit ``engine.queue_snapshot()`` is checked the same way (the running job excluded, as the
  engine's caps count).
- ``cooldown_violations`` (reported, not gated): two accepted commands of one user that began
  less than ``--cooldown`` apart (rule 6: a cooldown is reserved before the first await).
- ``loop_lag_ms``: a probe task awaits ``asyncio.sleep(0.01)`` in a loop and records how late
  it wakes, from the first attempt until every accepted job is delivered.
- ``job_start_loop_ms``: loop-thread CPU (``time.thread_time()``, the loop thread's own CPU
  time: the GPU, SQLite and embedding threads are not counted) spent reacting to one job start.
  The engine instance's ``_next_job`` is wrapped: thread time at entry (before the scheduler
  picks), then a measuring task hops ``await asyncio.sleep(0)`` until the loop's ready queue
  (``loop._ready``, the stock asyncio loop) is empty when it runs, i.e. the pick, the plan, the
  ``JobStarted`` (and any queue-moved) events and every delivery task they woke have run; the
  thread time then, minus the entry's, is the sample. Other loop work that lands in that
  window (step events of the job just started, a submit) is counted too: the figure is an
  upper bound. The queue length is taken as the pick is made (the starting job included).
  One task drains for all starts still open: a start that comes before the previous one's
  work has drained (a saturated loop) ends at the same drain, so both samples include each
  other's work, as the loop had to do it (counted as ``overlapped``). Reported over the starts
  made while the queue held at least 90 % of ``--queue-limit`` (with the queue lengths seen),
  and over all starts.
- ``submit_ms``: wall time of each ``Commands.imagine`` / ``Commands.react`` call (the history
  lookup of the reacted-to job is not included).

The run exits 1 if ``lost``, ``duplicates`` or either cap check is not 0, and 3 if it ran out
of ``--max-seconds``. The loop targets (lag p99 <= 50 ms; start CPU <= 20 ms at a full queue)
are printed as met or missed; they do not change the exit status (a shared machine can miss
them). The machine, the date and every parameter are printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PLATFORM = "bench"
LAG_PROBE_S = 0.01
NEAR_FULL = 0.9  # a start "at a full queue": at least this share of --queue-limit waiting
TARGET_LAG_P99_MS = 50.0
TARGET_START_MS = 20.0


# -- the stand-in GPU -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SimModel:
    per_step_mp: float  # seconds per denoising step per megapixel (bench/eta.py's cost model)
    fixed: float  # seconds per job besides the steps: text encoders, VAE decode, checks, PNG
    load: float  # seconds from disk
    exclusive: bool = False


SIM = {
    "flux_dev": SimModel(0.18, 1.2, 25.0),
    "realvis_xl": SimModel(0.092, 0.6, 8.0),
    "sd3_medium": SimModel(0.12, 0.9, 12.0),
    "logo_sdxl": SimModel(3.4, 4.0, 60.0, exclusive=True),
}
RESIDENT_AT_ONCE = 2


class StandInResidency:
    """What the engine asks of ``runner.residency``, for the stand-in card: up to two models
    resident (an exclusive one alone), least recently used evicted first unless needed soon."""

    def __init__(self, scale: float, rng: random.Random) -> None:
        self._scale, self._rng = scale, rng
        self._ready: OrderedDict[str, float] = OrderedDict()  # model id -> load seconds; LRU first
        self._pinned: set[str] = set()
        self._needed: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._rows: tuple[Any, ...] = ()
        self.loads = 0

    def acquire_blocking(self, model_id: str) -> float:
        """GPU thread: make ``model_id`` resident; returns the (scaled) seconds it took."""
        if model_id in self._ready:
            self._ready.move_to_end(model_id)
            self._publish()
            return 0.0
        model = SIM[model_id]
        if model.exclusive or any(SIM[m].exclusive for m in self._ready):
            self._ready.clear()
        while len(self._ready) >= RESIDENT_AT_ONCE:
            keep = self._pinned | set(self._needed)
            victim = next((m for m in self._ready if m not in keep), next(iter(self._ready)))
            del self._ready[victim]
        self._publish()  # evicted before the load, as the real manager does
        load_s = model.load * self._rng.lognormvariate(0, 0.2) * self._scale
        time.sleep(load_s)
        self._ready[model_id] = load_s
        self.loads += 1
        self._publish()
        return load_s

    def _publish(self) -> None:
        from engine.residency import ResidentModel

        now = time.time()
        rows = tuple(ResidentModel(m, "gpu", 0, s, now, pinned=m in self._pinned) for m, s in self._ready.items())
        with self._lock:
            self._rows = rows

    def snapshot(self) -> tuple[Any, ...]:
        with self._lock:
            return self._rows

    def placement_sets(self) -> tuple[frozenset[str], frozenset[str]]:
        """(ready models, parked models): nothing is parked in RAM on the stand-in card."""
        return frozenset(r.model_id for r in self.snapshot()), frozenset()

    def status(self) -> Any:
        from engine.residency import ResidencyStatus

        rows = self.snapshot()
        return ResidencyStatus(rows, None, 0, None, 0, tuple(r.model_id for r in rows if r.pinned))

    def set_needed_soon(self, models: Sequence[str]) -> None:
        self._needed = tuple(models)

    def preload_blocking(self, spec: Any, *, pin: bool = False, needed_soon: Sequence[str] | None = None) -> float:
        if pin:
            self._pinned.add(spec.id)
        return self.acquire_blocking(spec.id)

    def pin_blocking(self, model_id: str, pinned: bool = True) -> None:
        (self._pinned.add if pinned else self._pinned.discard)(model_id)
        self._publish()

    def unload_blocking(self, model_id: str) -> bool:
        self._pinned.discard(model_id)
        found = self._ready.pop(model_id, None) is not None
        self._publish()
        return found

    def unload_all_blocking(self) -> None:
        self._ready.clear()
        self._publish()


class StandInRunner:
    """``JobRunner`` as the engine calls it: the GPU work replaced by scaled sleeps."""

    llms = None  # the engine builds its own chat-LLM cache for the router (the tiny twin)

    def __init__(self, scale: float, seed: int) -> None:
        self._scale = scale
        self._rng = random.Random(seed)
        self.residency = StandInResidency(scale, random.Random(seed + 1))
        self._png = _small_png()
        self.jobs = 0

    def run_blocking(self, job_id: str, params: Any, on_step: Callable[[int, int], None], cancel: threading.Event,
                     nsfw_allowed: bool = False, on_attempt: Callable[[Any], None] | None = None,
                     on_preview: Any = None) -> Any:
        from engine import JobCancelledError
        from engine.core import RunOutput
        from engine.safety import Attempt

        model = SIM[params.model_id]
        attempt = Attempt(1, params.model_id, params.prompt, params.seed, time.time())
        if on_attempt is not None:
            on_attempt(attempt)
        # 1. make resident
        load_s = self.residency.acquire_blocking(params.model_id)
        # 2. generate, step by step
        started = time.perf_counter()
        step_s = model.per_step_mp * params.width * params.height / 1e6 * self._rng.lognormvariate(0, 0.1)
        time.sleep(model.fixed * 0.3 * self._scale)  # text encoders
        for step in range(1, params.steps + 1):
            if cancel.is_set():
                raise JobCancelledError(job_id)
            time.sleep(step_s * self._scale)
            on_step(step, params.steps)
        time.sleep(model.fixed * 0.7 * self._scale)  # VAE decode, safety checks, PNG
        generate_s = time.perf_counter() - started
        # 3. the attempt is closed as the safety loop closes a passing one
        if on_attempt is not None:
            on_attempt(dataclasses.replace(attempt, finished_at=time.time(), outcome="succeeded", action="posted"))
        self.jobs += 1
        return RunOutput(self._png, params.width, params.height, load_s, generate_s, params)


def _small_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (40, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- the platform side: a terminal-style outlet that records ---------------------------------------


class RecordingOutlet:
    """``bot.outlet.Outlet`` that keeps what it was asked to show, in memory."""

    platform = PLATFORM
    progress_interval_s: float | None = None  # the chat throttle: [bot] progress_interval_s

    def __init__(self) -> None:
        self.status_posts = 0
        self.edits = 0
        self.reactions = 0
        self.retired = 0
        self.results: Counter[str] = Counter()  # job id -> results posted
        self.delivered: dict[str, list[str]] = defaultdict(list)  # user id -> jobs whose result is up

    def mention(self, user_id: str) -> str:
        return f"@{user_id}"

    async def post_status(self, job: Any, text: str) -> Any:
        from bot.outlet import MessageRef

        self.status_posts += 1
        return MessageRef(job.origin.channel_id, f"{job.id}-status")

    async def edit_status(self, job: Any, ref: Any, text: str) -> None:
        self.edits += 1

    async def post_result(self, job: Any, picture: Any, caption: str, status: Any) -> Any:
        from bot.outlet import MessageRef

        self.results[job.id] += 1
        self.delivered[job.requester.user_id].append(job.id)
        return MessageRef(job.origin.channel_id, f"{job.id}-result")

    async def add_reactions(self, job: Any, ref: Any, emojis: Sequence[str]) -> None:
        self.reactions += len(emojis)

    async def retire_status(self, job: Any, ref: Any) -> None:
        self.retired += 1


# -- what the bench watches -----------------------------------------------------------------------


class Watch:
    """Replays the queue from the engine's events and checks the caps at every change."""

    def __init__(self, cap: int, limit: int) -> None:
        self.cap, self.limit = cap, limit
        self.owner: dict[str, str] = {}  # job id -> user id, as the accepted replies tell
        self.queued: set[str] = set()
        self.per_user: Counter[str] = Counter()  # queued jobs per user (owners known)
        self.running: str | None = None
        self.finals: Counter[str] = Counter()
        self.finished: set[str] = set()
        self.failed: dict[str, str] = {}
        self.violations: list[str] = []  # from the events: each JobQueued that broke a cap
        self.snapshot_violations: list[str] = []  # from queue_snapshot() after accepted submits
        self.max_queue = 0
        self.max_user = 0

    def accepted(self, job_id: str, user: str) -> None:
        self.owner[job_id] = user
        if job_id in self.queued:  # the event came first
            self._count(user, +1)

    def on_event(self, event: Any) -> None:
        from engine import JobCancelled, JobFailed, JobFinished, JobQueued, JobStarted

        job_id = getattr(event, "job_id", None)
        if job_id is None:  # a queue-wide event (QueueMoved after issue 12): nothing to replay
            return
        if isinstance(event, JobQueued):
            if job_id in self.queued:
                return
            self.queued.add(job_id)
            if job_id in self.owner:
                self._count(self.owner[job_id], +1)
            self.max_queue = max(self.max_queue, len(self.queued))
            if len(self.queued) > self.limit:
                self.violations.append(f"queue held {len(self.queued)} > {self.limit} at {job_id}'s JobQueued")
        elif isinstance(event, JobStarted):
            self._leave(job_id)
            self.running = job_id
        elif isinstance(event, JobFinished | JobFailed | JobCancelled):
            self._leave(job_id)
            self.running = None if self.running == job_id else self.running
            self.finals[job_id] += 1
            if isinstance(event, JobFinished):
                self.finished.add(job_id)
            elif isinstance(event, JobFailed):
                self.failed[job_id] = event.error_kind

    def _leave(self, job_id: str) -> None:
        if job_id in self.queued:
            self.queued.discard(job_id)
            if job_id in self.owner:
                self._count(self.owner[job_id], -1)

    def _count(self, user: str, delta: int) -> None:
        self.per_user[user] += delta
        self.max_user = max(self.max_user, self.per_user[user])
        if delta > 0 and self.per_user[user] > self.cap:
            self.violations.append(f"{user} had {self.per_user[user]} jobs queued > cap {self.cap}")

    def check_snapshot(self, entries: Sequence[Any]) -> None:
        """After an accepted submit: the engine's own view of its queue, the running job excluded."""
        waiting = [e for e in entries if e.position > 0]
        over = [f"{user} has {n} waiting" for user, n in Counter(e.user for e in waiting).items() if n > self.cap]
        if len(waiting) > self.limit:
            over.append(f"{len(waiting)} waiting")
        if over:
            self.snapshot_violations.append("queue_snapshot: " + ", ".join(over))

    async def follow(self, events: asyncio.Queue[Any]) -> None:
        while True:
            self.on_event(await events.get())


class StartMeter:
    """Loop-thread CPU per job start (see the module docstring for the method)."""

    def __init__(self, engine: Any, watch: Watch) -> None:
        self.samples: list[tuple[float, int]] = []  # (ms of loop-thread CPU, queue length at the pick)
        self.overlapped = 0  # starts made while an earlier start's work was still being drained
        self.active = False
        self.method = "engine._next_job wrapped; loop._ready drained"
        self._engine, self._watch = engine, watch
        self._open: list[tuple[float, int]] = []  # starts whose work is not drained yet
        self._drainer: asyncio.Task[None] | None = None

    def install(self) -> None:
        original = getattr(self._engine, "_next_job", None)
        if original is None or not hasattr(asyncio.get_running_loop(), "_ready"):
            self.method = "not measured: no Engine._next_job, or not the stock asyncio loop"
            return

        def next_job(*args: Any) -> Any:
            started = time.thread_time()
            waiting = len(getattr(self._engine, "_queue", self._watch.queued))
            job = original(*args)
            if self.active:
                self._opened(started, waiting)
            return job

        self._engine._next_job = next_job

    def _opened(self, started: float, waiting: int) -> None:
        # One drainer for all open starts: two hopping tasks would each see the other in the
        # ready queue and never find it empty.
        self.overlapped += bool(self._open)
        self._open.append((started, waiting))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        ready = asyncio.get_running_loop()._ready  # type: ignore[attr-defined]
        while True:
            await asyncio.sleep(0)
            if not ready:
                break
        now = time.thread_time()
        self.samples += [((now - started) * 1000, waiting) for started, waiting in self._open]
        self._open.clear()


async def lag_probe(samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_S)
        samples.append((time.perf_counter() - started - LAG_PROBE_S) * 1000)


# -- the users ------------------------------------------------------------------------------------

# Written to reach each model through the router: rules first, then examples, then the LLM.
PROMPTS: dict[str, tuple[str, ...]] = {
    "flux_dev": (
        "a watercolor fox curled up in autumn leaves", "an oil painting of a lighthouse in a storm",
        "a misty mountain valley at sunrise", "a cyberpunk alley at night with neon reflections",
        "pixel art castle on a hill", "a dragon", "a cozy cabin in a snowy forest at dusk",
        "an astronaut floating over a purple planet, concept art", "a bowl of ramen with steam rising",
        "the northern lights over a frozen lake", "a steampunk airship above the clouds",
    ),
    "realvis_xl": (
        "a photo of an old fisherman mending his nets", "portrait of a woman in a red coat, 85mm",
        "a chef plating a dessert in a busy kitchen", "candid photo of two friends laughing in a cafe",
        "a bride and groom walking on a beach at sunset", "headshot of a smiling businessman",
        "a street musician playing violin in the rain",
    ),
    "sd3_medium": (
        "three red apples next to a blue cup", "a cat on top of a stack of books beside a lamp",
        "a minimalist poster of a mountain range", "a landing page for a coffee shop",
        "two robots and a dog playing chess in a park", "a wireframe of a weather app",
    ),
    "logo_sdxl": (
        'a logo with the text "NOVA"', 'a neon sign that says "open late"',
        'a coffee mug with the words "good morning"', "a wordmark for a bakery called crumbs",
    ),
}
MIX = {"flux_dev": 0.45, "realvis_xl": 0.30, "sd3_medium": 0.20, "logo_sdxl": 0.05}
SIZES = ((512, 768), (768, 512), (512, 512), (640, 768))
BURST_SIZES, BURST_WEIGHTS = (1, 2, 3, 4), (65, 20, 10, 5)  # commands one user sends at once


def imagine_options(rng: random.Random) -> Any:
    from bot.commands import ImagineOptions

    model = rng.choices(list(MIX), list(MIX.values()))[0]
    width, height = rng.choice(SIZES) if rng.random() < 0.4 else (None, None)
    return ImagineOptions(rng.choice(PROMPTS[model]), model=model if rng.random() < 0.2 else None,
                          width=width, height=height)


@dataclasses.dataclass
class Tally:
    attempts: int = 0
    reactions: int = 0
    reactions_accepted: int = 0
    accepted_ids: Counter[str] = dataclasses.field(default_factory=Counter)
    refused: Counter[str] = dataclasses.field(default_factory=Counter)
    other_texts: Counter[str] = dataclasses.field(default_factory=Counter)
    submit_ms: list[float] = dataclasses.field(default_factory=list)
    accepted_ms: list[float] = dataclasses.field(default_factory=list)
    began: dict[str, list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))


def refusal_reason(text: str) -> str:
    if "queue is full" in text:
        return "queue_full"
    if "most one person may queue" in text:
        return "per_user_cap"
    if text.startswith("Please wait") and "per person" in text:
        return "cooldown"
    return "other"


class Users:
    """The simulated people: bursts of concurrent commands, reactions on their delivered results."""

    def __init__(self, args: argparse.Namespace, commands: Any, outlet: RecordingOutlet, watch: Watch) -> None:
        self.args, self.commands, self.outlet, self.watch = args, commands, outlet, watch
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.reacted: set[str] = set()
        weights = [1 / (i + 1) ** 0.3 for i in range(args.users)]  # the busiest about twice the mean
        self.plans = [self._bursts(n) for n in _shares(args.jobs, weights)]

    def _bursts(self, budget: int) -> list[tuple[float, int]]:
        """One user's bursts: (seconds after the start, commands sent at once), in time order."""
        a, out = self.args, []
        while budget > 0:
            k = min(budget, self.rng.choices(BURST_SIZES, BURST_WEIGHTS)[0])
            budget -= k
            rush = self.rng.random() < a.rush_share
            out.append((self.rng.uniform(0, a.rush) if rush else self.rng.uniform(a.rush, a.duration), k))
        out.sort()
        gap = a.cooldown + 0.1  # one person's separate bursts: the concurrency is within a burst
        for n in range(1, len(out)):
            out[n] = (max(out[n][0], out[n - 1][0] + gap), out[n][1])
        return out

    async def run(self) -> None:
        started = time.perf_counter()
        await asyncio.gather(*(self._user(i, plan, started) for i, plan in enumerate(self.plans) if plan))

    async def _user(self, i: int, plan: list[tuple[float, int]], started: float) -> None:
        from bot.commands import Actor
        from engine import Origin

        rng = random.Random(self.rng.random())
        actor = Actor(PLATFORM, f"user{i:02d}", f"user{i:02d}")
        origin = Origin(PLATFORM, f"channel-{i % 4}")
        for at, k in plan:  # behind schedule (a slow answer): the next burst goes at once
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            await asyncio.gather(*(self._attempt(actor, origin, rng) for _ in range(k)))

    async def _attempt(self, actor: Any, origin: Any, rng: random.Random) -> None:
        from bot.commands import Reply, Submitted

        t, c = self.tally, self.commands
        t.attempts += 1
        mine = [j for j in self.outlet.delivered[actor.user_id] if j not in self.reacted]
        if mine and rng.random() < self.args.react_share:
            job_id = rng.choice(mine)
            self.reacted.add(job_id)
            job = await c.engine.history.get_job(job_id)
            t.reactions += 1
            began = time.monotonic()
            outcome = await c.react(actor, job, c.settings.regenerate_emoji,
                                    dataclasses.replace(origin, message_ref=f"{job_id}-result"))
        else:
            job_id = None
            began = time.monotonic()
            outcome = await c.imagine(actor, imagine_options(rng), origin)
        ms = (time.monotonic() - began) * 1000
        t.submit_ms.append(ms)
        if isinstance(outcome, Submitted):
            new_id = outcome.handle.id
            t.accepted_ids[new_id] += 1
            t.accepted_ms.append(ms)
            t.began[actor.user_id].append(began)
            t.reactions_accepted += job_id is not None
            self.watch.accepted(new_id, actor.user_id)
            self.watch.check_snapshot(c.engine.queue_snapshot())
        elif isinstance(outcome, Reply):
            reason = refusal_reason(outcome.text)
            t.refused[reason] += 1
            if reason == "other":
                t.other_texts[outcome.text[:120]] += 1


def _shares(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split by ``weights``, largest remainders first."""
    exact = [total * w / sum(weights) for w in weights]
    out = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return out


# -- the run --------------------------------------------------------------------------------------


def bench_config(args: argparse.Namespace, data_dir: Path) -> Any:
    from engine import load_config, with_tiny_models
    from engine.tiny import ensure_tiny_models

    config = load_config(REPO / "config.toml", env={})
    config = config.model_copy(update={"device": "cpu",
        "data_dir": data_dir,
        "limits": config.limits.model_copy(update={"max_queued_jobs": args.queue_limit}),
        "scheduler": config.scheduler.model_copy(update={"max_queued_per_user": args.cap})})
    return with_tiny_models(config, ensure_tiny_models(Path(tempfile.gettempdir()) / "promptpics-bench-tiny"))


async def warm_up(engine: Any, delivery: Any) -> tuple[float, set[str]]:
    """Router models loaded, then one job per model, one by one: ETAs start from recorded costs.
    Returns the seconds it took and the warm-up jobs' ids."""
    from engine import JobRequest, Requester

    started = time.perf_counter()
    await engine.warm_up_router()
    ids = set()
    for model, prompts in PROMPTS.items():
        handle = await engine.submit(JobRequest(prompts[0], model=model, requester=Requester(PLATFORM, "warmup")))
        ids.add(handle.id)
        await handle.result()
        await asyncio.wait_for(delivery.settled(handle.id), 30)
    return time.perf_counter() - started, ids


async def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    from bot.commands import AdminPolicy, Commands
    from bot.delivery import Delivery
    from bot.settings import parse_bot_settings
    from engine import Engine

    config = await asyncio.to_thread(bench_config, args, data_dir)
    runner = StandInRunner(args.scale, args.seed)
    engine = Engine(config, runner_factory=lambda c, device, dtype: runner)
    settings = (parse_bot_settings(config.platform_tables.get("bot", {}), config)).model_copy(update={"cooldown_s": args.cooldown})
    commands = Commands(engine, settings, {PLATFORM: AdminPolicy()})
    delivery = Delivery(commands)
    outlet = RecordingOutlet()
    delivery.add_outlet(outlet)
    watch = Watch(args.cap, args.queue_limit)
    events = engine.subscribe()
    delivery.attach()
    lag: list[float] = []
    stop = asyncio.Event()
    async with engine:
        tasks = [asyncio.create_task(delivery.run(), name="delivery"),
                 asyncio.create_task(watch.follow(events), name="watch")]
        warm_s, warm_ids = await warm_up(engine, delivery)
        meter = StartMeter(engine, watch)
        meter.install()
        users = Users(args, commands, outlet, watch)
        meter.active = True
        tasks.append(asyncio.create_task(lag_probe(lag, stop), name="lag-probe"))
        started = time.perf_counter()
        deadline = started + args.max_seconds
        timed_out = False
        try:
            await asyncio.wait_for(users.run(), max(1.0, deadline - time.perf_counter()))
            submitted_s = time.perf_counter() - started
            pending = [delivery.settled(j) for j in users.tally.accepted_ids]
            await asyncio.wait_for(asyncio.gather(*pending), max(1.0, deadline - time.perf_counter()))
        except TimeoutError:
            timed_out = True
            submitted_s = time.perf_counter() - started
            if tasks[0].done() and tasks[0].exception() is not None:  # the delivery itself died
                raise RuntimeError("the delivery task failed") from tasks[0].exception()
        wall_s = time.perf_counter() - started
        meter.active = False
        stop.set()
        in_flight = set(watch.queued) | ({watch.running} if watch.running else set())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        engine.unsubscribe(events)
    return summarise(args, users.tally, watch, outlet, meter, lag, runner, warm_ids, in_flight,
                     dict(warm_s=warm_s, submitted_s=submitted_s, wall_s=wall_s, timed_out=timed_out))


def summarise(args: argparse.Namespace, t: Tally, watch: Watch, outlet: RecordingOutlet, meter: StartMeter,
              lag: list[float], runner: StandInRunner, warm_ids: set[str], in_flight: set[str],
              times: dict[str, Any]) -> dict[str, Any]:
    accepted = set(t.accepted_ids)
    posted = {j for j, n in outlet.results.items() if j not in warm_ids}
    unfinished = accepted & in_flight if times["timed_out"] else set()
    lost = accepted - posted - unfinished
    duplicates = (sum(n - 1 for n in t.accepted_ids.values())
                  + sum(n - 1 for j, n in outlet.results.items() if n > 1)
                  + sum(n - 1 for j, n in watch.finals.items() if n > 1))
    cooldown_violations = 0
    for began in t.began.values():
        began.sort()
        cooldown_violations += sum(1 for a, b in zip(began, began[1:]) if b - a < args.cooldown - 1e-3)
    full = [(ms, q) for ms, q in meter.samples if q >= NEAR_FULL * args.queue_limit]
    return {
        "accepted": len(accepted),
        "refused": {k: t.refused.get(k, 0) for k in ("queue_full", "per_user_cap", "cooldown", "other")},
        "refused_other_texts": dict(t.other_texts),
        "completed": len(accepted & watch.finished & posted),
        "failed": len(accepted & set(watch.failed)),
        "lost": len(lost),
        "unfinished": len(unfinished),
        "duplicates": duplicates,
        "cap_violations": len(watch.violations),
        "cap_violations_snapshot": len(watch.snapshot_violations),
        "cap_violation_examples": (watch.violations + watch.snapshot_violations)[:5],
        "cooldown_violations": cooldown_violations,
        "max_queued_seen": watch.max_queue,
        "max_user_queued_seen": watch.max_user,
        "attempts": t.attempts,
        "reactions": {"sent": t.reactions, "accepted": t.reactions_accepted},
        "loop_lag_ms": {"p50": _pct(lag, 50), "p99": _pct(lag, 99), "max": _max(lag), "n": len(lag),
                        "over_50": sum(1 for x in lag if x > TARGET_LAG_P99_MS)},
        "job_start_loop_ms": {"p50": _pct([m for m, _ in full], 50), "max": _max([m for m, _ in full]),
                              "n": len(full), "queue_len": {"min": min((q for _, q in full), default=None),
                                                            "p50": _pct([q for _, q in full], 50),
                                                            "max": max((q for _, q in full), default=None)}},
        "job_start_loop_ms_all": {"p50": _pct([m for m, _ in meter.samples], 50),
                                  "p99": _pct([m for m, _ in meter.samples], 99),
                                  "max": _max([m for m, _ in meter.samples]), "n": len(meter.samples)},
        "job_start_method": meter.method,
        "job_start_overlapped": meter.overlapped,
        "submit_ms": {"p50": _pct(t.submit_ms, 50), "p99": _pct(t.submit_ms, 99), "max": _max(t.submit_ms)},
        "submit_ms_accepted": {"p50": _pct(t.accepted_ms, 50), "p99": _pct(t.accepted_ms, 99)},
        "stand_in": {"jobs_run": runner.jobs, "model_loads": runner.residency.loads},
        "seconds": {k: round(v, 1) if isinstance(v, float) else v for k, v in times.items()},
    }


def _pct(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))], 2)


def _max(values: Sequence[float]) -> float | None:
    return round(max(values), 2) if values else None


# -- the report -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nproc = os.cpu_count()
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    return {"nproc": nproc, "cpu": cpu, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "load_average_1m": round(os.getloadavg()[0], 2)}


def print_table(out: dict[str, Any]) -> None:
    m, p, s = out["machine"], out["parameters"], out["seconds"]
    print(f"{m['nproc']} CPU cores ({m['cpu']}), Python {m['python']}, {m['date']}, "
          f"load average {m['load_average_1m']} at the start")
    print(f"{p['users']} users, {p['jobs']} attempts over ~{p['duration']} s ({p['rush_share']:.0%} of bursts in the "
          f"first {p['rush']} s), per-user cap {p['cap']}, "
          f"max_queued_jobs {p['queue_limit']}, cooldown {p['cooldown']} s, reactions {p['react_share']:.0%}, "
          f"seed {p['seed']}; GPU work is a STAND-IN (scaled sleeps, scale {p['scale']}); router warm-up and "
          f"4 warm-up jobs: {s['warm_s']} s, not measured")
    print(f"submitting: {s['submitted_s']} s, until the last result was posted: {s['wall_s']} s"
          + (" (RAN OUT OF --max-seconds)" if s["timed_out"] else ""))
    r = out["refused"]
    rows = [
        ("attempts (reactions sent / accepted)", f"{out['attempts']} ({out['reactions']['sent']} / "
                                                  f"{out['reactions']['accepted']})", ""),
        ("accepted", out["accepted"], ""),
        ("refused: queue full / per-user cap / cooldown / other",
         f"{r['queue_full']} / {r['per_user_cap']} / {r['cooldown']} / {r['other']}", ""),
        ("completed (result posted)", out["completed"], ""),
        ("lost", out["lost"], _ok(out["lost"] == 0, "0")),
        ("duplicates", out["duplicates"], _ok(out["duplicates"] == 0, "0")),
        ("cap_violations (events / queue_snapshot checks)",
         f"{out['cap_violations']} / {out['cap_violations_snapshot']}",
         _ok(out["cap_violations"] == out["cap_violations_snapshot"] == 0, "0")),
        ("cooldown_violations (informational)", out["cooldown_violations"], ""),
        ("longest queue / most queued by one user", f"{out['max_queued_seen']} / {out['max_user_queued_seen']}", ""),
    ]
    lag, js, ja, sm = out["loop_lag_ms"], out["job_start_loop_ms"], out["job_start_loop_ms_all"], out["submit_ms"]
    q = js["queue_len"]
    rows += [
        (f"loop lag ms p50 / p99 / max ({lag['over_50']} of {lag['n']} probes over 50 ms)",
         f"{lag['p50']} / {lag['p99']} / {lag['max']}",
         _ok(lag["p99"] is not None and lag["p99"] <= TARGET_LAG_P99_MS, f"p99 <= {TARGET_LAG_P99_MS:.0f}")),
        (f"job start loop CPU ms p50 / max, {js['n']} starts at queue {q['min']}-{q['max']} (p50 {q['p50']})",
         f"{js['p50']} / {js['max']}",
         _ok(js["max"] is not None and js["max"] <= TARGET_START_MS, f"<= {TARGET_START_MS:.0f}")),
        (f"job start loop CPU ms p50 / p99 / max, all {ja['n']} starts ({out['job_start_overlapped']} overlapped)",
         f"{ja['p50']} / {ja['p99']} / {ja['max']}", ""),
        ("submit ms p50 / p99 / max (all attempts)", f"{sm['p50']} / {sm['p99']} / {sm['max']}", ""),
        ("stand-in: jobs run / model loads", f"{out['stand_in']['jobs_run']} / {out['stand_in']['model_loads']}", ""),
    ]
    print("\n| measure | value | target |\n|---|---|---|")
    for name, value, target in rows:
        print(f"| {name} | {value} | {target} |")
    if out["refused_other_texts"]:
        print("\nother refusals:", json.dumps(out["refused_other_texts"], ensure_ascii=False))
    if out["cap_violation_examples"]:
        print("cap violations, first few:", "; ".join(out["cap_violation_examples"]))


def _ok(met: bool, target: str) -> str:
    return f"{target}: {'met' if met else 'MISSED'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=500, help="attempts (imagine + regenerate reactions), all users")
    parser.add_argument("--cap", type=int, default=5, help="[scheduler] max_queued_per_user")
    parser.add_argument("--queue-limit", type=int, default=200, help="[limits] max_queued_jobs")
    parser.add_argument("--cooldown", type=float, default=0.5, help="[bot] cooldown_s")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds over which the attempts arrive")
    parser.add_argument("--rush", type=float, default=8.0, help="the first seconds, when --rush-share of bursts come")
    parser.add_argument("--rush-share", type=float, default=0.75)
    parser.add_argument("--react-share", type=float, default=0.15)
    parser.add_argument("--scale", type=float, default=0.05, help="wall seconds per stand-in GPU second")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="give up after this long (exit 3)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    info = machine()
    with tempfile.TemporaryDirectory(prefix="promptpics-load-") as folder:
        out = asyncio.run(run(args, Path(folder) / "data"))
    out = {"machine": info, "parameters": {k: v for k, v in vars(args).items() if k != "json"},
           "gpu": "stand-in (scaled sleeps)", **out}
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        print_table(out)
    if out["seconds"]["timed_out"]:
        return 3
    return 1 if out["lost"] or out["duplicates"] or out["cap_violations"] or out["cap_violations_snapshot"] else 0


if __name__ == "__main__":
    sys.exit(main())
