"""The terminal adapter: the bot's commands typed (or piped) on stdin, answers on stdout.

It goes through the same ``Commands`` and ``Delivery`` as Discord and Slack, so what works
here works there. The terminal's user is an admin. When input ends, it waits for the jobs it
submitted, prints their results, and returns the exit status (1 if anything was refused or
failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TextIO

from bot import messages
from bot.commands import Actor, AdminPolicy, Commands, Reply, Submitted
from bot.delivery import Delivery
from bot.outlet import MessageRef, Picture, PreviewPicture
from engine import JobStatus, Origin, StoredJob, write_atomic

log = logging.getLogger(__name__)

PLATFORM = "console"
ADMINS = AdminPolicy(everyone=True, every_server=True)  # whoever holds the terminal owns the machine


class ConsoleOutlet:
    """Prints a job's status lines and the path of its PNG (``outlet.Outlet``). Previews are
    written to ``previews_dir/<job id>-preview.jpg`` (overwritten as the job goes on, removed
    once the image is there) and their path printed; without a folder they are not shown."""

    platform = PLATFORM
    progress_interval_s: float | None = 0.0  # a terminal line costs nothing: show every step

    def __init__(self, out: TextIO, previews_dir: Path | None = None, sheets_dir: Path | None = None) -> None:
        self._out = out
        self._previews_dir = previews_dir
        self._sheets_dir = sheets_dir
        self._last: dict[str, str] = {}  # job id -> the status line printed last

    def mention(self, user_id: str) -> str:
        return ""

    def _print(self, job: StoredJob, text: str, *, unless_same: bool = False) -> None:
        # Status text is several lines (head, routing, prompt, job id); one line here is enough.
        lines = [ln for ln in text.splitlines() if ln and not ln.startswith("> ") and not ln.startswith("job `")]
        line = f"job {job.id}: " + " · ".join(lines).replace("`", "")
        if unless_same and self._last.get(job.id) == line:
            return
        self._last.pop(job.id, None)
        self._last[job.id] = line
        if len(self._last) > 256:  # failed and cancelled jobs never reach post_result
            del self._last[next(iter(self._last))]
        print(line, file=self._out, flush=True)

    async def post_status(self, job: StoredJob, text: str) -> MessageRef:
        self._print(job, text)
        return MessageRef("terminal", f"{job.id}-status")

    async def edit_status(self, job: StoredJob, ref: MessageRef, text: str) -> None:
        self._print(job, text)

    async def edit_status_with_preview(self, job: StoredJob, ref: MessageRef, text: str,
                                       preview: PreviewPicture | None) -> None:
        self._print(job, text, unless_same=True)  # the step line is usually out already
        if self._previews_dir is None:
            return
        if preview is None:
            await asyncio.to_thread(_remove_previews, self._previews_dir, job.id)
            return
        path = self._previews_dir / preview.filename
        await asyncio.to_thread(write_atomic, path, preview.data)
        print(f"job {job.id}: preview at step {preview.step}/{preview.total}: {path}", file=self._out, flush=True)

    async def post_result(self, job: StoredJob, picture: Picture, caption: str, status: MessageRef | None) -> MessageRef:
        self._print(job, "✅ " + caption.splitlines()[-1])
        print(picture.path, file=self._out, flush=True)
        self._last.pop(job.id, None)
        if self._previews_dir is not None:
            await asyncio.to_thread(_remove_previews, self._previews_dir, job.id)
        return MessageRef("terminal", job.id)

    async def add_reactions(self, job: StoredJob, ref: MessageRef, emojis: Sequence[str]) -> None:
        return None

    async def post_sheet(self, job: StoredJob, sheet_id: str, png: bytes, caption: str) -> MessageRef:
        """A /compare or /sweep contact sheet: written to ``sheets_dir/<sheet id>-sheet.png``, its path printed."""
        if self._sheets_dir is None:
            raise RuntimeError("no folder for contact sheets")
        path = self._sheets_dir / f"{sheet_id}-sheet.png"
        await asyncio.to_thread(write_atomic, path, png)
        print(caption.replace("`", ""), file=self._out, flush=True)
        print(f"sheet {sheet_id}: {path}", file=self._out, flush=True)
        return MessageRef("terminal", sheet_id)

    async def retire_status(self, job: StoredJob, ref: MessageRef) -> None:
        self._last.pop(job.id, None)


class ConsoleApp:
    """Reads command lines until end of input; ``run()`` returns the exit status."""

    def __init__(self, commands: Commands, delivery: Delivery, *, stdin: TextIO | None = None,
                 stdout: TextIO | None = None, user: str | None = None) -> None:
        self.commands, self.delivery = commands, delivery
        self._in = stdin or sys.stdin
        self._out = stdout or sys.stdout
        name = user or _login_name()
        self.actor = Actor(platform=PLATFORM, user_id=name, display_name=name)
        self.origin = Origin(platform=PLATFORM, channel_id="terminal")
        self.outlet = ConsoleOutlet(self._out, commands.config.data_dir / "previews", commands.config.data_dir / "sheets")

    async def run(self) -> int:
        submitted: list[str] = []
        refused = 0
        if self._in.isatty():
            print("PromptPics: type /help for the commands, a prompt to make an image, Ctrl-D to quit.",
                  file=self._out, flush=True)
        async for line in _lines(self._in):
            try:
                outcome = await self.commands.run_line(self.actor, line, self.origin)
            except Exception as exc:  # the catch-all of this boundary: say it, keep reading
                outcome = Reply(messages.describe_error(exc), ok=False)
            if isinstance(outcome, Submitted):
                submitted.append(outcome.handle.id)
            elif outcome is not None:
                refused += not outcome.ok
                print(outcome.text.replace("`", ""), file=self._out, flush=True)  # no markdown in a terminal
                if outcome.image_path:
                    print(outcome.image_path, file=self._out, flush=True)
        await self.commands.groups.settled()  # input ended: finish what was asked, contact sheets too
        submitted += self.commands.groups.jobs
        for job_id in submitted:
            await self.delivery.settled(job_id)
        failed = 0
        for job_id in submitted:
            job = await self.commands.engine.history.get_job(job_id)
            failed += job is None or job.status is not JobStatus.SUCCEEDED
        return 1 if refused or failed else 0


async def _lines(stream: TextIO) -> AsyncIterator[str]:
    """Lines from a blocking stream, read on a daemon thread (a thread blocked in readline
    must not keep the process alive after Ctrl-C)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        try:
            for line in stream:
                loop.call_soon_threadsafe(queue.put_nowait, line)
        except RuntimeError:  # the loop closed first: nobody is listening any more
            return
        except Exception:  # an unreadable byte, a closed stream: end the input, say why
            log.warning("stopped reading input", exc_info=True)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="promptpics-stdin", daemon=True).start()
    while (line := await queue.get()) is not None:
        yield line


def _remove_previews(folder: Path, job_id: str) -> None:
    for path in folder.glob(f"{job_id}-preview.*"):
        path.unlink(missing_ok=True)


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers)
        return "local"
