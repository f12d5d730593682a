"""The provider account's limits, as the pool meets them: its rate, and what holds for all.

A provider limits the account, not a connection or an instance: a send rate (SES
`MaxSendRate`), a daily quota, and conditions that refuse every message (a refused login, a
refused sender, a spent quota). `SendLimits` is what one pool knows of them:

- **Pacing.** With `SMTP_RATE_LIMIT` (a number, or `auto`: SES's MaxSendRate, re-read every
  few minutes) each instance paces at its share, the rate divided by `FLEET_SIZE`, smoothly
  (`AdaptiveRate`: no bursts after a pause). A "slow down" reply halves the pace and success
  grows it back slowly (AIMD), so a fleet whose share is misjudged settles just under the
  account's rate instead of oscillating on 454s. Without a rate, a "slow down" reply pauses
  every connection for a moment (`PoolBackoff`).
- **Provider-wide conditions** (`errors.ProviderCondition`). Once met, they hold for a
  while (the breaker's cool-down, doubling while they recur, up to RETRY_BACKOFF_CAP_SECONDS);
  meanwhile no send is tried and records go back to the queue at once. The first send after
  the hold is the probe; a delivered message clears every condition. With `auto`, a quota
  that reads as spent holds `daily_quota` until a later read shows room again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

from ..config import Settings
from ..errors import DailyQuotaExceeded, ProviderCondition, TransportThrottled
from ..logs import get_logger
from .pacing import AdaptiveRate
from .pause import PoolBackoff
from .quota import QuotaSource, SendQuota

log = get_logger()

#: `auto` re-reads the quota this often, and this often while the daily quota is spent.
QUOTA_REFRESH = 300.0
QUOTA_RECHECK = 60.0
QUOTA_TIMEOUT = 5.0
#: The rate `auto` paces the whole fleet at until the quota is first read: SES's sandbox rate.
SANDBOX_RATE = 1.0


class SendLimits:
    """One pool's view of the account's limits (see the module's docstring)."""

    def __init__(
        self,
        settings: Settings,
        quota: QuotaSource | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._fleet = settings.fleet_size
        self._auto = settings.smtp_rate_limit == "auto"
        self._quota = quota if self._auto else None
        self._quota_read_at: float | None = None
        limit = settings.smtp_rate_limit
        account_rate = SANDBOX_RATE if limit == "auto" else limit
        self.rate: AdaptiveRate | None = (
            AdaptiveRate(account_rate / self._fleet, clock=clock) if account_rate else None
        )
        self.pause = PoolBackoff()  # only without a rate: there is no pace to halve
        self._hold_base = max(1.0, settings.smtp_breaker_cooldown)
        self._hold_cap = max(self._hold_base, float(settings.retry_backoff_cap))
        self._held: ProviderCondition | None = None
        self._held_until = 0.0
        self._hold_step = 0.0
        self.trips: Counter[str] = Counter()  # conditions met, by name, over the pool's life
        self.throttled_replies = 0  # over the pool's life

    # ------------------------------------------------------------------ conditions

    def held(self) -> ProviderCondition | None:
        """The condition that holds now, with the seconds until the next try."""
        if self._held is None:
            return None
        left = self._held_until - self._clock()
        if left <= 0:
            return None  # the next send is the probe
        return type(self._held)(self._held.reason, retry_after=left)

    def trip(self, error: ProviderCondition, hold: float | None = None) -> ProviderCondition:
        """Hold `error` for `hold` seconds, or the cool-down doubled since the last success."""
        if hold is None:
            recurring = self._held is not None and type(self._held) is type(error)
            step = min(self._hold_cap, self._hold_step * 2) if recurring else self._hold_base
            self._hold_step = hold = step
        self._held = error
        self._held_until = max(self._held_until, self._clock() + hold)
        self.trips[error.condition] += 1
        log.warning(
            "provider condition: sends held",
            extra={"condition": error.condition, "reason": error.reason, "hold_s": round(hold, 1)},
        )
        held = self.held()
        assert held is not None
        return held

    def accepted(self) -> None:
        """A message was accepted: whatever held is over, and the pace may grow."""
        if self._held is not None:
            log.info("provider condition cleared", extra={"condition": self._held.condition})
        self._held = None
        self._held_until = 0.0
        self._hold_step = 0.0
        if self.rate is not None:
            self.rate.succeeded()
        else:
            self.pause.succeeded()

    # ------------------------------------------------------------------ pacing

    async def wait_turn(self) -> None:
        """Wait until this send may go: after any pause, at the paced rate."""
        if self.rate is not None:
            await self.rate.acquire()
        else:
            await self.pause.wait()

    def throttled(self, error: TransportThrottled) -> None:
        """The provider said "slow down": halve the pace (or pause, without one)."""
        self.throttled_replies += 1
        if self.rate is not None:
            if self.rate.throttled():
                log.info("pace lowered", extra={"rate": round(self.rate.rate, 3)})
        else:
            self.pause.throttled()

    @property
    def send_rate(self) -> float | None:
        return None if self.rate is None else self.rate.rate

    # ------------------------------------------------------------------ the account's quota

    def use_quota(self, quota: QuotaSource) -> None:
        """Read the account's rate from `quota` (with `auto`; ignored for a fixed rate)."""
        if self._auto:
            self._quota = quota

    async def refresh(self) -> None:
        """With `auto`, re-read the quota when due: every QUOTA_REFRESH seconds, and every
        QUOTA_RECHECK while the daily quota is spent. Never raises; bounded in time."""
        if self._quota is None:
            return
        now = self._clock()
        due = QUOTA_RECHECK if isinstance(self._held, DailyQuotaExceeded) else QUOTA_REFRESH
        if self._quota_read_at is not None and now - self._quota_read_at < due:
            return
        try:
            async with asyncio.timeout(QUOTA_TIMEOUT):
                quota = await self._quota.read()
        except Exception as exc:  # the last known pace stays; the next batch tries again
            self._quota_read_at = now - QUOTA_REFRESH + QUOTA_RECHECK
            log.warning("cannot read the sending quota", extra={"error": str(exc)[:300]})
            return
        self._quota_read_at = now
        self.apply(quota)

    def apply(self, quota: SendQuota) -> None:
        """Pace at this instance's share of the account's rate; hold while the quota is spent."""
        if self.rate is not None and quota.max_send_rate > 0:
            self.rate.set_ceiling(quota.max_send_rate / self._fleet)
        if quota.exhausted:
            self.trip(
                DailyQuotaExceeded(
                    f"the daily sending quota is spent ({quota.sent_last_24_hours:.0f} of "
                    f"{quota.max_24_hour_send:.0f} in the last 24 hours)"
                ),
                hold=QUOTA_RECHECK,
            )
        elif isinstance(self._held, DailyQuotaExceeded):
            self._held, self._held_until = None, 0.0  # room again: the next send goes
