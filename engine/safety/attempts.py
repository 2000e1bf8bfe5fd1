"""One generation attempt of the safety loop, as the loop, its errors and the history see it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.safety.detectors import Verdict


@dataclass(frozen=True, slots=True)
class Attempt:
    """One generation. ``outcome`` is None while it runs, then one of history's ATTEMPT_OUTCOMES."""

    n: int  # 1-based within this run
    model_id: str
    prompt_used: str
    seed: int
    started_at: float
    finished_at: float | None = None
    outcome: str | None = None  # "succeeded", "retried" or "failed"
    verdicts: Mapping[str, Verdict] = field(default_factory=dict)  # detector name -> verdict
    problem: str | None = None  # "black" or "nsfw" when the image was not used
    action: str = ""  # "posted", "rewrote the prompt (llm)", "fell back to flux_dev", "refused", ...
    note: str = ""  # e.g. "prompt flagged (matched: coke); rewritten by llm" on the first attempt

    @property
    def retry_reason(self) -> str | None:
        """For ``HistoryStore.record_attempt_end``: set exactly when another attempt followed."""
        return f"{self.problem}: {self.action}" if self.outcome == "retried" else None
