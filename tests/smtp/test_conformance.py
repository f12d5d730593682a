"""SMTP conformance: every reply judged by the command it answers, every wait timed from its turn.

One test per row of the reply classification table (docs/failure-handling.md, issue 18),
pipelined (PIPELINING advertised, SMTP_PIPELINING=true) and not (SMTP_PIPELINING=false)
where the row applies both ways, then one test per failure the issue reports. The pool
talks to a `ScriptedRelay` (a real SMTP server answering from a script), and each test
asserts the record's outcome (error class, `kind`, `transient`, or delivered) and what the
relay saw: connections, DATA transactions, uploads of the body, no command inside a body.
The pool's invariant (`check`) holds after every scenario.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
from pool_emails import SENDER, outgoing, settings
from scripted_relay import Rule, ScriptedRelay

from async_notifier.errors import (
    CircuitOpen,
    DailyQuotaExceeded,
    DeliveryUnknown,
    LoginRefused,
    MessageTooLarge,
    NotifierError,
    RecipientRejected,
    SenderRejected,
    SmtpThrottled,
    SmtpUnavailable,
)
from async_notifier.mail.mime import StreamedEmail
from async_notifier.smtp.pool import SmtpPool

KIB = 1024
MIB = 1024 * KIB
PIPELINED = pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-by-one"])
ENVELOPE = ("MAIL", "RCPT", "DATA")
TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
IDLE_TIMEOUT = "421 4.4.2 relay.test Error: timeout exceeded"  # Postfix, to a reused connection


@contextmanager
def relay_with(
    *rules: Rule, pipelined: bool = True, size: int | None = None
) -> Iterator[ScriptedRelay]:
    with ScriptedRelay(list(rules), pipelining=pipelined, size=size) as relay:
        yield relay


@asynccontextmanager
async def pool_for(relay: ScriptedRelay, pipelined: bool, **extra: str) -> AsyncIterator[SmtpPool]:
    """A pool of one on short clocks; checked, then closed, after the scenario."""
    env = {
        "SMTP_POOL_SIZE": "1",
        "SMTP_TIMEOUT": "1",
        "SMTP_DATA_TIMEOUT": "2",
        "SMTP_PIPELINING": "true" if pipelined else "false",
        "SMTP_BREAKER_COOLDOWN_SECONDS": "1",
        **extra,
    }
    async with SmtpPool(settings(relay.host, relay.port, **env)) as pool:
        yield pool
        pool.check()


async def outcome(pool: SmtpPool, email: StreamedEmail) -> NotifierError | None:
    """The record's error, or None when the server accepted the message."""
    try:
        await pool.send(email)
    except NotifierError as exc:
        return exc
    return None


def assert_error(
    error: NotifierError | None, cls: type[NotifierError], kind: str, transient: bool
) -> None:
    assert isinstance(error, cls), repr(error)
    assert error.kind == kind, repr(error)
    assert error.transient is transient, repr(error)


def assert_clean(relay: ScriptedRelay) -> None:
    """Nothing the client wrote inside a body was a command (it never lost track of DATA)."""
    assert relay.commands_in_body == []


