"""The benchmark's throttling relay answers like an SES account: 454 beyond the rate or quota.

Counts only, never timing: the rate is so low (one token per 1,000 s) that no send in a
test can refill the bucket, so "beyond the bucket" is certain.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
from collections.abc import Iterator
from email.message import EmailMessage

import aiosmtplib
import pytest

from bench.relay import QUOTA_REPLY, RATE_REPLY, ThrottlingRelay

SLOW = 0.001  # messages per second: the bucket never refills during a test


def _message(number: int) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "sender@example.com"
    message["To"] = "someone@example.com"
    message["Subject"] = f"message {number}"
    message["Message-ID"] = f"<m{number}@bench.example.com>"
    message.set_content("hello\n")
    return message


@pytest.fixture
def relay() -> Iterator[ThrottlingRelay]:
    with ThrottlingRelay(SLOW, burst=2) as running:
        yield running


def _send(relay: ThrottlingRelay, numbers: range) -> list[str]:
    """Send each message on one connection; return the replies to the refused MAILs."""
    refused = []
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        for number in numbers:
            try:
                client.send_message(_message(number))
            except smtplib.SMTPSenderRefused as error:
                refused.append(f"{error.smtp_code} {error.smtp_error.decode()}")
    return refused


def test_mail_beyond_the_bucket_gets_the_rate_454(relay: ThrottlingRelay) -> None:
    refused = _send(relay, range(10))
    assert refused == [RATE_REPLY] * 8
    assert relay.mail_commands == 10
    assert relay.rate_refusals == 8
    assert relay.quota_refusals == 0
    assert relay.accepted == {"<m0@bench.example.com>": 1, "<m1@bench.example.com>": 1}
    assert relay.counters.messages == 2


def test_every_mail_gets_the_quota_454_while_the_quota_is_spent(relay: ThrottlingRelay) -> None:
    relay.quota_exceeded = True
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        for number in range(3):
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.send_message(_message(number))
            assert refused.value.smtp_code == 454
            assert refused.value.smtp_error.decode() == QUOTA_REPLY.removeprefix("454 ")
        relay.quota_exceeded = False
        client.send_message(_message(3))
    assert (relay.mail_commands, relay.quota_refusals, relay.rate_refusals) == (4, 3, 0)
    assert relay.accepted == {"<m3@bench.example.com>": 1}


def test_a_message_accepted_twice_is_counted_twice(relay: ThrottlingRelay) -> None:
    assert _send(relay, range(1)) == []
    assert _send(relay, range(1)) == []  # the same Message-ID again
    assert relay.accepted == {"<m0@bench.example.com>": 2}


def test_reset_zeroes_the_counters_and_refills_the_bucket(relay: ThrottlingRelay) -> None:
    assert _send(relay, range(4)) == [RATE_REPLY] * 2
    relay.reset()
    assert (relay.mail_commands, relay.rate_refusals, relay.quota_refusals) == (0, 0, 0)
    assert relay.accepted == {}
    assert relay.counters.messages == 0
    # A full bucket again: two more go through, the third does not.
    assert _send(relay, range(10, 13)) == [RATE_REPLY]
    assert relay.accepted == {"<m10@bench.example.com>": 1, "<m11@bench.example.com>": 1}


def _lines(sock: socket.socket, count: int) -> list[str]:
    """Every line of the next `count` replies (a reply ends with its "NNN " line)."""
    buffer = b""
    lines: list[str] = []
    while sum(line[3:4] == " " for line in lines) < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {lines}"
        buffer += chunk
        *complete, buffer = buffer.split(b"\r\n")
        lines += [line.decode() for line in complete]
    return lines


def _replies(sock: socket.socket, count: int) -> list[str]:
    """The final line of each of the next `count` replies."""
    return [line for line in _lines(sock, count) if line[3:4] == " "]


def test_pipelined_commands_after_a_refused_mail_are_answered_in_order(
    relay: ThrottlingRelay,
) -> None:
    group = b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<someone@example.com>\r\nDATA\r\n"
    body = b"Message-ID: <p%d@bench.example.com>\r\nSubject: x\r\n\r\nhello\r\n.\r\n"
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        assert _replies(sock, 1)[0].startswith("220")
        sock.sendall(b"EHLO client.example.com\r\n")
        assert "250-PIPELINING" in _lines(sock, 1)
        replies = []
        for number in range(3):
            sock.sendall(group)
            answered = _replies(sock, 3)
            if answered[-1].startswith("354"):
                sock.sendall(body % number)
                answered += _replies(sock, 1)
            replies.append([line[:3] for line in answered])
        sock.sendall(b"QUIT\r\n")
        assert _replies(sock, 1)[0].startswith("221")
    assert replies == [
        ["250", "250", "354", "250"],
        ["250", "250", "354", "250"],
        ["454", "503", "503"],
    ]
    assert relay.accepted == {"<p0@bench.example.com>": 1, "<p1@bench.example.com>": 1}


def test_concurrent_connections_share_one_account() -> None:
    async def send_all(port: int) -> list[BaseException | object]:
        async def one(number: int) -> object:
            return await aiosmtplib.send(
                _message(number), hostname="127.0.0.1", port=port, timeout=10
            )

        return await asyncio.gather(*(one(n) for n in range(20)), return_exceptions=True)

    with ThrottlingRelay(SLOW, burst=5) as relay:
        outcomes = asyncio.run(send_all(relay.port))
        refused = [o for o in outcomes if isinstance(o, aiosmtplib.SMTPSenderRefused)]
        assert len(refused) == 15
        assert {error.code for error in refused} == {454}
        assert len(outcomes) - len(refused) == 5
        assert relay.mail_commands == 20
        assert relay.rate_refusals == 15
        assert sum(relay.accepted.values()) == len(relay.accepted) == 5
        assert relay.counters.connections == 20


def test_a_rate_or_burst_that_is_not_positive_is_refused() -> None:
    for rate, burst in ((0, None), (-1, None), (1, 0)):
        with pytest.raises(ValueError, match="must be positive"):
            ThrottlingRelay(rate, burst=burst)
