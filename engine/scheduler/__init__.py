"""Which queued job runs next, and the queue's plan. Pure: no torch, asyncio or clock.

    policies.py   QueuedJob and Pick, the FIFO and affinity policies, round-robin tags, the per-user cap
    replay.py     TimingBook and plan(): the order a policy would run the queue in, with start times
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
from engine.scheduler.replay import Planned, TimingBook, needed_soon, plan

__all__ = [
    "AffinityScheduler", "FifoScheduler", "Pick", "Planned", "QueuedJob", "RoundRobin", "Scheduler",
    "TimingBook", "UserQueueFullError", "apply_pick", "check_user_cap", "fair_order", "make_scheduler", "needed_soon",
    "plan",
]
