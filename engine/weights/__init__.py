"""Model weights on disk: which files each model needs, their state here, and the download.

    files.py    WeightsTarget, weight_targets (models, HiDream's text encoder, the LLMs), select_files
    state.py    weights_state: complete / partial / missing, without the network
    hub.py      Hub (endpoint, cache, token), plan_download, check_disk, fetch
    errors.py   WeightsError and its one-line subclasses (gated, unreachable, disk, interrupted)
"""

from engine.weights.errors import (
    DownloadInterruptedError,
    GatedModelError,
    HubUnreachableError,
    NotEnoughDiskError,
    WeightsError,
    human_bytes,
)
from engine.weights.files import WeightsTarget, llm_targets, select_files, weight_targets
from engine.weights.hub import DownloadPlan, Hub, check_disk, fetch, free_bytes, plan_download
from engine.weights.state import WeightsState, weights_state

__all__ = [
    "DownloadInterruptedError", "DownloadPlan", "GatedModelError", "Hub", "HubUnreachableError", "NotEnoughDiskError",
    "WeightsError", "WeightsState", "WeightsTarget", "check_disk", "fetch", "free_bytes", "human_bytes", "llm_targets",
    "plan_download", "select_files", "weight_targets", "weights_state",
]
