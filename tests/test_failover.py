"""FALLBACK_TRANSPORT: the primary transport down, the fallback carries every email once,
then the primary takes over again after its probe.

Both transports here are SMTP pools on real aiosmtpd servers (the failover only knows the
port, so any two transports behave alike; the SES API one has its own tests). The primary's
server is stopped (its port refuses connections) and started again on the same port.
"""

from __future__ import annotations

import asyncio

import pytest
from conditions import until
from faults import FaultySmtp, SmtpFaults
from pool_emails import outgoing, settings
from servers import SmtpSink

from async_notifier.errors import (
    DailyQuotaExceeded,
    DeliveryUnknown,
    RecipientRejected,
    SmtpUnavailable,
)
from async_notifier.failover import FailoverTransport
from async_notifier.smtp.breaker import BreakerState
from async_notifier.smtp.pool import SmtpPool


def pool(server: SmtpSink, **extra: str) -> SmtpPool:
    env = {
        "SMTP_POOL_SIZE": "2",
        "SMTP_BREAKER_THRESHOLD": "1",
        "SMTP_BREAKER_COOLDOWN_SECONDS": "1",
        **extra,
    }
    return SmtpPool(settings(server.host, server.port, **env))


def message_ids(server: SmtpSink) -> list[str]:
    return sorted(str(m["Message-ID"]) for m in server.parsed())


async def test_the_fallback_carries_the_mail_while_the_primary_is_down_then_hands_it_back(
    smtp_sink: SmtpSink,
) -> None:
    primary_server = SmtpSink()
    primary_server.start()
    try:
        primary_server.stop()  # its port now refuses connections
        primary = pool(primary_server)
        transport = FailoverTransport(primary, pool(smtp_sink))
        async with contextlib_closing(transport):
            transport.start_batch(2)
            results = await asyncio.gather(
                *(transport.deliver(outgoing(i)) for i in range(6)), return_exceptions=True
            )
            # The connection attempts under way when the circuit opened (at most the pool's
            # 2) fail their own emails, which the records' retries take; every email after
            # them goes to the fallback.
            failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
            assert 1 <= len(failed) <= 2
            assert all(isinstance(results[i], SmtpUnavailable) for i in failed)
            for i in failed:  # the retries: the circuit is open now
                await transport.deliver(outgoing(i))
            stats = await transport.finish_batch()
            assert stats.fallback_messages == 6
            assert stats.circuit_opened == 1
            assert transport.held() is None  # the fallback can still send
            # Every email once, all by the fallback.
            assert message_ids(smtp_sink) == sorted(f"<m{i}@example.com>" for i in range(6))

            primary_server.start()  # same port
            # The cool-down ends: the next email is the primary's probe.
            await until(lambda: primary.breaker.state is BreakerState.HALF_OPEN)
            transport.start_batch(0)
            await transport.deliver(outgoing(6))
            stats = await transport.finish_batch()
            assert stats.fallback_messages == 0
            assert message_ids(primary_server) == ["<m6@example.com>"]
            assert len(smtp_sink.parsed()) == 6
    finally:
        primary_server.stop()


async def test_a_provider_wide_refusal_goes_to_the_fallback_at_once(
    faulty_smtp: FaultySmtp, smtp_sink: SmtpSink
) -> None:
    """The primary's daily quota is spent: that email, and those after it, go through the
    fallback; the primary's relay saw one MAIL."""
    faulty_smtp.faults = SmtpFaults(
        mail_reply="454 4.7.0 Throttling failure: Daily message quota exceeded."
    )
    transport = FailoverTransport(pool(faulty_smtp), pool(smtp_sink))
    async with contextlib_closing(transport):
        for i in range(4):
            await transport.deliver(outgoing(i))
        assert isinstance(transport.primary.held(), DailyQuotaExceeded)
    assert faulty_smtp.mail_commands == 1
    assert message_ids(smtp_sink) == sorted(f"<m{i}@example.com>" for i in range(4))
    assert faulty_smtp.messages == []


async def test_what_is_the_messages_own_outcome_never_goes_to_the_fallback(
    faulty_smtp: FaultySmtp, smtp_sink: SmtpSink
) -> None:
    """A refused recipient, or a verdict that never came (it may have been delivered), is
    that email's outcome: handing it to the fallback could send it twice."""
    faulty_smtp.faults = SmtpFaults(reject=frozenset({"user0@example.com"}))
    transport = FailoverTransport(pool(faulty_smtp), pool(smtp_sink))
    async with contextlib_closing(transport):
        with pytest.raises(RecipientRejected):
            await transport.deliver(outgoing(0))
    faulty_smtp.faults = SmtpFaults(drop_after_data_every=1)
    transport = FailoverTransport(pool(faulty_smtp), pool(smtp_sink))
    async with contextlib_closing(transport):
        with pytest.raises(DeliveryUnknown):
            await transport.deliver(outgoing(1))
    assert smtp_sink.parsed() == []


class contextlib_closing:
    """`async with` for a transport: closed (both pools) whatever the test did."""

    def __init__(self, transport: FailoverTransport) -> None:
        self.transport = transport

    async def __aenter__(self) -> FailoverTransport:
        return self.transport

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.aclose()
