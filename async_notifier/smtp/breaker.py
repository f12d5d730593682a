"""A circuit breaker for the SMTP server: an outage fails fast instead of being hammered.

When the server is down, every record of a batch would try a connection of its own and
wait up to the connect timeout. After `threshold` connection attempts in a row have
failed, the breaker opens: sends fail at once (transient, `smtp_unavailable`) and no
connection is tried. After `cooldown` seconds one probe connection may be tried (half
open); its success closes the breaker, its failure opens it for another cool-down. The
breaker belongs to the pool, so it lives as long as the warm process: a later invocation
probes first instead of starting with a storm of connects.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        threshold: int,
        cooldown: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 0 or cooldown < 0:
            raise ValueError("threshold and cooldown must not be negative")
        self.threshold = threshold  # 0: never opens
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0  # connection attempts failed in a row
        self._opened_at: float | None = None
        self._probing = False
        self.openings = 0  # times it opened, over its life

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probing or self._clock() - self._opened_at >= self.cooldown:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    @property
    def healthy(self) -> bool:
        """No connection attempt has failed since the last success."""
        return self._failures == 0 and self._opened_at is None

    def retry_in(self) -> float:
        """Seconds until a probe may be tried (0 when closed or half open)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - self._clock())

    def may_connect(self, connecting: int) -> bool:
        """Whether a new connection attempt may start now, `connecting` being under way:
        any number while connections succeed; after a failure one at a time (the attempts
        in flight will tell), one probe when half open, none when open."""
        state = self.state
        if state is BreakerState.CLOSED:
            return self._failures == 0 or connecting == 0
        return state is BreakerState.HALF_OPEN and connecting == 0

    def attempt_started(self) -> None:
        if self._opened_at is not None:
            self._probing = True

    def succeeded(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failed(self) -> bool:
        """Count a failed attempt; True when this opened the breaker."""
        self._failures += 1
        was_open = self._opened_at is not None
        if was_open or (self.threshold and self._failures >= self.threshold):
            self._opened_at = self._clock()  # a failed probe starts another cool-down
            self._probing = False
            if not was_open:
                self.openings += 1
                return True
        return False