def large(index: int, size: int) -> StreamedEmail:
    """A message of about `size` bytes, text lines only (built directly: it is big)."""
    message_id = f"<big{index}@example.com>"
    to = f"user{index}@example.com"
    head = (
        f"From: {SENDER}\r\nTo: {to}\r\nSubject: large {index}\r\nMessage-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"0123456789" * 7 + b"\r\n"
    body = line * (size // len(line))
    return StreamedEmail(
        sender=SENDER,
        recipient=to,
        message_id=message_id,
        head=head + body,
        attachment=None,
        attachment_size=0,
        tail=b"",
    )


# --------------------------------------------------------------------------- the table, row by row


@PIPELINED
async def test_a_well_behaved_relay_gets_every_message_on_one_connection(pipelined: bool) -> None:
    """DATA 354 and MESSAGE 250: delivered, three messages in a row on one connection."""
    with relay_with(pipelined=pipelined, size=10 * MIB) as relay:
        async with pool_for(relay, pipelined) as pool:
            for i in range(3):
                assert await outcome(pool, outgoing(i)) is None
        assert relay.accepted == [f"<m{i}@example.com>" for i in range(3)]
        assert relay.connections_opened == 1
        assert relay.data_transactions == 3
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize("command", [*ENVELOPE, "MESSAGE"])
@pytest.mark.parametrize(
    ("reply", "hang_up"),
    [
        ("454 4.7.0 Maximum sending rate exceeded", False),
        ("421 4.7.0 Too many messages, slow down", True),
        ("421 4.7.28 Our system has detected an unusual rate of mail", True),
        ("421 4.7.0 Throttled: try again later", True),
    ],
    ids=["454", "421-too-many", "421-rate", "421-throttled"],
)
async def test_slow_down_is_smtp_throttled(
    pipelined: bool, command: str, reply: str, hang_up: bool
) -> None:
    with relay_with(Rule(command, reply, hang_up=hang_up), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
            assert pool.held() is None  # the pace halves; nothing is held
        assert_error(error, SmtpThrottled, "smtp_throttled", True)
        assert relay.connections_opened == 1  # not resent
        assert relay.data_transactions == (1 if command == "MESSAGE" else 0)
        assert relay.accepted == []
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize("command", [*ENVELOPE, "MESSAGE"])
@pytest.mark.parametrize(
    "reply",
    [
        "454 4.7.0 Throttling failure: Daily message quota exceeded.",
        "550 5.7.1 Daily sending quota exceeded",
        "451 4.7.1 daily sending quota reached, try tomorrow",
    ],
    ids=["ses-454", "550", "451"],
)
async def test_a_spent_daily_quota_is_provider_wide(
    pipelined: bool, command: str, reply: str
) -> None:
    with relay_with(Rule(command, reply), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
            assert pool.held() is not None
        assert_error(error, DailyQuotaExceeded, "smtp_daily_quota", True)
        assert relay.data_transactions == (1 if command == "MESSAGE" else 0)
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize("command", ENVELOPE)
@pytest.mark.parametrize(
    "reply",
    [
        "530 5.7.0 Authentication required",
        "534 5.7.9 Authentication mechanism is too weak",
        "535 5.7.8 Authentication credentials invalid",
        "538 5.7.11 Encryption required for requested authentication mechanism",
    ],
    ids=["530", "534", "535", "538"],
)
async def test_an_authentication_refusal_is_a_refused_login(
    pipelined: bool, command: str, reply: str
) -> None:
    with relay_with(Rule(command, reply), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
            assert pool.held() is not None
        assert_error(error, LoginRefused, "smtp_login_refused", True)
        assert relay.data_transactions == 0
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize("command", ENVELOPE)
async def test_421_on_a_reused_connection_is_stale_and_resent_on_a_fresh_one(
    pipelined: bool, command: str
) -> None:
    rule = Rule(command, IDLE_TIMEOUT, reused=True, hang_up=True)
    with relay_with(rule, pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            assert await outcome(pool, outgoing(0)) is None
            assert await outcome(pool, outgoing(1)) is None
        assert relay.accepted == ["<m0@example.com>", "<m1@example.com>"]
        assert relay.connections_opened == 2
        assert relay.data_transactions == 2
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize("command", ENVELOPE)
async def test_421_on_a_fresh_connection_is_smtp_unavailable(pipelined: bool, command: str) -> None:
    rule = Rule(command, "421 4.3.2 relay.test Service shutting down", hang_up=True)
    with relay_with(rule, pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
        assert_error(error, SmtpUnavailable, "smtp_unavailable", True)
        assert relay.connections_opened == 1  # not resent
        assert relay.data_transactions == 0
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize(
    "reply",
    [TOO_BIG, "552 Message size exceeds maximum permitted", "550 5.3.4 Message too big for system"],
    ids=["552-5.3.4", "552", "550-5.3.4"],
)
async def test_mail_refused_for_size_is_message_too_large(pipelined: bool, reply: str) -> None:
    with relay_with(Rule("MAIL", reply), pipelined=pipelined, size=MIB) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
            assert pool.held() is None  # about this message, not the sender
        assert_error(error, MessageTooLarge, "message_too_large", False)
        assert relay.connections_opened == 1
        assert relay.data_transactions == 0
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize(
    "reply",
    [
        "550 5.7.1 Sender not authorized",
        "553 5.1.8 Sender address syntax invalid",
        "554 5.7.1 Access denied",
    ],
    ids=["550", "553", "554"],
)
async def test_mail_refused_otherwise_is_a_refused_sender(pipelined: bool, reply: str) -> None:
    with relay_with(Rule("MAIL", reply), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
            assert pool.held() is not None
        assert_error(error, SenderRejected, "smtp_sender_rejected", True)
        assert relay.data_transactions == 0
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize(
    "reply",
    [
        "250 2.1.5 Ok",
        "251 2.1.5 User not local; will forward",
        "252 2.1.5 Cannot VRFY user, but will accept message",
    ],
    ids=["250", "251", "252"],
)
async def test_any_2xx_to_rcpt_accepts_the_recipient(pipelined: bool, reply: str) -> None:
    """Issue item 5: a 252 left DATA open and RSET was written into the body."""
    with relay_with(Rule("RCPT", reply), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            assert await outcome(pool, outgoing(0)) is None
            assert await outcome(pool, outgoing(1)) is None  # the connection is in step
        assert relay.accepted == ["<m0@example.com>", "<m1@example.com>"]
        assert relay.connections_opened == 1
        assert relay.data_transactions == 2
        assert relay.count("RSET") == 0
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize(
    "reply",
    [
        "553 5.7.1 <no-reply@example.com>: Sender address rejected: not owned by user",
        "554 5.7.1 <no-reply@example.com>: Sender address rejected: Access denied",
    ],
    ids=["553", "554"],
)
async def test_rcpt_refusing_the_sender_is_a_refused_sender(pipelined: bool, reply: str) -> None:
    with relay_with(Rule("RCPT", reply), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
        assert_error(error, SenderRejected, "smtp_sender_rejected", True)
        assert relay.data_transactions == 0
        assert_clean(relay)


@PIPELINED
async def test_rcpt_refused_for_size_is_message_too_large(pipelined: bool) -> None:
    with relay_with(Rule("RCPT", TOO_BIG), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
            assert pool.held() is None
        assert_error(error, MessageTooLarge, "message_too_large", False)
        assert relay.data_transactions == 0
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize(
    "reply",
    [
        "550 5.1.1 <user0@example.com>: Recipient address rejected: User unknown",
        "553 5.1.3 Bad recipient address syntax",
        "554 5.7.1 <user0@example.com>: Relay access denied",
        "552 5.2.2 Mailbox full",
    ],
    ids=["550", "553", "554", "552-5.2.2"],
)
async def test_rcpt_refused_otherwise_is_the_recipients(pipelined: bool, reply: str) -> None:
    """The connection goes on after RSET: the next message takes it."""
    with relay_with(Rule("RCPT", reply, nth=1), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
            assert pool.held() is None
            assert await outcome(pool, outgoing(1)) is None
        assert_error(error, RecipientRejected, "smtp_rejected", False)
        assert relay.accepted == ["<m1@example.com>"]
        assert relay.connections_opened == 1
        assert relay.data_transactions == 1
        assert relay.count("RSET") == 1
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize("command", ENVELOPE)
@pytest.mark.parametrize(
    "reply",
    [
        "450 4.2.0 Mailbox busy",
        "451 4.3.0 Error: queue file write error",
        "452 4.3.1 Insufficient system storage",
    ],
    ids=["450", "451", "452"],
)
async def test_other_4xx_to_the_envelope_is_smtp_unavailable(
    pipelined: bool, command: str, reply: str
) -> None:
    with relay_with(Rule(command, reply), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
            assert pool.held() is None
        assert_error(error, SmtpUnavailable, "smtp_unavailable", True)
        assert type(error) is SmtpUnavailable
        assert relay.count("MAIL") == 1  # not resent
        assert relay.data_transactions == 0
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize(
    "reply", ["554 5.7.1 Transaction failed", "550 5.7.0 DATA refused by policy"]
)
async def test_data_refused_is_the_recipients(pipelined: bool, reply: str) -> None:
    with relay_with(Rule("DATA", reply), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
        assert_error(error, RecipientRejected, "smtp_rejected", False)
        assert relay.data_transactions == 0
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize(
    "reply",
    [TOO_BIG, "552 Message size exceeds maximum permitted", "554 5.3.4 Message too big for system"],
    ids=["552-5.3.4", "552", "554-5.3.4"],
)
async def test_the_verdict_refusing_the_size_is_message_too_large(
    pipelined: bool, reply: str
) -> None:
    with relay_with(Rule("MESSAGE", reply), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
            assert pool.held() is None
        assert_error(error, MessageTooLarge, "message_too_large", False)
        assert relay.data_transactions == 1
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize("hang_up", [True, False], ids=["then-hangs-up", "then-reads-on"])
async def test_an_early_552_during_the_data_is_message_too_large(
    pipelined: bool, hang_up: bool
) -> None:
    """Never a protocol error nor a lost connection: uploaded once, refused for good."""
    rule = Rule("BODY", TOO_BIG, after_bytes=64 * KIB, hang_up=hang_up)
    with relay_with(rule, pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined, SMTP_POOL_SIZE="2") as pool:
            email = large(0, 2 * MIB)
            error = await outcome(pool, email)
        assert_error(error, MessageTooLarge, "message_too_large", False)
        assert len(relay.uploads_of(email.message_id)) == 1
        assert relay.accepted == []
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize(
    "reply",
    ["550 5.7.1 Message rejected: spam content", "554 5.6.0 Message content rejected"],
    ids=["550", "554"],
)
async def test_the_verdict_refusing_the_content_is_the_recipients(
    pipelined: bool, reply: str
) -> None:
    with relay_with(Rule("MESSAGE", reply), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
        assert_error(error, RecipientRejected, "smtp_rejected", False)
        assert relay.data_transactions == 1
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize(
    ("reply", "hang_up"),
    [
        ("421 4.3.2 relay.test Service shutting down", True),
        ("451 4.3.0 Error: queue file write error", False),
        ("452 4.3.1 Insufficient system storage", False),
        ("450 4.7.1 Try again later", False),
    ],
    ids=["421", "451", "452", "450"],
)
async def test_a_4xx_verdict_is_smtp_unavailable_and_not_resent(
    pipelined: bool, reply: str, hang_up: bool
) -> None:
    with relay_with(Rule("MESSAGE", reply, hang_up=hang_up), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined) as pool:
            error = await outcome(pool, outgoing(0))
        assert_error(error, SmtpUnavailable, "smtp_unavailable", True)
        assert type(error) is SmtpUnavailable
        assert relay.data_transactions == 1
        assert relay.accepted == []
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize(
    "rule",
    [Rule("MESSAGE", delay=math.inf), Rule("MESSAGE", close_instead=True)],
    ids=["no-reply", "closed"],
)
async def test_a_verdict_that_never_comes_is_delivery_unknown(pipelined: bool, rule: Rule) -> None:
    with relay_with(rule, pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined, SMTP_DATA_TIMEOUT="0.5") as pool:
            error = await outcome(pool, outgoing(0))
        assert_error(error, DeliveryUnknown, "delivery_unknown", True)
        assert relay.data_transactions == 1  # may have been delivered: never resent
        assert relay.connections_opened == 1
        assert_clean(relay)


def lost(command: str, how: str, reused: bool | None = None) -> Rule:
    """The relay hangs up at `command` (in the body: after 64 KiB), or never answers it."""
    if how == "closed":
        after = 64 * KIB if command == "BODY" else 0
        return Rule(command, close_instead=True, after_bytes=after, reused=reused)
    return Rule(command, delay=math.inf, reused=reused)


def email_for(command: str, index: int) -> StreamedEmail:
    """Large enough for the client to be still writing when the relay hangs up in the body."""
    return large(index, 16 * MIB) if command == "BODY" else outgoing(index)


LOSSES = [(c, how) for c in ENVELOPE for how in ("closed", "no-reply")] + [("BODY", "closed")]


@PIPELINED
@pytest.mark.parametrize(("command", "how"), LOSSES, ids=[f"{c}-{h}" for c, h in LOSSES])
async def test_a_reused_connection_lost_before_the_end_is_stale_and_the_email_resent(
    pipelined: bool, command: str, how: str
) -> None:
    with relay_with(lost(command, how, reused=True), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined, SMTP_TIMEOUT="0.5") as pool:
            first, second = email_for(command, 0), email_for(command, 1)
            assert await outcome(pool, first) is None
            assert await outcome(pool, second) is None
        assert relay.accepted == [first.message_id, second.message_id]
        assert relay.connections_opened == 2
        assert len(relay.uploads_of(second.message_id)) == (2 if command == "BODY" else 1)
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize(("command", "how"), LOSSES, ids=[f"{c}-{h}" for c, h in LOSSES])
async def test_a_fresh_connection_lost_before_the_end_is_smtp_unavailable(
    pipelined: bool, command: str, how: str
) -> None:
    with relay_with(lost(command, how), pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined, SMTP_TIMEOUT="0.5") as pool:
            email = email_for(command, 0)
            error = await outcome(pool, email)
        assert_error(error, SmtpUnavailable, "smtp_unavailable", True)
        assert type(error) is SmtpUnavailable
        assert relay.connections_opened == 1  # a fresh connection failing: not resent
        assert len(relay.uploads_of(email.message_id)) == (1 if command == "BODY" else 0)
        assert relay.accepted == []
        assert_clean(relay)


CHECK_FAILURES = [
    Rule("NOOP", "421 4.4.2 relay.test Error: timeout exceeded", hang_up=True),
    Rule("NOOP", "500 5.5.2 Error: bad syntax"),
    Rule("NOOP", delay=math.inf),
]


@PIPELINED
@pytest.mark.parametrize("rule", CHECK_FAILURES, ids=["421", "500", "no-reply"])
async def test_a_failed_noop_closes_the_connection_and_charges_no_record(
    pipelined: bool, rule: Rule
) -> None:
    with relay_with(rule, pipelined=pipelined) as relay:
        # An idle check before every reuse.
        async with pool_for(
            relay, pipelined, SMTP_IDLE_CHECK_SECONDS="0", SMTP_TIMEOUT="0.5"
        ) as pool:
            assert await outcome(pool, outgoing(0)) is None
            assert await outcome(pool, outgoing(1)) is None
        assert relay.count("NOOP") == 1
        assert relay.accepted == ["<m0@example.com>", "<m1@example.com>"]
        assert relay.connections_opened == 2
        assert_clean(relay)


@PIPELINED
@pytest.mark.parametrize(
    "rule",
    [
        Rule("RSET", "500 5.5.1 Error: command not implemented"),
        Rule("RSET", "421 4.3.2 Service shutting down", hang_up=True),
        Rule("RSET", delay=math.inf),
    ],
    ids=["500", "421", "no-reply"],
)
async def test_a_failed_rset_closes_the_connection_and_charges_no_record(
    pipelined: bool, rule: Rule
) -> None:
    """The record keeps its own refusal (its RCPT); the next one goes on a new connection."""
    refused = Rule("RCPT", "550 5.1.1 User unknown", nth=1)
    with relay_with(refused, rule, pipelined=pipelined) as relay:
        async with pool_for(relay, pipelined, SMTP_TIMEOUT="0.5") as pool:
            error = await outcome(pool, outgoing(0))
            assert await outcome(pool, outgoing(1)) is None
        assert_error(error, RecipientRejected, "smtp_rejected", False)
        assert relay.accepted == ["<m1@example.com>"]
        assert relay.connections_opened == 2
        assert_clean(relay)


@pytest.mark.parametrize(
    "rule",
    [
        Rule("GREETING", "554 5.3.2 relay.test Service currently unavailable"),
        Rule("GREETING", close_instead=True),
        Rule("GREETING", delay=math.inf),
    ],
    ids=["554", "closed-before-greeting", "never-greets"],
)
async def test_a_failed_greeting_is_a_failed_connection_attempt(rule: Rule) -> None:
    """Issue item 5: a close before the greeting counted as a successful connect."""
    with relay_with(rule) as relay:
        async with pool_for(
            relay,
            True,
            SMTP_TIMEOUT="0.5",
            SMTP_BREAKER_THRESHOLD="2",
            SMTP_BREAKER_COOLDOWN_SECONDS="30",
        ) as pool:
            first = await outcome(pool, outgoing(0))
            second = await outcome(pool, outgoing(1))
            third = await outcome(pool, outgoing(2))
        for error in (first, second):
            assert_error(error, SmtpUnavailable, "smtp_unavailable", True)
            assert not isinstance(error, CircuitOpen)
        assert isinstance(third, CircuitOpen)  # two failed attempts opened the breaker
        assert relay.connections_opened == 2
        assert relay.count("MAIL") == 0


# --------------------------------------------------------------------------- the failures


async def test_a_slow_verdict_does_not_time_out_the_messages_pipelined_behind_it() -> None:
    """Item 1: each reply's time limit runs from the reply before it, not from its write."""
    with relay_with(Rule("MESSAGE", delay=1.2), pipelined=True) as relay:
        async with pool_for(relay, True, SMTP_TIMEOUT="0.5", SMTP_DATA_TIMEOUT="5") as pool:
            results = await asyncio.gather(
                *(outcome(pool, outgoing(i)) for i in range(3)), return_exceptions=True
            )
        assert results == [None, None, None]
        assert relay.data_transactions == 3
        assert relay.connections_opened == 1
        assert sorted(relay.accepted) == [f"<m{i}@example.com>" for i in range(3)]


async def test_an_idle_check_queued_behind_a_slow_verdict_is_not_timed_out() -> None:
    """Item 1, NOOP: the check waits its turn behind the verdict; the connection is kept."""
    with relay_with(Rule("MESSAGE", delay=1.2), pipelined=True) as relay:
        async with pool_for(
            relay,
            True,
            SMTP_TIMEOUT="0.5",
            SMTP_DATA_TIMEOUT="5",
            SMTP_IDLE_CHECK_SECONDS="0",
        ) as pool:
            results = await asyncio.gather(
                *(outcome(pool, outgoing(i)) for i in range(3)), return_exceptions=True
            )
        assert results == [None, None, None]
        assert relay.data_transactions == 3
        assert relay.connections_opened == 1


async def test_a_refusal_queued_behind_a_slow_verdict_keeps_the_connection() -> None:
    """Item 1, RSET: a refused recipient behind a slow verdict is refused, not timed out."""
    unknown = Rule("RCPT", "550 5.1.1 User unknown", contains="user1@")
    rules = (Rule("MESSAGE", delay=1.2), unknown)
    with relay_with(*rules, pipelined=True) as relay:
        async with pool_for(relay, True, SMTP_TIMEOUT="0.5", SMTP_DATA_TIMEOUT="5") as pool:
            results = await asyncio.gather(
                *(outcome(pool, outgoing(i)) for i in range(3)), return_exceptions=True
            )
        assert results[0] is None, results
        assert results[2] is None, results
        assert isinstance(results[1], RecipientRejected), results
        assert relay.count("RSET") == 1
        assert relay.data_transactions == 2
        assert relay.connections_opened == 1
        assert_clean(relay)


@pytest.mark.parametrize("size", [2 * MIB, 12 * MIB], ids=["2MiB", "12MiB"])
async def test_an_early_552_then_hang_up_uploads_the_message_once(size: int) -> None:
    """Item 3: no SIZE, 552 5.3.4 after 64 KiB of the message, then the relay hangs up, on a
    pool whose connections already carried a message (the resends went to those). On
    loopback the client has written all of 2 MiB before it reads the reply (which then
    looks like the verdict); 12 MiB is still being written when it arrives."""
    rule = Rule("BODY", TOO_BIG, after_bytes=64 * KIB, hang_up=True)
    with relay_with(rule, pipelined=True, size=None) as relay:
        async with pool_for(relay, True, SMTP_POOL_SIZE="2") as pool:
            await asyncio.gather(pool.send(outgoing(0)), pool.send(outgoing(1)))
            email = large(2, size)
            error = await outcome(pool, email)
        assert_error(error, MessageTooLarge, "message_too_large", False)
        assert len(relay.uploads_of(email.message_id)) == 1
        assert relay.accepted == ["<m0@example.com>", "<m1@example.com>"]
        assert_clean(relay)


async def test_postfix_closing_idle_connections_fails_no_record() -> None:
    """Item 4: "421 4.4.2 timeout exceeded" to the next MAIL of every reused connection."""
    with relay_with(Rule("MAIL", IDLE_TIMEOUT, reused=True, hang_up=True)) as relay:
        async with pool_for(relay, True, SMTP_POOL_SIZE="2") as pool:
            first = await asyncio.gather(*(outcome(pool, outgoing(i)) for i in range(2)))
            second = await asyncio.gather(*(outcome(pool, outgoing(i)) for i in range(2, 4)))
        assert first + second == [None] * 4
        assert sorted(relay.accepted) == [f"<m{i}@example.com>" for i in range(4)]
        assert relay.data_transactions == 4


async def test_prewarm_after_an_idle_gap_replaces_connections_past_their_age() -> None:
    """Item 5: connections older than SMTP_MAX_CONNECTION_AGE do not count as warm."""
    with relay_with() as relay:
        async with pool_for(relay, True, SMTP_POOL_SIZE="2", SMTP_MAX_CONNECTION_AGE="1") as pool:
            pool.prewarm(2)
            assert await asyncio.to_thread(relay.wait_until, "connections_opened", 2)
            await asyncio.sleep(1.2)  # the idle gap: both are past their age now
            pool.prewarm(2)
            assert await asyncio.to_thread(relay.wait_until, "connections_opened", 4, 3.0)
            assert await outcome(pool, outgoing(0)) is None
        assert relay.connections_opened == 4


async def test_the_probe_starts_when_the_cool_down_ends_even_with_a_busy_connection() -> None:
    """Item 5: with the breaker open and the one live connection busy on a slow verdict, the
    end of the cool-down starts the probe; the waiting email goes on the new connection."""
    rules = (
        Rule("MESSAGE", nth=1, delay=3.0),
        Rule("GREETING", "554 5.3.2 Service currently unavailable", nth=2),
    )
    with relay_with(*rules, pipelined=False) as relay:
        async with pool_for(
            relay,
            False,
            SMTP_POOL_SIZE="2",
            SMTP_DATA_TIMEOUT="10",
            SMTP_BREAKER_THRESHOLD="1",
            SMTP_BREAKER_COOLDOWN_SECONDS="0.5",
        ) as pool:
            slow = asyncio.ensure_future(outcome(pool, outgoing(0)))
            assert await asyncio.to_thread(relay.wait_until, "data_transactions", 1)
            refused = await outcome(pool, outgoing(1))  # the second connection is refused
            assert_error(refused, SmtpUnavailable, "smtp_unavailable", True)
            waiting = asyncio.ensure_future(outcome(pool, outgoing(2)))
            assert await waiting is None
            third = relay.connections_opened
            assert await slow is None
        assert third == 3  # the probe's connection carried message 2, before the slow verdict
        assert [u.connection for u in relay.uploads_of("<m2@example.com>")] == [3]
