"""``[cluster]``: where the GPU workers are (docs/CLUSTER.md). The default, ``embedded``, is one
GPU thread in this process: nothing about Ray is imported or started."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictFloat, StrictInt, StrictStr, model_validator

from engine.config.base import SettingsModel, broken

CLUSTER_MODES = ("embedded", "local", "cluster")


class ClusterSettings(SettingsModel):
    # embedded: the GPU thread in this process (default); local: the bot starts Ray itself, one worker
    # per visible GPU (or ``workers``); cluster: join the Ray cluster at ``address`` (named detached
    # workers: a bot restart re-attaches to them and keeps their loaded models)
    mode: Literal["embedded", "local", "cluster"] = "embedded"
    address: StrictStr = ""  # cluster mode: "ray://head:10001" or "head:6379"; "auto" on a node of the cluster
    workers: StrictInt = Field(0, ge=0)  # how many workers; 0: one per GPU Ray sees (local) / every worker found
    num_gpus: StrictFloat = Field(1.0, ge=0.0)  # GPUs per worker; 0.5 lets two workers share one card
    resource: StrictStr = ""  # a custom Ray resource per worker instead of GPUs (CPU tests: "promptpics_worker")
    namespace: StrictStr = "promptpics"  # the Ray namespace the named workers live in
    watchdog_s: StrictFloat = Field(900.0, gt=0.0)  # a job with no event for this long: its worker is hung

    @model_validator(mode="after")
    def _address_for_cluster(self) -> ClusterSettings:
        if self.mode == "cluster" and not self.address:
            raise broken("mode = \"cluster\" needs the Ray address to join, e.g. address = \"ray://gpu-host:10001\"",
                         self.address, at=".address")
        return self

    @property
    def embedded(self) -> bool:
        return self.mode == "embedded"
