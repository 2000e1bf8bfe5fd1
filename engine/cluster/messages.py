"""What a Ray worker's actor and the bot send each other: plain data, pickled by Ray
(engine/cluster/ray_worker.py). Imports no ray."""

from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.cluster import WorkerInfo

if TYPE_CHECKING:
    from engine.config import Config
    from engine.cluster.runner import RunOutput
    from engine.residency import ResidencyStatus, ResidentModel


@dataclass(frozen=True, slots=True)
class Residency:
    """One worker's residency as the bot caches it: the engine reads it synchronously on its loop,
    so it is sent back after every call that can change it instead of being asked for."""

    ready: frozenset[str] = frozenset()  # on the card
    parked: frozenset[str] = frozenset()  # in the worker's RAM tier
    status: ResidencyStatus | None = None
    models: tuple[ResidentModel, ...] = ()
    fits: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Raised:
    """An exception as plain data. Our errors are built from their fields (``ConfigError(key,
    value, rule)``) but pickle by their message, so Ray cannot rebuild them: the class, args and
    attributes travel instead, and the actor's traceback comes along as a note for the log."""

    kind: type[BaseException]
    args: tuple[Any, ...]
    state: dict[str, Any]
    trace: str

    @classmethod
    def of(cls, exc: BaseException) -> Raised:
        trace = "".join(traceback.format_exception(exc))
        args, state = exc.args, dict(getattr(exc, "__dict__", {}))
        try:
            pickle.dumps((type(exc), args, state))
        except Exception:  # noqa: BLE001 - e.g. a foreign error holding a tensor or a lock
            # unsent, it would end the stream and read as the worker's death: a plain error instead
            return cls(RuntimeError, (f"{type(exc).__name__}: {exc}",), {}, trace)
        return cls(type(exc), args, state, trace)

    def rebuild(self, worker: str) -> BaseException:
        exc = self.kind.__new__(self.kind)
        exc.args = self.args
        exc.__dict__.update(self.state)
        exc.add_note(f"raised on worker {worker}:\n{self.trace}")
        return exc


@dataclass(frozen=True, slots=True)
class Step:
    step: int
    total: int


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of a job's stream: its output or what the runner raised, and the residency after it."""

    output: RunOutput | None
    error: Raised | None
    residency: Residency


@dataclass(frozen=True, slots=True)
class Started:
    config: Config
    info: WorkerInfo
    residency: Residency
    pid: int
