"""The classification table (`smtp/replies.judge`), row by row: a reply judged by the command
it answers, its code, its enhanced status code and whether the connection was reused.

The same rows are driven end to end against a scripted relay (test_conformance.py) and real
MTAs (tests/mta); this is the table itself, so a change to it shows here first.
"""

from __future__ import annotations

import pytest

from async_notifier.errors import (
    DailyQuotaExceeded,
    LoginRefused,
    MessageTooLarge,
    NotifierError,
    ProviderCondition,
    RecipientRejected,
    SenderRejected,
    SmtpThrottled,
    SmtpUnavailable,
)
from async_notifier.smtp.channel import Reply
from async_notifier.smtp.replies import STALE, Command, enhanced_status, judge, queue_id

SES_RATE = "4.7.0 Throttling failure: Maximum sending rate exceeded."
SES_QUOTA = "4.7.0 Throttling failure: Daily message quota exceeded."

ROWS: list[tuple[Command, int, str, bool, type[NotifierError] | str]] = [
    # "slow down" and the daily quota, whatever the command
    ("MAIL", 454, SES_RATE, False, SmtpThrottled),
    ("MESSAGE", 454, SES_RATE, True, SmtpThrottled),
    ("MAIL", 421, "4.7.0 rate limit exceeded", True, SmtpThrottled),
    ("MAIL", 454, SES_QUOTA, False, DailyQuotaExceeded),
    ("MESSAGE", 454, SES_QUOTA, False, DailyQuotaExceeded),
    ("RCPT", 550, "5.4.5 Daily user sending quota exceeded", False, DailyQuotaExceeded),
    # the login
    ("MAIL", 530, "5.7.0 Authentication required", False, LoginRefused),
    ("MAIL", 535, "5.7.8 Authentication credentials invalid", True, LoginRefused),
    # 421: the server closing an idle connection, or unwell
    ("MAIL", 421, "4.4.2 mail.example.com Error: timeout exceeded", True, STALE),
    ("RCPT", 421, "4.3.2 Service shutting down", True, STALE),
    ("DATA", 421, "4.3.2 Service shutting down", True, STALE),
    ("MAIL", 421, "4.3.2 Service shutting down", False, SmtpUnavailable),
    ("MESSAGE", 421, "4.3.2 Service shutting down", True, SmtpUnavailable),
    # size
    ("MAIL", 552, "5.3.4 Message size exceeds fixed limit", False, MessageTooLarge),
    ("MAIL", 552, "Message size exceeds fixed maximum message size", False, MessageTooLarge),
    ("MESSAGE", 552, "5.3.4 Message size exceeds fixed limit", True, MessageTooLarge),
    ("MESSAGE", 552, "5.2.3 Message length exceeds administrative limit", False, MessageTooLarge),
    ("MESSAGE", 554, "5.3.4 Message too big for system", False, MessageTooLarge),
    ("RCPT", 552, "5.2.2 Mailbox full", False, RecipientRejected),
    ("MESSAGE", 552, "5.2.2 Mailbox full", False, RecipientRejected),
    # the sender
    ("MAIL", 553, "5.7.1 Sender address rejected: not owned by user", False, SenderRejected),
    ("MAIL", 550, "5.1.0 Sender rejected", True, SenderRejected),
    ("RCPT", 553, "5.7.1 <a@b.example>: Sender address rejected: denied", False, SenderRejected),
    # the recipient, the message
    ("RCPT", 550, "5.1.1 <u@example.com>: Recipient address rejected", False, RecipientRejected),
    ("RCPT", 553, "5.1.3 bad address syntax", False, RecipientRejected),
    ("DATA", 554, "5.5.1 No valid recipients", False, RecipientRejected),
    ("MESSAGE", 554, "5.6.0 Message rejected", False, RecipientRejected),
    # other 4xx: try again later
    ("MAIL", 451, "4.3.0 try again", False, SmtpUnavailable),
    ("RCPT", 450, "4.2.0 mailbox busy", False, SmtpUnavailable),
    ("RCPT", 452, "4.5.3 Too many recipients", False, SmtpUnavailable),
    ("MESSAGE", 451, "4.7.1 ratelimit exceeded, try later", False, SmtpUnavailable),
]


@pytest.mark.parametrize(("command", "code", "text", "reused", "expected"), ROWS)
def test_the_table(
    command: Command, code: int, text: str, reused: bool, expected: type[NotifierError] | str
) -> None:
    outcome = judge(command, Reply(code, text), reused=reused)
    if isinstance(expected, str):
        assert outcome == expected
        return
    assert type(outcome) is expected
    assert isinstance(outcome, NotifierError)
    assert outcome.reason.startswith(f"SMTP {code} ")


def test_what_holds_for_every_message_is_transient_and_held() -> None:
    for command, code, text, reused, expected in ROWS:
        outcome = judge(command, Reply(code, text), reused=reused)
        if isinstance(outcome, ProviderCondition):
            assert outcome.transient
        if expected in (MessageTooLarge, RecipientRejected):
            assert isinstance(outcome, NotifierError)
            assert not outcome.transient


def test_an_address_in_a_reply_never_reaches_the_reason() -> None:
    outcome = judge("RCPT", Reply(550, "5.1.1 <ana@example.com>: unknown"), reused=False)
    assert isinstance(outcome, NotifierError)
    assert "ana@example.com" not in outcome.reason


@pytest.mark.parametrize(
    ("text", "code"),
    [("5.3.4 too big", "5.3.4"), (" 4.7.0 later", "4.7.0"), ("Too big", None), ("5.3 x", None)],
)
def test_enhanced_status(text: str, code: str | None) -> None:
    assert enhanced_status(text) == code


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Ok 0100018c5f2a1c3b-5a1e7b0e-0b2f-4d7e-9f3a-000000",
            "0100018c5f2a1c3b-5a1e7b0e-0b2f-4d7e-9f3a-000000",
        ),
        ("2.0.0 Ok: queued as 4F2A1C3B9D", "4F2A1C3B9D"),
        ("OK id=1rB2c3-000Abc-4D", "1rB2c3-000Abc-4D"),
        ("OK", None),
        ("Message accepted for delivery", None),
    ],
)
def test_the_providers_id_in_a_250(text: str, expected: str | None) -> None:
    """SES's "250 Ok <id>", Postfix's "queued as", Exim's "id=": the Receipt's provider id."""
    assert queue_id(text) == expected
