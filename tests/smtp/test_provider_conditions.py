"""What holds for every message: a spent daily quota, a refused sender, a refused login.

Against a real aiosmtpd server: once the pool has met such a condition, no send is tried
(the server sees no further MAIL, no new connection) until the hold is over; the first send
after it is the probe, and a delivered message clears the condition. The pool's invariant
(`check`) holds after every scenario.
"""

from __future__ import annotations

import asyncio

import pytest
from conditions import until
from faults import FaultySmtp, SmtpFaults
from pool_emails import outgoing, settings
from servers import SmtpSink, TlsFiles

from async_notifier.errors import (
    DailyQuotaExceeded,
    LoginRefused,
    ProviderCondition,
    RecipientRejected,
    SenderRejected,
    SmtpThrottled,
)
from async_notifier.smtp.pool import SmtpPool

DAILY_QUOTA = "454 4.7.0 Throttling failure: Daily message quota exceeded."
SENDER_REJECTED = "553 5.7.1 <no-reply@example.com>: Sender address rejected: not owned by user"


def pool_for(server: SmtpSink, **extra: str) -> SmtpPool:
    # A one-second hold (the breaker's cool-down, at its floor) keeps the probe test short.
    env = {"SMTP_POOL_SIZE": "2", "SMTP_BREAKER_COOLDOWN_SECONDS": "1", **extra}
    return SmtpPool(settings(server.host, server.port, **env))


async def test_a_spent_daily_quota_holds_every_send_until_the_probe(
    faulty_smtp: FaultySmtp,
) -> None:
    faulty_smtp.faults = SmtpFaults(mail_reply=DAILY_QUOTA)
    async with pool_for(faulty_smtp) as pool:
        with pytest.raises(DailyQuotaExceeded) as first:
            await pool.send(outgoing(0))
        assert first.value.condition == "daily_quota"
        assert 0 < first.value.retry_after <= 1
        assert first.value.transient
        # Held: the next sends fail at once, and the server sees nothing more of them.
        for i in range(1, 6):
            with pytest.raises(DailyQuotaExceeded):
                await pool.send(outgoing(i))
        assert faulty_smtp.mail_commands == 1
        assert pool.held() is not None
        pool.check()
        # The hold ends; the probe meets the same refusal and the hold doubles.
        await until(lambda: pool.held() is None)
        with pytest.raises(DailyQuotaExceeded) as again:
            await pool.send(outgoing(6))
        assert 1 < again.value.retry_after <= 2
        assert faulty_smtp.mail_commands == 2
        # The quota frees: the probe after the hold is delivered, and nothing holds any more.
        faulty_smtp.configure(mail_reply=None)
        await until(lambda: pool.held() is None)
        await pool.send(outgoing(7))
        assert pool.held() is None
        await asyncio.gather(*(pool.send(outgoing(i)) for i in range(8, 12)))
        pool.check()
    assert sorted(str(m["Subject"]) for m in faulty_smtp.parsed()) == sorted(
        f"message {i}" for i in range(7, 12)
    )


async def test_a_refused_sender_is_the_configurations_fault_not_the_recipients(
    faulty_smtp: FaultySmtp,
) -> None:
    """A 5xx to MAIL FROM says nothing about the recipient: it holds for every message, and
    the records are retried once EMAIL_FROM is fixed, not dead-lettered as bad addresses."""
    faulty_smtp.faults = SmtpFaults(mail_reply=SENDER_REJECTED)
    async with pool_for(faulty_smtp) as pool:
        with pytest.raises(SenderRejected) as refused:
            await pool.send(outgoing(0))
        assert not isinstance(refused.value, RecipientRejected)
        assert refused.value.transient
        assert refused.value.condition == "sender_rejected"
        assert "check EMAIL_FROM" in refused.value.reason
        assert "no-reply@example.com" not in refused.value.reason  # addresses are hashed
        with pytest.raises(SenderRejected):
            await pool.send(outgoing(1))
        assert faulty_smtp.mail_commands == 1
        pool.check()


async def test_a_refused_recipient_is_still_only_that_records(faulty_smtp: FaultySmtp) -> None:
    faulty_smtp.faults = SmtpFaults(reject=frozenset({"user0@example.com"}))
    async with pool_for(faulty_smtp) as pool:
        with pytest.raises(RecipientRejected):
            await pool.send(outgoing(0))
        assert pool.held() is None
        await pool.send(outgoing(1))
        pool.check()
    assert len(faulty_smtp.messages) == 1


async def test_a_refused_login_holds_without_a_connection_storm(tls_files: TlsFiles) -> None:
    with SmtpSink(tls=tls_files.server_context(), auth=("mailer", "right-password")) as sink:
        pool = pool_for(
            sink,
            SMTP_TLS="starttls",
            SMTP_CA_FILE=str(tls_files.ca),
            SMTP_USER="mailer",
            SMTP_PASSWORD="wrong-password",
        )
        async with pool:
            results = await asyncio.gather(
                *(pool.send(outgoing(i)) for i in range(8)), return_exceptions=True
            )
            assert all(isinstance(r, LoginRefused) for r in results), results
            assert all(isinstance(r, ProviderCondition) for r in results)
            # After the first refusal the pool connects one at a time, and once held, not at
            # all: far fewer logins than sends.
            opened = sink.connections_opened
            assert opened <= 2
            for i in range(8, 12):
                with pytest.raises(LoginRefused):
                    await pool.send(outgoing(i))
            assert sink.connections_opened == opened
            assert sink.auth_failures >= 1  # (a client may try more than one mechanism)
            pool.check()


async def test_a_throttled_pool_halves_its_pace_instead_of_pausing(
    faulty_smtp: FaultySmtp,
) -> None:
    """AIMD: "Maximum sending rate exceeded" lowers the pace once per round; the record's
    error is transient (retried), and the rate shows in the batch's numbers."""
    faulty_smtp.faults = SmtpFaults(throttle_burst=(3, 1))
    async with pool_for(faulty_smtp, SMTP_RATE_LIMIT="50", FLEET_SIZE="2") as pool:
        pool.start_batch(0)
        assert pool.limits.send_rate == 25  # the fleet's share of the account's rate
        results = await asyncio.gather(
            *(pool.send(outgoing(i)) for i in range(8)), return_exceptions=True
        )
        throttled = [r for r in results if isinstance(r, SmtpThrottled)]
        assert len(throttled) == 2  # MAIL 4 and 8 of every 3 passed, 1 refused
        assert all(r is None for r in results if not isinstance(r, SmtpThrottled))
        assert pool.held() is None  # not a provider-wide condition
        stats = await pool.finish_batch()
        assert stats.throttled == 2
        assert stats.send_rate is not None
        assert stats.send_rate < 25
        pool.check()
