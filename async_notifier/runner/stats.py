"""What a run did, counted."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunnerStats:
    """Counters for the whole run, logged at the end and returned to callers."""

    batches: int = 0
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    deleted: int = 0
    delete_failed: int = 0
    released: int = 0
    extended: int = 0  # visibility extensions SQS confirmed (one per message per beat)
    extend_failed: int = 0
    overran: int = 0  # batches cancelled for running past their deadline
    paused: int = 0  # waits without receiving while a provider-wide condition held
    paused_seconds: float = 0.0  # how long those waits were to last
    drained: bool = False
