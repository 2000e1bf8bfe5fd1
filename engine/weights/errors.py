"""What can stop a download, each with the one line a user needs (all ``EngineError``):

    WeightsError              base
    ├── GatedModelError       the repository needs an accepted licence and HF_TOKEN
    ├── HubUnreachableError   no network, HF_HUB_OFFLINE, or the hub answered an error
    ├── NotEnoughDiskError    the cache's disk cannot hold what is missing (checked first)
    └── DownloadInterruptedError  the transfer stopped part-way; a re-run resumes
"""

from __future__ import annotations

from engine.errors import EngineError

HUB_PAGE = "https://huggingface.co"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover - the loop always returns


class WeightsError(EngineError):
    """A download (or its plan) could not go on."""


class GatedModelError(WeightsError):
    def __init__(self, repo: str, token_set: bool) -> None:
        self.repo, self.token_set = repo, token_set
        why = ("HF_TOKEN is set, but its account has no access yet" if token_set
               else "set HF_TOKEN to a read token of that account (https://huggingface.co/settings/tokens)")
        super().__init__(f"{repo} is gated: accept its licence at {HUB_PAGE}/{repo} while logged in, then run this "
                         f"again; {why}")


class HubUnreachableError(WeightsError):
    def __init__(self, repo: str, reason: str) -> None:
        self.repo, self.reason = repo, reason
        super().__init__(f"{repo}: {reason}")


class NotEnoughDiskError(WeightsError):
    def __init__(self, needed: int, free: int, folder: str) -> None:
        self.needed, self.free, self.folder = needed, free, folder
        super().__init__(f"not enough disk space: the download needs {human_bytes(needed)} but {folder} has "
                         f"{human_bytes(free)} free; free some space or set HF_HOME to a larger disk")


class DownloadInterruptedError(WeightsError):
    def __init__(self, repo: str, reason: str) -> None:
        self.repo, self.reason = repo, reason
        super().__init__(f"the download of {repo} stopped part-way ({reason}); run the same command again: "
                         "complete files are kept and the rest is fetched")
