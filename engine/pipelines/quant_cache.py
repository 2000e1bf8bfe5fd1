"""A disk cache of quantised components: a part quantised with int8 or fp8 (torchao) is saved
once, in safetensors through the library's own ``save_pretrained``, and every later load reads
the quantised bytes instead of reading the bf16 weights and quantising them again. FLUX.1-dev
with an int8 transformer and T5 reads 17.7 GB instead of 33.7 GB and skips the quantisation.

    <data_dir>/quantised/<model id>/<component>-<quant>-<key>/
        config.json, *.safetensors, promptpics-quantised.json (written last: the manifest)

``key`` is a hash of what the cached bytes depend on: the source files of that component
(names, sizes, modification times), the quantisation, the dtype, and the versions of torch,
torchao, diffusers and transformers. A changed source or an upgrade makes a new key, and the
old entries of that part are removed once the new one is written.

Safe against a second process and a crash: an entry is written into a private folder, its files
synced, then renamed into place in one step (a rename onto an existing entry fails, and the
loser drops its copy). A reader checks the manifest and every file's size; an entry that fails
that check or fails to load is removed and the part is quantised again from the source.
nf4 parts are not cached: bitsandbytes quantises while it moves the weights to the GPU.
Nothing here raises for the cache's sake: a cache that cannot be read or written costs time,
never a job.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from engine.config import ModelSpec
from engine.pipelines.quantise import LOADED_APART, quantised_parts, quiet_torchao_import

log = logging.getLogger(__name__)

MANIFEST = "promptpics-quantised.json"
FORMAT = 1
CACHED_QUANTS = ("int8", "fp8")
STALE_TMP_S = 3600.0  # a private folder older than this was left by a crash
# Room left on the data folder's disk after an entry is written: the images and the history
# share that disk, and a cache must never be what fills it.
MIN_FREE_AFTER_BYTES = 5 * 2**30
MIN_FREE_AFTER_SHARE = 0.05
_LIBRARIES = ("torch", "torchao", "diffusers", "transformers")
_ALLOWED_MODULES = ("diffusers.", "transformers.")  # classes a manifest may name
_UNWRITABLE: set[Path] = set()  # entries whose write failed in this process: not tried (nor warned) again


class QuantCache:
    """The cache under ``root`` (``<data_dir>/quantised``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------------

    def load_parts(self, spec: ModelSpec, dtype: Any) -> dict[str, Any]:
        """``{component: module}`` for every cacheable quantised part of ``spec`` with a valid
        entry; a part missing here is loaded and quantised from the source as usual."""
        out = {}
        for name, quant in cacheable_parts(spec).items():
            entry = self._entry(spec, name, quant, dtype)
            if entry is None or not entry.exists():
                continue
            if not _valid(entry):  # entries are renamed in whole: this one was damaged since
                log.warning("%s: the cached %s %s at %s is incomplete (a file is missing or has another size "
                            "than its manifest says); it is removed and the part is quantised again from %s",
                            spec.id, name, quant, entry, spec.source)
                _remove(entry)
                continue
            started = time.perf_counter()
            try:
                with quiet_torchao_import([quant]):  # torchao's import-time warnings, as when it quantises
                    module = _load_module(entry, spec, name, dtype)
            except MemoryError:  # the machine, not the entry: kept, and the load fails as any would
                raise
            except Exception as exc:  # truncated, from another library version, ...
                log.warning("%s: the cached %s %s at %s does not load (%s: %s); it is removed and the part is "
                            "quantised again from %s", spec.id, name, quant, entry, type(exc).__name__, exc,
                            spec.source)
                _remove(entry)
                continue
            log.info("%s: %s %s read from the quantised cache in %.2f s", spec.id, name, quant,
                     time.perf_counter() - started)
            out[name] = module
        return out

    def missing_parts(self, spec: ModelSpec, dtype: Any) -> list[str]:
        """The cacheable parts of ``spec`` without a valid entry (nothing is loaded to tell)."""
        return [name for name, quant in cacheable_parts(spec).items()
                if (entry := self._entry(spec, name, quant, dtype)) is None or not _valid(entry)]

    # -- writing ---------------------------------------------------------------------------

    def store_parts(self, spec: ModelSpec, dtype: Any, pipe: Any, *, skip: Iterable[str] = ()) -> list[str]:
        """Save every cacheable quantised part of the freshly loaded ``pipe`` not in ``skip``;
        returns the parts written (one another process wrote first counts as written)."""
        written = []
        for name, quant in cacheable_parts(spec).items():
            module = getattr(pipe, name, None)
            entry = None if name in skip or module is None else self._entry(spec, name, quant, dtype)
            if entry is not None and self._store(spec, name, quant, module, entry):
                written.append(name)
        return written

    def _store(self, spec: ModelSpec, name: str, quant: str, module: Any, entry: Path) -> bool:
        if _valid(entry):
            return True
        if entry in _UNWRITABLE:
            return False
        tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            need, disk = _module_bytes(module), shutil.disk_usage(entry.parent)
            keep = max(MIN_FREE_AFTER_BYTES, int(MIN_FREE_AFTER_SHARE * disk.total))
            if disk.free - need < keep:
                log.warning("%s: the quantised cache for %s %s is not written: it needs %.1f GB and %s would keep "
                            "%.1f GB free, under the %.1f GB kept for images and the history; the part is quantised "
                            "again at each load until there is room", spec.id, name, quant, need / 1e9, entry.parent,
                            (disk.free - need) / 1e9, keep / 1e9)
                return False
            with quiet_torchao_import([quant]):
                module.save_pretrained(tmp, safe_serialization=True)
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"format": FORMAT, "model": spec.id, "component": name, "quant": quant,
                        "class": f"{type(module).__module__}:{type(module).__qualname__}", "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _sync(tmp)
            try:
                os.rename(tmp, entry)
            except OSError:  # another process renamed its copy first: keep theirs
                _remove(tmp)
                return _valid(entry)
        except Exception as exc:  # a full disk, a read-only data folder, a format torchao cannot save
            log.warning("%s: could not write the quantised cache for %s %s at %s (%s: %s); the part is "
                        "quantised again at each load, and not written again until a restart", spec.id, name, quant,
                        entry, type(exc).__name__, exc)
            _remove(tmp)
            _UNWRITABLE.add(entry)
            return False
        log.info("%s: %s %s saved to the quantised cache (%.0f MB) in %.2f s", spec.id, name, quant,
                 sum(files.values()) / 2**20, time.perf_counter() - started)
        self._prune(entry)
        return True

    def _prune(self, entry: Path) -> None:
        """Other keys of the same part (an older source or library version), and private folders
        a crash left behind."""
        prefix = entry.name.rsplit("-", 1)[0] + "-"
        now = time.time()
        for other in entry.parent.iterdir():
            stale_tmp = other.name.startswith(f".{prefix}") and ".tmp-" in other.name and \
                now - other.stat().st_mtime > STALE_TMP_S
            if other != entry and (stale_tmp or other.name.startswith(prefix)):
                _remove(other)

    # -- keys ------------------------------------------------------------------------------

    def _entry(self, spec: ModelSpec, name: str, quant: str, dtype: Any) -> Path | None:
        source = _component_source(spec, name)
        try:
            files = [] if source is None else sorted(
                (str(p.relative_to(source)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        except OSError:  # a file went away while listed: no key this time
            files = []
        if not files:
            return None
        versions = _versions()
        blob = json.dumps({"format": FORMAT, "files": files, "quant": quant, "dtype": str(dtype),
                           "versions": versions}, sort_keys=True)
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self.root / spec.id / f"{name}-{quant}-{key}"


def cached_on_disk(root: Path, spec: ModelSpec) -> tuple[int, int]:
    """(finished entries, their bytes) kept for ``spec`` under ``root``, whatever their key: what
    ``promptpics doctor`` reports. No torch, no hub lookups."""
    folder = Path(root) / spec.id
    entries = [p for p in folder.iterdir() if not p.name.startswith(".") and _valid(p)] if folder.is_dir() else []
    return len(entries), sum(f.stat().st_size for e in entries for f in e.iterdir() if f.is_file())


def cacheable_parts(spec: ModelSpec) -> dict[str, str]:
    """``{component: quant}`` for the parts of ``spec`` the cache keeps (torchao's int8 and fp8)."""
    return {n: q for n, q in quantised_parts(spec).items() if q in CACHED_QUANTS}


def _component_source(spec: ModelSpec, name: str) -> Path | None:
    """The folder the part is read from: a local folder, or the hub snapshot already on disk
    (None before the first download: nothing to key the entry on yet)."""
    apart = LOADED_APART.get(spec.family) == name
    source = spec.text_encoder_source if apart else spec.source
    if source is None:
        return None
    folder = Path(source) if os.path.isdir(source) else _hub_snapshot(source)
    if folder is None:
        return None
    return folder if apart else folder / name


def _hub_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def _valid(entry: Path) -> bool:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files: Mapping[str, int] = manifest["files"]
        return manifest.get("format") == FORMAT and bool(files) and \
            all((entry / f).stat().st_size == size for f, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _load_module(entry: Path, spec: ModelSpec, name: str, dtype: Any) -> Any:
    manifest = json.loads((entry / MANIFEST).read_text())
    module_name, _, qualname = manifest["class"].partition(":")
    if not module_name.startswith(_ALLOWED_MODULES):
        raise ValueError(f"the manifest names {manifest['class']!r}, not a diffusers or transformers class")
    cls = getattr(importlib.import_module(module_name), qualname)
    extra: dict[str, Any] = {}
    if LOADED_APART.get(spec.family) == name:  # HiDream's Llama: the pipeline reads its layers
        extra = {"output_hidden_states": True, "output_attentions": True}
    return cls.from_pretrained(entry, dtype=dtype, local_files_only=True, **extra)


def _module_bytes(module: Any) -> int:
    from engine.pipelines.sizes import module_nbytes

    return module_nbytes(module)


def _sync(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@functools.cache
def _versions() -> dict[str, str]:
    """The libraries the cached bytes depend on (read once: they do not change under a process)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for lib in _LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "-"
    return out
