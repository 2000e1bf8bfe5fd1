"""What is loaded where, used only from the GPU thread: budget, eviction, a RAM tier, OOM recovery.

Where a pipeline can be (the ``where`` of a status row):

    gpu        ready on the GPU                      counts its measured size against the GPU budget
    offloaded  ready, with CPU-offload hooks         counts its largest component (what sits on the
                                                     GPU while it runs); its weights live in RAM
    cpu        ready, and the device is the CPU      counts its size (the budget applies only if set)
    cpu-ram    parked: evicted from the GPU into RAM, so bringing it back is a copy, not a disk load

The rules, in the order ``acquire_blocking`` applies them:

1. Ready already: nothing to do (and the CUDA cache is left alone between runs of one model).
2. An exclusive model (HiDream) evicts every other model first; nothing is loaded beside one.
3. It must fit the GPU budget (free memory minus ``reserve_gb``, or ``gpu_budget_gb``): evict by
   the cost rule until it does - first models no queued job needs soon (least recently used
   first), then those needed latest. Pinned models are never evicted by this rule. Whether two
   or three pipelines stay resident together is the budget's answer, not a special case.
4. Bring it in: from RAM if parked, else from disk. Out of memory: evict every other model and
   try once more. A move that fails never leaves half a model on the GPU.
5. The measured size may exceed the estimate: evict again until the budget holds.

Evicting parks a pipeline in RAM while the RAM tier has room (``cpu_ram_gb``; parked pipelines
are released by the same cost rule when it is full), else releases it. On a CPU device the tier
is moot - the device already is RAM - so eviction releases.

Out of memory while running (``run_with_recovery_blocking``), by phase: in the VAE decode, the
same job again with tiled decoding; while denoising, free every other model and try once more,
then move the model to CPU offload and try again; then the error stands.
"""

from engine.residency.device import TorchOps, weights_nbytes
from engine.residency.manager import ResidencyManager
from engine.residency.model import (
    DECODE_PHASE,
    LOAD_PHASE,
    OFFLOADED,
    DeviceOps,
    GiB,
    ResidencyStatus,
    ResidentModel,
)

__all__ = [
    "DECODE_PHASE", "LOAD_PHASE", "OFFLOADED", "DeviceOps", "GiB", "ResidencyManager",
    "ResidencyStatus", "ResidentModel", "TorchOps", "weights_nbytes",
]
