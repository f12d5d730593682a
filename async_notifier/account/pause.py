"""The pause of a pool with no rate, when the provider says "slow down".

A 454 or a 421 "rate exceeded" is about the account, not the connection that got it
(`smtp.replies.is_throttling`). With a rate (`SMTP_RATE_LIMIT`) the pace halves
(`pacing.AdaptiveRate`); without one, every connection pauses together, or the others keep
tripping the limit.
"""

from __future__ import annotations

import asyncio
import time


class PoolBackoff:
    """A pause shared by all connections, doubling while throttling goes on."""

    def __init__(self, initial: float = 1.0, cap: float = 30.0) -> None:
        self.initial = initial
        self.cap = cap
        self._current = 0.0
        self._until = 0.0
        self.events = 0

    def throttled(self) -> float:
        """Record a throttling reply; return how long everyone now waits."""
        self.events += 1
        self._current = min(self.cap, self._current * 2 if self._current else self.initial)
        self._until = max(self._until, time.monotonic() + self._current)
        return self._current

    def succeeded(self) -> None:
        self._current = 0.0

    async def wait(self) -> None:
        delay = self._until - time.monotonic()
        while delay > 0:
            await asyncio.sleep(delay)
            delay = self._until - time.monotonic()
