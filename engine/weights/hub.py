"""Talking to the model hub: plan a download (which files, how big, what is already cached),
check the disk, fetch. huggingface_hub does the transfer: parallel, resumed after a dropped
connection, complete files skipped. Its errors are translated here into ``WeightsError``s.

    hub = Hub.from_environment(os.environ)        # HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_TOKEN
    plans = [plan_download(t, hub) for t in weight_targets(config, ["flux_dev"])]
    check_disk(plans, hub)                        # NotEnoughDiskError before a byte is fetched
    for plan in plans:
        fetch(plan, hub)
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.weights.errors import (
    DownloadInterruptedError,
    GatedModelError,
    HubUnreachableError,
    NotEnoughDiskError,
    WeightsError,
)
from engine.weights.files import WeightsTarget, select_files

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Hub:
    """Where the hub is and where its files go; read once from the environment by the caller."""

    endpoint: str
    cache_dir: Path
    token: str | None = None  # None: huggingface_hub's own saved login, if any

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> Hub:
        from huggingface_hub import constants

        endpoint = (env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        if env.get("HF_HUB_CACHE"):
            cache = Path(env["HF_HUB_CACHE"])
        elif env.get("HF_HOME"):
            cache = Path(env["HF_HOME"]).expanduser() / "hub"
        else:
            cache = Path(constants.HF_HUB_CACHE)
        return cls(endpoint, cache.expanduser(), env.get("HF_TOKEN") or None)


@dataclass(frozen=True, slots=True)
class DownloadPlan:
    target: WeightsTarget
    commit: str
    files: Mapping[str, int]  # path in the repository -> bytes
    cached: frozenset[str]  # the ones already complete in the cache

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def missing(self) -> dict[str, int]:
        return {path: size for path, size in self.files.items() if path not in self.cached}

    @property
    def missing_bytes(self) -> int:
        return sum(self.missing.values())


def plan_download(target: WeightsTarget, hub: Hub) -> DownloadPlan:
    """List the files ``target`` needs with their sizes. Reads the repository's listing and its
    small probe file (model_index.json or config.json), which a gated repository refuses."""
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

    repo = target.source
    with translated(repo, hub):
        info = HfApi(endpoint=hub.endpoint, token=hub.token).model_info(repo, files_metadata=True)
        if info.sha is None:
            raise HubUnreachableError(repo, "the hub did not say which commit to fetch")
        sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
        if target.probe_file not in sizes:
            kind = "diffusers pipeline" if target.kind == "pipeline" else "transformers model"
            raise WeightsError(f"{repo} has no {target.probe_file}, so it is not a {kind}; check its `source`")
        probe = hf_hub_download(repo, target.probe_file, revision=info.sha, cache_dir=hub.cache_dir,
                                endpoint=hub.endpoint, token=hub.token)
        index = json.loads(Path(probe).read_text(encoding="utf-8")) if target.kind == "pipeline" else None
    files = {path: sizes[path] for path in select_files(target.kind, sizes, index)}
    cached = frozenset(path for path in files
                       if isinstance(try_to_load_from_cache(repo, path, cache_dir=hub.cache_dir, revision=info.sha), str))
    return DownloadPlan(target, info.sha, files, cached)


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds ``folder`` (or would, once created)."""
    probe = folder.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk(plans: Sequence[DownloadPlan], hub: Hub) -> None:
    needed = sum(plan.missing_bytes for plan in plans)
    free = free_bytes(hub.cache_dir)
    if needed > free:
        raise NotEnoughDiskError(needed, free, str(hub.cache_dir))


def fetch(plan: DownloadPlan, hub: Hub, *, max_workers: int = 8) -> Path:
    """Download what ``plan`` lists (complete files are skipped); returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    repo = plan.target.source
    with translated(repo, hub):
        folder = Path(snapshot_download(repo, revision=plan.commit, allow_patterns=[_escaped(p) for p in plan.files],
                                        cache_dir=hub.cache_dir, endpoint=hub.endpoint, token=hub.token,
                                        max_workers=max_workers))
    absent = [path for path in plan.files if not (folder / path).is_file()]
    if absent:
        raise DownloadInterruptedError(repo, f"{len(absent)} file(s) missing afterwards, such as {absent[0]}")
    return folder


def _escaped(path: str) -> str:
    """A path as an fnmatch pattern that matches only itself ("[" and "?" are pattern syntax)."""
    return "".join(f"[{ch}]" if ch in "[]*?" else ch for ch in path)


@contextmanager
def translated(repo: str, hub: Hub) -> Iterator[None]:
    """huggingface_hub's and httpx's errors -> one ``WeightsError`` naming the repository."""
    import httpx2
    from huggingface_hub import errors as hf
    from huggingface_hub import get_token

    try:
        yield
    except WeightsError:
        raise
    except hf.GatedRepoError as exc:
        raise GatedModelError(repo, token_set=bool(hub.token or get_token())) from exc
    except hf.RepositoryNotFoundError as exc:
        raise HubUnreachableError(repo, f"no such model on {hub.endpoint}, or it is private (check its `source`; "
                                        "a private one needs HF_TOKEN)") from exc
    except hf.OfflineModeIsEnabled as exc:
        raise HubUnreachableError(repo, "HF_HUB_OFFLINE is set; unset it to download") from exc
    except hf.HfHubHTTPError as exc:
        raise HubUnreachableError(repo, f"the hub answered HTTP {_status(exc)}") from exc
    except (httpx2.ConnectError, httpx2.TimeoutException, hf.LocalEntryNotFoundError) as exc:
        raise HubUnreachableError(repo, f"cannot reach {hub.endpoint} (no network, or a wrong HF_ENDPOINT?)") from exc
    except (httpx2.TransportError, OSError) as exc:
        log.info("%s: download stopped", repo, exc_info=True)
        raise DownloadInterruptedError(repo, _first_line(exc)) from exc


def _status(exc: Any) -> str:
    response = getattr(exc, "response", None)
    return str(getattr(response, "status_code", "error"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
