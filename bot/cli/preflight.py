"""What a command checks before any engine starts: the data folder, ``--out``, whether the hub
can be reached (decided once), the weights on this machine, and a closed stdout.

Each refusal is a ``Refused`` with at most three lines; ``bot.cli.main`` prints it and exits 2.
Nothing here imports torch; huggingface_hub only where a weight is looked up in its cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from engine import Config, missing_weights, source_state

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 2.0
NEXT_STEPS = ("run `promptpics download` to fetch them (or `promptpics download MODEL` for one), "
              "`promptpics doctor` to see what else is missing; `--profile tiny` needs no weights")


class Refused(Exception):
    """A command refused before it started; ``str()`` is what the user reads (at most 3 lines)."""


# -- the data folder and --out ---------------------------------------------------------------------


def check_data_dir(config: Config, env: Mapping[str, str], *, writes: bool) -> None:
    """The data folder is a folder, and writable when the command writes (read-only commands can
    read a backup)."""
    folder = config.data_dir
    key = "PROMPTPICS_DATA_DIR" if env.get("PROMPTPICS_DATA_DIR") else "engine.data_dir"
    if folder.exists() and not folder.is_dir():
        raise Refused(f"promptpics: config: `{key}` is {str(folder)!r}, but it must be a folder, not a file")
    if writes and (why := _unwritable(folder)):
        raise Refused(f"promptpics: config: `{key}` is {str(folder)!r}, but it must be a folder this user can "
                      f"write ({why}); read-only commands (history, show, stats) work on it as it is")


def check_out(out: Path) -> None:
    """``--out`` must name a file this user can write; checked before anything renders."""
    if out.is_dir():
        raise Refused(f"promptpics: `--out` is {str(out)!r}, but it must be a file name, not a folder "
                      f"(such as {str(out / 'image.png')!r})")
    if out.exists() and not os.access(out, os.W_OK):
        raise Refused(f"promptpics: `--out` is {str(out)!r}, but that file cannot be overwritten (permission denied)")
    if why := _unwritable(out.parent):
        raise Refused(f"promptpics: `--out` is {str(out)!r}, but its folder cannot be written ({why})")


def _unwritable(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder`` (made if missing), or None. Tried for real: a
    permission check alone says yes to root on a read-only mount."""
    above = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if above is not None and not above.is_dir():
        return f"{str(above)!r} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


# -- the hub: reachable or not, decided once --------------------------------------------------------


def settle_offline(sources: Iterable[str], env: Mapping[str, str] | None = None) -> bool:
    """Decide once whether the hub is used, before huggingface_hub reads its settings; True: offline.

    HF_HUB_OFFLINE set: offline. Everything ``sources`` names already on this machine: offline
    too (local files only; no request, no retry). Else one short connection to the hub decides;
    an unreachable hub turns HF_HUB_OFFLINE on so no load waits ~50 s on retries.
    """
    env = os.environ if env is None else env
    if env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    missing = [s for s in sources if not _on_this_machine(s)]
    if missing and _hub_reachable(env.get("HF_ENDPOINT") or "https://huggingface.co"):
        return False
    log.info("hub: %s; using local files only", f"unreachable, {len(missing)} source(s) not here" if missing
             else "every source is already here")
    _go_offline()
    return True


def _on_this_machine(source: str) -> bool:
    if source.startswith("package:") or os.path.isabs(source):
        return True  # a package's or a folder's files: the hub plays no part
    return any(source_state(source, marker) == "downloaded" for marker in ("config.json", "model_index.json"))


def _hub_reachable(endpoint: str) -> bool:
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")  # read at import: set it there too if already in
    if hub is not None:
        hub.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]


def hub_sources(config: Config, model_ids: Iterable[str], *, llms: bool = True) -> list[str]:
    """Every hub id or folder the command may load: those models, the embedding model and the LLMs."""
    sources: list[str] = []
    for model_id in model_ids:
        spec = config.model(model_id)
        sources += [s for s in (spec.source, spec.text_encoder_source) if s]
    if "embeddings" in config.router.stages:
        sources.append(config.router.embedding_model)
    if llms:
        sources += [config.router_llm_id, config.rewrite_llm_id]
    return sources


# -- the weights -----------------------------------------------------------------------------------


def check_weights(config: Config, model_ids: Iterable[str], *, offline: bool) -> None:
    """Every model the request may run on has its weights here (the ``tiny`` profile builds its own)."""
    if config.profile == "tiny":
        return
    missing = missing_weights(config, model_ids)
    if not missing:
        return
    where = "HF_HUB_OFFLINE is set or the hub cannot be reached" if offline else "they are not downloaded yet"
    names = ", ".join(missing)
    raise Refused(f"promptpics: no weights on this machine for {names} ({where}).\n"
                  f"promptpics: {NEXT_STEPS}.")


def check_serving_weights(config: Config, *, offline: bool) -> None:
    """``chat`` and ``run``: refused when no configured model has its weights here (nothing could
    ever render); a warning line for each one missing otherwise (jobs routed to it would fail)."""
    if config.profile == "tiny":
        return
    missing = missing_weights(config, config.models)
    if len(missing) == len(config.models):
        check_weights(config, config.models, offline=offline)
    for model_id, why in missing.items():
        print(f"promptpics: warning: no weights on this machine for {model_id} ({why}): jobs routed to it fail "
              f"until `promptpics download {model_id}`", file=sys.stderr)


# -- a closed stdout -------------------------------------------------------------------------------


@contextlib.contextmanager
def cancelled_when_stdout_closes() -> Iterator[Callable[[], bool]]:
    """Cancel the current task when the reader of stdout goes away (``... | head -1``), as Ctrl-C
    does; yields whether that happened. Only for a pipe or socket: a file never closes on us."""
    closed = False
    try:
        fd = sys.stdout.fileno()
        watched = stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISSOCK(os.fstat(fd).st_mode)
    except (OSError, ValueError, AttributeError):
        watched = False
    if not watched:
        yield lambda: closed
        return
    loop, task = asyncio.get_running_loop(), asyncio.current_task()

    def check() -> None:  # epoll reports the write end of a pipe as ready when its reader closes
        nonlocal closed
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0)):
            closed = True
            loop.remove_reader(fd)
            if task is not None:
                task.cancel()

    loop.add_reader(fd, check)
    try:
        yield lambda: closed
    finally:
        loop.remove_reader(fd)
