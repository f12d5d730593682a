"""When to stop: Lambda kills a function at its timeout and fails the whole batch.

Being killed means every record already emailed is emailed again on the retry, so the
worker works to two points on the monotonic clock (the event loop's clock). At `cutoff`,
a safety margin before the end, it stops starting records and cancels what still runs.
The work that has to follow the records (dead letters, retry back-off, releasing
idempotency claims) must be over by `end`, a small reserve before the real end that is
left for returning the response; whatever does not fit by then is skipped, never allowed
to overrun.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

MIN_MARGIN = 3.0
MARGIN_FRACTION = 0.10
# Kept after `end` for returning the response: at most this, and at most half the margin.
RETURN_RESERVE = 0.5


@dataclass(frozen=True)
class Deadline:
    """`cutoff`: records stop. `end`: the work after the records stops too."""

    cutoff: float
    end: float

    def __post_init__(self) -> None:
        if self.end < self.cutoff:
            raise ValueError("a deadline's end cannot come before its cutoff")

    @classmethod
    def within(cls, seconds: float, margin: float | None = None) -> Deadline:
        """For work that must be over `seconds` from now; the records stop `margin` earlier
        (by default 10% of the time, at least 3 s)."""
        seconds = max(0.0, seconds)
        if margin is None:
            margin = max(MIN_MARGIN, seconds * MARGIN_FRACTION)
        now = time.monotonic()
        reserve = min(RETURN_RESERVE, margin / 2)
        end = now + seconds - reserve
        return cls(cutoff=min(end, now + seconds - margin), end=end)

    @classmethod
    def after(cls, seconds: float, *, grace: float = 0.0) -> Deadline:
        """Records stop `seconds` from now; the work after them has `grace` seconds more."""
        cutoff = time.monotonic() + seconds
        return cls(cutoff=cutoff, end=cutoff + max(0.0, grace))

    @classmethod
    def from_context(cls, context: Any, margin: float | None = None) -> Deadline | None:
        """From `context.get_remaining_time_in_millis()`; None outside Lambda."""
        remaining_ms = getattr(context, "get_remaining_time_in_millis", None)
        if remaining_ms is None:
            return None
        return cls.within(float(remaining_ms()) / 1000.0, margin)

    def remaining(self) -> float:
        """Seconds until the cutoff (negative once past it)."""
        return self.cutoff - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def remaining_to_end(self) -> float:
        """Seconds left for the work after the records (negative once past the end)."""
        return self.end - time.monotonic()
