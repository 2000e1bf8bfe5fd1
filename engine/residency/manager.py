"""ResidencyManager: what is loaded where, used only from the GPU thread (see the package docstring)."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from engine.config import ModelSpec, ResidencySettings
from engine.errors import OutOfMemoryError
from engine.residency.device import TorchOps
from engine.residency.model import (
    DECODE_PHASE,
    OFFLOADED,
    GiB,
    DeviceOps,
    ResidencyStatus,
    ResidentModel,
)

if TYPE_CHECKING:
    from engine.pipelines import LoadedPipeline

log = logging.getLogger(__name__)

T = TypeVar("T")
Loader = Callable[["ModelSpec", Any, Any], "LoadedPipeline"]


@dataclass(slots=True)
class _Entry:
    loaded: LoadedPipeline
    device_bytes: int
    last_used: float
    tick: int  # least recently used = lowest
    demoted: bool = False  # moved to CPU offload by OOM recovery: released, not parked, on eviction
    in_ram: bool = False  # holds a copy in RAM: parked, or kept from its last parking

    @property
    def host_bytes(self) -> int:
        return self.loaded.nbytes


class ResidencyManager:
    def __init__(self, device: Any, dtype: Any, *, loader: Loader | None = None,
                 releaser: Callable[[LoadedPipeline], None] | None = None,
                 settings: ResidencySettings | None = None, ops: DeviceOps | None = None) -> None:
        self._device, self._dtype = device, dtype
        self._ops: DeviceOps = ops or TorchOps(device)
        self._load = loader or self._ops.load
        self._release = releaser or self._ops.release
        self.settings = settings or ResidencySettings()
        self._ready: OrderedDict[str, _Entry] = OrderedDict()
        self._parked: OrderedDict[str, _Entry] = OrderedDict()
        self._pinned: set[str] = set()
        self._known_bytes: dict[str, int] = {}  # measured device bytes by model, from earlier loads
        self._tick = 0
        self._hint: tuple[str, ...] = ()  # set_needed_soon(): the dispatcher's latest plan
        self._lock = threading.Lock()  # guards the published status; all mutation is on the GPU thread
        self._status = ResidencyStatus((), None, 0, None, 0, ())

    # -- acquire ---------------------------------------------------------------------------

    def set_needed_soon(self, models: Sequence[str]) -> None:
        """The models queued jobs will want next, soonest first: the eviction hint when
        ``acquire_blocking`` is given none. Safe from any thread (one tuple is replaced)."""
        self._hint = tuple(models)

    def acquire_blocking(self, spec: ModelSpec, needed_soon: Sequence[str] | None = None) -> tuple[LoadedPipeline, float]:
        """The ready pipeline for ``spec``, brought in if needed; returns it and the seconds
        spent bringing it in. ``needed_soon``: models queued jobs will want, soonest first
        (default: the last ``set_needed_soon``)."""
        entry = self._ready.get(spec.id)
        started = time.perf_counter()
        if entry is None:
            try:
                entry = self._bring_in_blocking(spec, self._hint if needed_soon is None else tuple(needed_soon))
            except BaseException:
                self._ops.clear_cache()  # memory goes back after every failure
                self._publish()
                raise
            load_s = time.perf_counter() - started
        else:
            load_s = 0.0
        self._touch(spec.id, entry)
        self._publish()
        return entry.loaded, load_s

    def _bring_in_blocking(self, spec: ModelSpec, needed_soon: tuple[str, ...]) -> _Entry:
        before = set(self._ready)
        # 1. an exclusive model runs alone, and nothing joins one
        if spec.exclusive:
            self._evict_all_blocking(keep=spec.id, reason=f"{spec.id} runs alone")
        for mid in [m for m, e in self._ready.items() if e.loaded.spec.exclusive]:
            self._evict_blocking(mid, f"{mid} runs alone", needed_soon, keep=spec.id)
        # 2. room within the budget, by the cost rule
        self._make_room_blocking(spec, needed_soon)
        if set(self._ready) != before:
            self._ops.clear_cache()  # a swap: hand the evicted model's cache back before loading
        # 3. in from RAM or disk; out of memory -> evict every other model and try once more
        try:
            entry = self._move_in_blocking(spec)
        except OutOfMemoryError:
            if not self._evict_all_blocking(keep=spec.id, reason="out of memory while loading"):
                raise
            log.warning("%s: out of memory while loading; evicted the others, retrying once", spec.id)
            self._ops.clear_cache()
            entry = self._move_in_blocking(spec)
        self._ready[spec.id] = entry
        # 4. the measured size may be larger than the estimate: hold the budget
        self._trim_blocking(spec.id, needed_soon)
        self._ops.clear_cache()  # after a swap: the loader's temporaries
        return entry

    def _move_in_blocking(self, spec: ModelSpec) -> _Entry:
        before = self._ops.allocated_bytes()
        parked = self._parked.get(spec.id)
        if parked is not None:
            try:
                self._ops.unpark(parked.loaded)  # out of memory: it is back in RAM, still parked
            except OutOfMemoryError:
                raise
            except BaseException:
                del self._parked[spec.id]
                self._safe_release(parked.loaded)
                raise
            del self._parked[spec.id]
            loaded, source = parked.loaded, "RAM"
        else:
            loaded, source = self._load(spec, self._device, self._dtype), "disk"
        after = self._ops.allocated_bytes()
        measured = after - before if before is not None and after is not None else None
        device_bytes = self._ops.device_bytes(loaded, measured)
        self._known_bytes[spec.id] = device_bytes
        log.info("%s: in from %s (%s, %.0f MB on the device)", spec.id, source, loaded.placement, device_bytes / 2**20)
        kept = parked is not None and self._ops.keeps_host_copy
        return _Entry(loaded, device_bytes, time.time(), self._next_tick(),
                      demoted=parked.demoted if parked is not None else False, in_ram=kept)

    # -- budget ----------------------------------------------------------------------------

    def gpu_budget_bytes(self) -> int | None:
        """Configured, or free device memory plus what the ready models hold, minus the reserve."""
        if self.settings.gpu_budget_gb > 0:
            return int(self.settings.gpu_budget_gb * GiB)
        free = self._ops.free_bytes()
        if free is None:
            return None
        return max(0, free + self._gpu_used() - int(self.settings.reserve_gb * GiB))

    def ram_budget_bytes(self) -> int | None:
        if not (self._ops.can_park and self.settings.cpu_ram_gb > 0):
            return None
        return int(self.settings.cpu_ram_gb * GiB)

    def _gpu_used(self) -> int:
        return sum(e.device_bytes for e in self._ready.values())

    def _ram_used(self) -> int:
        ready = sum(e.host_bytes for e in self._ready.values() if e.in_ram or e.loaded.placement in OFFLOADED)
        return ready + sum(e.host_bytes for e in self._parked.values())

    def expected_device_bytes(self, spec: ModelSpec) -> int | None:
        """What the model is expected to take on the device (measured once loaded); None: unknown."""
        return self._expected_device_bytes(spec)

    def _expected_device_bytes(self, spec: ModelSpec) -> int | None:
        if spec.id in self._parked:
            return self._parked[spec.id].device_bytes
        if spec.id in self._known_bytes:
            return self._known_bytes[spec.id]
        try:
            return self._ops.expected_bytes(spec, self._dtype)
        except Exception:  # an estimate only: the load itself will tell
            log.debug("%s: no size estimate", spec.id, exc_info=True)
            return None

    def _make_room_blocking(self, spec: ModelSpec, needed_soon: tuple[str, ...]) -> None:
        budget, need = self.gpu_budget_bytes(), self._expected_device_bytes(spec)
        if budget is None or need is None:
            return  # no budget, or size unknown: load, then trim to the measured size
        for victim in self._victim_order(self._ready, needed_soon, keep=spec.id):
            if self._gpu_used() + need <= budget:
                return
            self._evict_blocking(victim, f"to make room for {spec.id}", needed_soon, keep=spec.id)

    def _trim_blocking(self, keep: str, needed_soon: tuple[str, ...]) -> None:
        budget = self.gpu_budget_bytes()
        if budget is not None:
            for victim in self._victim_order(self._ready, needed_soon, keep=keep):
                if self._gpu_used() <= budget:
                    break
                self._evict_blocking(victim, f"over the GPU budget after loading {keep}", needed_soon, keep=keep)
        self._trim_ram_blocking(0, needed_soon, keep)

    def _victim_order(self, entries: Mapping[str, _Entry], needed_soon: Sequence[str], *, keep: str = "",
                      include_pinned: bool = False) -> list[str]:
        """The cost rule: models no queued job needs soon first (least recently used first),
        then the needed ones, the one needed latest first."""
        rank = {m: i for i, m in reversed(list(enumerate(needed_soon)))}
        candidates = [m for m in entries if m != keep and (include_pinned or m not in self._pinned)]
        return sorted(candidates, key=lambda m: (m in rank, -rank.get(m, 0), entries[m].tick))

    # -- evict -----------------------------------------------------------------------------

    def _evict_blocking(self, model_id: str, reason: str, needed_soon: Sequence[str] = (), keep: str = "") -> None:
        """Off the GPU: parked in RAM if the tier has room, else released. ``keep``: the model
        being brought in, which must not lose its own place in RAM to this."""
        entry = self._ready.pop(model_id)
        if self._room_in_ram_blocking(entry, needed_soon, keep):
            try:
                self._ops.park(entry.loaded)
            except BaseException:
                log.warning("%s: parking in RAM failed; released instead", model_id, exc_info=True)
                self._safe_release(entry.loaded)
                return
            entry.tick, entry.in_ram = self._next_tick(), True
            self._parked[model_id] = entry
            log.info("%s: parked in RAM (%s)", model_id, reason)
            return
        self._safe_release(entry.loaded)
        log.info("%s: unloaded (%s)", model_id, reason)

    def _room_in_ram_blocking(self, entry: _Entry, needed_soon: Sequence[str], keep: str) -> bool:
        budget = self.ram_budget_bytes()
        if budget is None or entry.demoted:
            return False
        freeable = sum(self._parked[v].host_bytes for v in self._ram_victims(self._parked, needed_soon, keep))
        freeable += sum(self._ready[v].host_bytes for v in self._ram_victims(self._ready, needed_soon, keep))
        if self._ram_used() - freeable + entry.host_bytes > budget:
            return False  # it would not fit even with every other RAM copy dropped
        self._trim_ram_blocking(entry.host_bytes, needed_soon, keep)
        return True

    def _trim_ram_blocking(self, need: int, needed_soon: Sequence[str], keep: str = "") -> None:
        """Within the RAM budget: release parked models, then drop the RAM copies kept for
        models on the GPU (each by the cost rule)."""
        budget = self.ram_budget_bytes()
        if budget is None:
            return
        for victim in self._ram_victims(self._parked, needed_soon, keep):
            if self._ram_used() + need <= budget:
                return
            self._safe_release(self._parked.pop(victim).loaded)
            log.info("%s: released from RAM (the RAM tier is full)", victim)
        for victim in self._ram_victims(self._ready, needed_soon, keep):
            if self._ram_used() + need <= budget:
                return
            self._ops.forget_host_copy(self._ready[victim].loaded)
            self._ready[victim].in_ram = False

    def _ram_victims(self, entries: Mapping[str, _Entry], needed_soon: Sequence[str], keep: str) -> list[str]:
        order = self._victim_order(entries, needed_soon, keep=keep, include_pinned=True)
        return [m for m in order if entries is self._parked or entries[m].in_ram]

    def _evict_all_blocking(self, keep: str, reason: str) -> int:
        others = [m for m in self._ready if m != keep]
        if pinned := [m for m in others if m in self._pinned]:
            log.warning("evicting pinned model(s) %s: %s", ", ".join(pinned), reason)
        for mid in others:
            self._evict_blocking(mid, reason, keep=keep)
        return len(others)

    def _safe_release(self, loaded: LoadedPipeline) -> None:
        try:
            self._release(loaded)
        except Exception:
            log.exception("%s: release failed", loaded.spec.id)

    # -- out-of-memory recovery while running ----------------------------------------------

    def run_with_recovery_blocking(self, spec: ModelSpec, run: Callable[[LoadedPipeline, bool], T], *,
                                   job_id: str = "") -> T:
        """``run(loaded, tiled_decode)`` on the ready ``spec``; out of memory is recovered by
        phase (see the module docstring). Memory is handed back after every failure."""
        tiled = False
        remedies = ["free-others", "offload"]
        while True:
            try:
                return run(self._ready[spec.id].loaded, tiled)
            except OutOfMemoryError as exc:
                self._ops.clear_cache()
                if exc.phase == DECODE_PHASE and not tiled:
                    tiled = True
                    log.warning("job %s: out of memory in the VAE decode of %s; again with tiled decoding", job_id, spec.id)
                    continue
                if not self._next_remedy_blocking(spec.id, remedies, job_id):
                    raise
            except BaseException:
                self._ops.clear_cache()
                raise

    def _next_remedy_blocking(self, model_id: str, remedies: list[str], job_id: str) -> bool:
        while remedies:
            remedy = remedies.pop(0)
            if remedy == "free-others" and self.free_others_blocking(keep=model_id):
                log.warning("job %s: out of memory on %s; evicted the others, retrying once", job_id, model_id)
                return True
            if remedy == "offload" and self.offload_blocking(model_id):
                log.warning("job %s: out of memory on %s; retrying with CPU offload", job_id, model_id)
                return True
        return False

    def free_others_blocking(self, keep: str) -> int:
        """Evict every model but ``keep`` (pinned ones too); returns how many went."""
        count = self._evict_all_blocking(keep, "out of memory")
        self._ops.clear_cache()
        self._publish()
        return count

    def offload_blocking(self, model_id: str) -> bool:
        """Move a ready model to CPU offload (OOM recovery); False where that is not possible."""
        entry = self._ready.get(model_id)
        if entry is None:
            return False
        try:
            moved = self._ops.offload(entry.loaded)
        except BaseException:
            del self._ready[model_id]
            self._safe_release(entry.loaded)
            self._publish()
            raise
        if moved:
            entry.device_bytes, entry.demoted = self._ops.device_bytes(entry.loaded, None), True
            self._ops.clear_cache()
            self._publish()
        return moved

    # -- admin: preload, unload, pin -------------------------------------------------------

    def preload_blocking(self, spec: ModelSpec, *, pin: bool = False, needed_soon: Sequence[str] | None = None) -> float:
        """Make ``spec`` ready ahead of its jobs (and pin it); returns the seconds it took."""
        if pin:
            self._pinned.add(spec.id)
        return self.acquire_blocking(spec, needed_soon)[1]

    def pin_blocking(self, model_id: str, pinned: bool = True) -> None:
        """A pinned model is never evicted by the cost rule (an exclusive model or OOM still can)."""
        (self._pinned.add if pinned else self._pinned.discard)(model_id)
        self._publish()

    def unload_blocking(self, model_id: str) -> bool:
        """Release ``model_id`` from the GPU and from RAM, and drop its pin."""
        self._pinned.discard(model_id)
        entry = self._ready.pop(model_id, None) or self._parked.pop(model_id, None)
        if entry is None:
            self._publish()
            return False
        self._safe_release(entry.loaded)
        self._ops.clear_cache()
        log.info("unloaded %s", model_id)
        self._publish()
        return True

    def unload_all_blocking(self) -> None:
        for mid in [*self._ready, *self._parked]:
            entry = self._ready.pop(mid, None) or self._parked.pop(mid)
            self._safe_release(entry.loaded)
        self._ops.clear_cache()
        self._publish()

    # -- status: safe from any thread ------------------------------------------------------

    def snapshot(self) -> tuple[ResidentModel, ...]:
        with self._lock:
            return self._status.models

    def status(self) -> ResidencyStatus:
        with self._lock:
            return self._status

    def is_resident(self, model_id: str) -> bool:
        return any(r.model_id == model_id and r.where != "cpu-ram" for r in self.snapshot())

    def placement_sets(self) -> tuple[frozenset[str], frozenset[str]]:
        """(ready models, parked models) as the scheduler wants them."""
        rows = self.snapshot()
        return (frozenset(r.model_id for r in rows if r.where != "cpu-ram"),
                frozenset(r.model_id for r in rows if r.where == "cpu-ram"))

    def _touch(self, model_id: str, entry: _Entry) -> None:
        entry.last_used, entry.tick = time.time(), self._next_tick()
        self._ready.move_to_end(model_id)

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _publish(self) -> None:
        rows = [self._row(mid, e, _where(e.loaded.placement)) for mid, e in self._ready.items()]
        rows += [self._row(mid, e, "cpu-ram") for mid, e in self._parked.items()]
        status = ResidencyStatus(tuple(rows), self.gpu_budget_bytes(), self._gpu_used(), self.ram_budget_bytes(),
                                 self._ram_used(), tuple(sorted(self._pinned)))
        with self._lock:
            self._status = status

    def _row(self, model_id: str, e: _Entry, where: str) -> ResidentModel:
        return ResidentModel(model_id, e.loaded.placement, e.loaded.nbytes, e.loaded.load_s, e.last_used, where,
                             e.device_bytes if where != "cpu-ram" else 0, model_id in self._pinned)


def _where(placement: str) -> str:
    return "offloaded" if placement in OFFLOADED else "cpu" if placement == "cpu" else "gpu"
