"""Whether a target's weights are on this disk, without the network: complete, partial or
missing, and their size. ``promptpics doctor`` and ``promptpics models`` read it.

A hub download made by ``promptpics download`` leaves huggingface_hub's listing of the commit
(``trees/<commit>.json``) beside the snapshot: completeness is then exact (every selected file
present). A snapshot made some other way (a first ``from_pretrained``) is judged by its own
``model_index.json`` or ``config.json``: every folder it names present, every shard a
``*.index.json`` names present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine.weights.files import WeightsTarget, components, select_files

Status = Literal["complete", "partial", "missing"]


@dataclass(frozen=True, slots=True)
class WeightsState:
    target: WeightsTarget
    status: Status
    nbytes: int  # on disk
    where: str  # "local folder" or "hub cache"
    detail: str  # why partial or missing; "" when complete


def weights_state(target: WeightsTarget, cache_dir: Path) -> WeightsState:
    if target.local:
        folder = Path(target.source)
        return _judge(target, folder if folder.is_dir() else None, "local folder", _folder_bytes(folder), incomplete=0)
    storage = cache_dir / ("models--" + target.source.replace("/", "--"))
    snapshot = _snapshot(storage)
    incomplete = len(list((storage / "blobs").glob("*.incomplete"))) if storage.is_dir() else 0
    return _judge(target, snapshot, "hub cache", _folder_bytes(storage / "blobs"), incomplete)


def _judge(target: WeightsTarget, folder: Path | None, where: str, nbytes: int, incomplete: int) -> WeightsState:
    if folder is None or not (folder / target.probe_file).is_file():
        if where == "local folder":
            what = "the folder does not exist" if folder is None else f"it has no {target.probe_file}"
        else:
            what = "not downloaded" if nbytes == 0 else f"no {target.probe_file} yet"
        return WeightsState(target, "missing" if nbytes == 0 or folder is None else "partial", nbytes, where, what)
    absent = _absent(target, folder)
    if absent:
        return WeightsState(target, "partial", nbytes, where, f"{len(absent)} file(s) missing, such as {absent[0]}")
    if incomplete:
        return WeightsState(target, "partial", nbytes, where, f"{incomplete} file(s) half-downloaded")
    return WeightsState(target, "complete", nbytes, where, "")


def _absent(target: WeightsTarget, folder: Path) -> list[str]:
    index = _read_json(folder / "model_index.json") if target.kind == "pipeline" else None
    listed = _listed_files(folder)
    if listed is not None:  # the exact rule: what `download` selects from the commit's listing
        return [p for p in select_files(target.kind, listed, index) if not (folder / p).is_file()]
    folders = components(index or {}) if target.kind == "pipeline" else [""]
    absent = [name for name in folders if not (folder / name).is_dir() or not any((folder / name).iterdir())]
    for name in folders:
        for shard_index in (folder / name).glob("*.index.json") if (folder / name).is_dir() else ():
            shards = set((_read_json(shard_index) or {}).get("weight_map", {}).values())
            absent += [f"{name}/{s}".lstrip("/") for s in sorted(shards) if not (folder / name / s).is_file()]
    return absent


def _listed_files(snapshot: Path) -> list[str] | None:
    """The commit's file list cached by huggingface_hub: <storage>/trees/<commit>.json."""
    data = _read_json(snapshot.parent.parent / "trees" / f"{snapshot.name}.json")
    files = (data or {}).get("files")
    return list(files) if isinstance(files, dict) else None


def _snapshot(storage: Path) -> Path | None:
    ref = storage / "refs" / "main"
    if ref.is_file():
        folder = storage / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if folder.is_dir():
            return folder
    found = sorted((storage / "snapshots").glob("*")) if (storage / "snapshots").is_dir() else []
    return found[-1] if found else None


def _read_json(path: Path) -> dict | None:  # type: ignore[type-arg]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _folder_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
