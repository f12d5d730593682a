"""Pace sends to the provider's rate by AIMD, so a fleet settles just under it.

A token bucket that pauses on throttling refills while paused and bursts again, so a fleet
oscillates. Here sends are spaced evenly at the current rate (a next-slot time, never a
bucket: idle time earns no burst), the rate halves on a throttling reply and grows back
additively while sends succeed, as TCP's congestion window does: every worker converges
to a fair share of the account's rate without knowing how many others there are.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

#: The default lowest rate (sends/s): one send every 10 s still probes whether the throttling
#: has stopped, and lets dozens of workers share an account of a few sends per second.
DEFAULT_FLOOR = 0.1
#: The default additive increase, as a share of the ceiling per second of sending: from half
#: the ceiling back to all of it in about 10 s, so a throttled fleet recovers in seconds
#: while the provider's next throttling reply comes well before a burst could build.
DEFAULT_INCREASE_SHARE = 1 / 20
#: A throttling reply within this long (or one interval, if longer) of a decrease belongs to
#: the same overload: the sends in flight when it started.
MIN_ROUND = 1.0


class AdaptiveRate:
    """Paces sends to at most `ceiling` per second, halving on a throttling reply and growing
    back additively (AIMD), so a fleet settles just under the provider's rate.

    `floor` defaults to min(ceiling, DEFAULT_FLOOR) and `increase` (sends/s gained per second
    of sending) to ceiling / 20; see those constants for why. `clock` and `sleep` are for tests.
    """

    def __init__(
        self,
        ceiling: float,
        *,
        floor: float | None = None,
        increase: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        _check_positive("ceiling", ceiling)
        if floor is not None:
            _check_positive("floor", floor)
            if floor > ceiling:
                raise ValueError(f"floor ({floor}) must not exceed the ceiling ({ceiling})")
        if increase is not None:
            _check_positive("increase", increase)
        self._ceiling = float(ceiling)
        self._floor = float(floor) if floor is not None else min(self._ceiling, DEFAULT_FLOOR)
        self._increase = float(increase) if increase is not None else None
        self._rate = self._ceiling
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._last = -math.inf  # when the last slot was given
        self._hold_until = -math.inf  # no slot before this (set by a decrease)
        self._round_end = -math.inf  # throttling replies before this are the same overload
        self.decreases = 0  # how many times throttled() lowered the rate

    @property
    def rate(self) -> float:
        """The current rate (sends/s), between the floor and the ceiling."""
        return self._rate

    @property
    def ceiling(self) -> float:
        return self._ceiling

    @property
    def floor(self) -> float:
        """The configured floor, or the ceiling when that is lower (the rate never exceeds it)."""
        return min(self._floor, self._ceiling)

    @property
    def increase(self) -> float:
        """Sends/s gained per second of successful sending."""
        if self._increase is not None:
            return self._increase
        return self._ceiling * DEFAULT_INCREASE_SHARE

    def set_ceiling(self, ceiling: float) -> None:
        """Adopt a new share of the quota: the rate never exceeds it, and a rate that was at
        the old ceiling (nothing throttled it) follows the new one up."""
        _check_positive("ceiling", ceiling)
        at_ceiling = self._rate >= self._ceiling
        self._ceiling = float(ceiling)
        self._rate = self._ceiling if at_ceiling else min(self._rate, self._ceiling)

    async def acquire(self) -> None:
        """Wait for this send's slot: 1/rate after the previous one, at once after idling.

        Waiters are served in order. A waiter cancelled while waiting takes no slot.
        """
        async with self._lock:
            while True:
                now = self._clock()
                due = max(self._last + 1 / self._rate, self._hold_until)
                if due <= now:
                    break
                # Re-checked after the sleep: a decrease meanwhile moves the slot later.
                await self._sleep(due - now)
            self._last = now

    def throttled(self) -> bool:
        """Halve the rate for a throttling reply, once per round; True when it was lowered.

        The next slot moves to 1/rate from now in any case (but once per round): the sends
        in flight already overshoot.
        """
        now = self._clock()
        if now < self._round_end:
            return False
        previous = self._rate
        self._rate = max(self.floor, previous / 2)
        self._hold_until = now + 1 / self._rate
        self._round_end = now + max(MIN_ROUND, 1 / self._rate)
        if self._rate < previous:
            self.decreases += 1
            return True
        return False

    def succeeded(self) -> None:
        """Additive increase: `increase` sends/s per second of sending, at most the ceiling."""
        self._rate = min(self._ceiling, self._rate + self.increase / self._rate)


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, not {value!r}")
