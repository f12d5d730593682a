"""When to stop: Lambda kills a function at its timeout and fails the whole batch.

Being killed means every record already emailed is emailed again on the retry,
so the worker stops starting records a safety margin before the end, cancels
what is still running, and returns in time with those records reported failed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

MIN_MARGIN = 3.0
MARGIN_FRACTION = 0.10


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock (the event loop's clock) where work must stop."""

    cutoff: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @classmethod
    def from_context(cls, context: Any, margin: float | None = None) -> Deadline | None:
        """From `context.get_remaining_time_in_millis()`; None outside Lambda."""
        remaining_ms = getattr(context, "get_remaining_time_in_millis", None)
        if remaining_ms is None:
            return None
        remaining = max(0.0, float(remaining_ms()) / 1000.0)
        if margin is None:
            margin = max(MIN_MARGIN, remaining * MARGIN_FRACTION)
        return cls.after(remaining - margin)

    def remaining(self) -> float:
        return self.cutoff - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0
