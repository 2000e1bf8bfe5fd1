"""The engine proper: the ``Engine`` a front end drives, and how one job goes from submit to image.

    engine.py      Engine: lifetime, submit, cancel, status, subscribe
    admin.py       preload, pin, unload, residency, /workers: over one worker or several
    admission.py   seats in the queue, decided and reserved in one synchronous step
    normalise.py   a raw JobRequest checked against the limits -> exact GenerationParams
    dispatch.py    the dispatcher: free workers take the scheduler's picks; one job's run as numbered steps
                   (JobRunner, the GPU thread's side, lives in engine/cluster/runner.py with the workers)
    plan.py        one cached queue plan -> positions, ETAs, QueueMoved; CostBook (job costs)
    job.py         LiveJob (the engine's record of a job) and JobHandle (the caller's)
    models.py      describe_models: every configured model and where its weights are
"""

from engine.core.admin import WorkerState
from engine.core.admission import Admission
from engine.core.engine import Engine
from engine.core.job import JobHandle
from engine.core.models import describe_models, missing_weights, source_state
from engine.core.normalise import MAX_SEED, check_request, clean_prompt, normalise, requested_model
from engine.core.plan import CostBook, QueueEntry, QueuePlan, build_plan
from engine.cluster.runner import JobRunner, RunOutput, default_runner_blocking

__all__ = [
    "MAX_SEED", "Admission", "CostBook", "Engine", "JobHandle", "JobRunner", "QueueEntry", "QueuePlan", "RunOutput",
    "build_plan", "check_request", "clean_prompt", "missing_weights", "default_runner_blocking", "describe_models", "normalise", "requested_model",
    "source_state", "WorkerState",
]
