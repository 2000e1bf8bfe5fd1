"""Which queued job runs next, and the queue's plan. Pure: no torch, asyncio or clock.

    policies.py   QueuedJob and Pick, the FIFO and affinity policies, round-robin tags, the per-user cap
    replay.py     TimingBook and plan(): the order a policy would run the queue in, with start times
    multi.py      WorkerView, pick_for_worker and plan_workers: one queue drained by many GPU workers
"""

from engine.scheduler.policies import (
    AffinityScheduler,
    FifoScheduler,
    Pick,
    QueuedJob,
    RoundRobin,
    Scheduler,
    UserQueueFullError,
    apply_pick,
    check_user_cap,
    fair_order,
    make_scheduler,
)
from engine.scheduler.multi import WorkerView, pick_for_worker, plan_workers
from engine.scheduler.replay import Planned, TimingBook, needed_soon, plan

__all__ = [
    "AffinityScheduler", "FifoScheduler", "Pick", "Planned", "QueuedJob", "RoundRobin", "Scheduler",
    "TimingBook", "UserQueueFullError", "apply_pick", "check_user_cap", "fair_order", "make_scheduler", "needed_soon",
    "plan", "WorkerView", "pick_for_worker", "plan_workers",
]
