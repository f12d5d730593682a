"""`SendLimits`: how long a provider-wide condition holds, and what the quota does to the pace.

Pure logic on a fake clock (the pool and the relay are in test_provider_conditions.py and
test_provider_hold.py); the quota read that fails goes to a port where nothing listens.
"""

from __future__ import annotations

import pytest
from pool_emails import settings
from servers import free_port

from async_notifier.account.limits import QUOTA_RECHECK, SANDBOX_RATE, SendLimits
from async_notifier.account.quota import SendQuota
from async_notifier.aws.clients import aws_client
from async_notifier.aws.ses_quota import SesQuotaReader
from async_notifier.errors import DailyQuotaExceeded, LoginRefused, SenderRejected


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(clock: Clock, **env: str) -> SendLimits:
    base = {"SMTP_BREAKER_COOLDOWN_SECONDS": "30", "RETRY_BACKOFF_CAP_SECONDS": "300", **env}
    return SendLimits(settings("relay.test", 25, **base), clock=clock)


def test_a_condition_holds_for_the_cooldown_doubling_while_it_recurs_up_to_the_cap() -> None:
    clock = Clock()
    held = limits(clock)
    assert held.held() is None
    holds = []
    for _ in range(6):
        error = held.trip(LoginRefused("535 5.7.8 authentication failed"))
        holds.append(error.retry_after)
        assert isinstance(held.held(), LoginRefused)
        clock.now += error.retry_after  # the hold ends: the next send is the probe
        assert held.held() is None
    assert holds == [30, 60, 120, 240, 300, 300]
    assert held.trips["login_failed"] == 6


def test_a_delivered_message_clears_the_condition_and_its_doubling() -> None:
    clock = Clock()
    held = limits(clock)
    held.trip(SenderRejected("553"))
    clock.now += 30
    held.trip(SenderRejected("553"))
    held.accepted()
    assert held.held() is None
    assert held.trip(SenderRejected("553")).retry_after == 30


def test_another_condition_starts_its_own_doubling() -> None:
    clock = Clock()
    held = limits(clock)
    held.trip(SenderRejected("553"))
    clock.now += 30
    assert held.trip(DailyQuotaExceeded("454")).retry_after == 30


def test_the_pace_is_the_fleets_share_and_follows_the_quota() -> None:
    clock = Clock()
    fixed = limits(clock, SMTP_RATE_LIMIT="40", FLEET_SIZE="4")
    assert fixed.send_rate == 10
    unpaced = limits(clock)
    assert unpaced.send_rate is None
    auto = limits(clock, SMTP_RATE_LIMIT="auto", FLEET_SIZE="2")
    assert auto.send_rate == SANDBOX_RATE / 2  # until the quota is read
    auto.apply(SendQuota(max_send_rate=14, max_24_hour_send=50_000, sent_last_24_hours=10))
    assert auto.send_rate == 7
    assert auto.held() is None


def test_a_spent_quota_holds_until_a_read_shows_room() -> None:
    clock = Clock()
    auto = limits(clock, SMTP_RATE_LIMIT="auto")
    auto.apply(SendQuota(max_send_rate=14, max_24_hour_send=200, sent_last_24_hours=200))
    held = auto.held()
    assert isinstance(held, DailyQuotaExceeded)
    assert held.retry_after == QUOTA_RECHECK
    auto.apply(SendQuota(max_send_rate=14, max_24_hour_send=200, sent_last_24_hours=150))
    assert auto.held() is None
    unlimited = SendQuota(max_send_rate=14, max_24_hour_send=-1, sent_last_24_hours=10**9)
    auto.apply(unlimited)
    assert auto.held() is None


async def test_a_quota_that_cannot_be_read_keeps_the_last_pace() -> None:
    clock = Clock()
    s = settings("relay.test", 25, SMTP_RATE_LIMIT="auto")
    nowhere = settings(
        "relay.test", 25, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", S3_TIMEOUT="1"
    )
    auto = SendLimits(s, clock=clock)
    auto.apply(SendQuota(max_send_rate=14, max_24_hour_send=-1, sent_last_24_hours=0))
    async with aws_client("ses", nowhere) as ses:
        auto.use_quota(SesQuotaReader(ses, timeout=2))
        await auto.refresh()  # logged, never raised
    assert auto.send_rate == 14
    assert auto.held() is None


@pytest.mark.parametrize("rate", ["0", "-1", "fast"])
def test_a_bad_rate_is_refused_at_start(rate: str) -> None:
    from async_notifier.config import ConfigError

    with pytest.raises(ConfigError, match="SMTP_RATE_LIMIT"):
        settings("relay.test", 25, SMTP_RATE_LIMIT=rate)
