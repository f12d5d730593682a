"""The worker's SMTP client (SmtpPool) against two real MTAs, Postfix and Exim (`make test-mta`).

Each MTA runs in its own Debian root file system (tests/support/mta.py, scripts/rootfs.py) and
delivers into a Maildir the test reads back by Message-ID. Every scenario checks the outcome the
reply classification table gives (the record error's `kind`, whether it is transient), that
each message arrived exactly once or not at all, and that the MTA logged no protocol complaint
for what the client did. Marked `mta`: needs root (debootstrap, chroot, mount); run with
`make test-mta`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.policy
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from lambda_sandbox import is_root
from mta import (
    MESSAGE_SIZE_LIMIT,
    MTAS,
    POSTFIX_IDLE_TIMEOUT,
    RATE_LIMIT,
    RATE_LIMITED_SENDER,
    REFUSED_SENDER,
    UNKNOWN_RECIPIENT,
    ChrootMta,
    mta_rootfs,
)
from pool_emails import outgoing, settings
from servers import TlsFiles, make_tls_files

from async_notifier.errors import NotifierError, SenderRejected, SmtpUnavailable
from async_notifier.mail.mime import StreamedEmail
from async_notifier.smtp.pool import SmtpPool

pytestmark = pytest.mark.mta

MESSAGES = 20
# How long Postfix may take to drop an idle connection (smtpd_timeout, and some slack).
IDLE_WITHIN = POSTFIX_IDLE_TIMEOUT + 10.0
PIPELINING = pytest.mark.parametrize("pipelining", ["true", "false"], ids=["pipelined", "lockstep"])


def _server(
    name: str, tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles
) -> Iterator[ChrootMta]:
    if not is_root():
        pytest.fail("the MTA tests need root (debootstrap, chroot, mount)")
    server = MTAS[name](mta_rootfs(name), tmp_path_factory.mktemp(name), tls_files)
    with server:
        yield server


@pytest.fixture(scope="session")
def postfix(tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles) -> Iterator[ChrootMta]:
    yield from _server("postfix", tmp_path_factory, tls_files)


@pytest.fixture(scope="session")
def exim(tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles) -> Iterator[ChrootMta]:
    yield from _server("exim", tmp_path_factory, tls_files)


@pytest.fixture(params=["postfix", "exim"])
def mta(request: pytest.FixtureRequest) -> ChrootMta:
    server: ChrootMta = request.getfixturevalue(request.param)
    return server


def pool_for(server: ChrootMta, **env: str) -> SmtpPool:
    # Postfix offers STARTTLS, Exim does not: plain SMTP unless a test asks for TLS.
    return SmtpPool(settings(server.host, server.port, SMTP_TLS="none", **env))


@asynccontextmanager
async def observed(server: ChrootMta, *, complaints: bool = True) -> AsyncIterator[Counter[str]]:
    """What arrived during the block (Message-ID -> count), filled in once the MTA has closed
    every connection and delivered every message; and, unless told otherwise, no protocol
    complaint in its log meanwhile."""
    mark = server.log_mark()
    before = server.delivered()
    arrived: Counter[str] = Counter()
    yield arrived
    await asyncio.to_thread(server.quiet)
    arrived.update(server.delivered() - before)
    if complaints:
        assert server.complaints_since(mark) == [], server.log_since(mark)


def ids(*indices: int) -> Counter[str]:
    return Counter(f"<m{i}@example.com>" for i in indices)


def big(index: int, size: int) -> StreamedEmail:
    """A message of about `size` bytes (text lines), for the size limit."""
    small = outgoing(index)
    message = email.message_from_bytes(small.head, policy=email.policy.SMTP)
    line = "x" * 76 + "\n"
    message.set_content(line * (size // len(line) + 1))
    return dataclasses.replace(small, head=message.as_bytes())


# ------------------------------------------------------------------ 1. many messages


@PIPELINING
async def test_every_message_delivered_exactly_once(mta: ChrootMta, pipelining: str) -> None:
    async with observed(mta) as arrived:
        async with pool_for(mta, SMTP_POOL_SIZE="2", SMTP_PIPELINING=pipelining) as pool:
            await asyncio.gather(*(pool.send(outgoing(i)) for i in range(MESSAGES)))
        assert 1 <= pool.connections_opened <= 2
    assert arrived == ids(*range(MESSAGES))


# ------------------------------------------------------------------ 2. STARTTLS (Postfix)


async def test_starttls_verified_against_the_private_ca(
    postfix: ChrootMta, tls_files: TlsFiles
) -> None:
    mark = postfix.log_mark()
    async with observed(postfix) as arrived:
        env = {"SMTP_TLS": "starttls", "SMTP_CA_FILE": str(tls_files.ca), "SMTP_POOL_SIZE": "2"}
        async with SmtpPool(settings(postfix.host, postfix.port, **env)) as pool:
            await asyncio.gather(*(pool.send(outgoing(i)) for i in range(4)))
    assert arrived == ids(0, 1, 2, 3)
    assert "TLS connection established from" in postfix.log_since(mark)


async def test_starttls_with_the_wrong_ca_is_refused(postfix: ChrootMta, tmp_path: Path) -> None:
    """The client aborts the handshake: Postfix logs that (SSL_accept error, lost connection
    after STARTTLS), the one complaint expected here."""
    stranger = make_tls_files(tmp_path / "other-ca")
    mark = postfix.log_mark()
    async with observed(postfix, complaints=False) as arrived:
        env = {"SMTP_TLS": "starttls", "SMTP_CA_FILE": str(stranger.ca), "SMTP_POOL_SIZE": "1"}
        async with SmtpPool(settings(postfix.host, postfix.port, **env)) as pool:
            with pytest.raises(SmtpUnavailable) as caught:
                await pool.send(outgoing(0))
    assert caught.value.transient is True
    assert arrived == Counter()
    assert [line.split(": ", 1)[1] for line in postfix.complaints_since(mark)] == [
        "SSL_accept error from localhost[127.0.0.1]: lost connection",
        "NOQUEUE: lost connection after STARTTLS from localhost[127.0.0.1]",
    ]


# ------------------------------------------------------------------ 3. size limit


@PIPELINING
async def test_a_message_over_the_size_limit_is_too_large(mta: ChrootMta, pipelining: str) -> None:
    async with observed(mta) as arrived:
        async with pool_for(mta, SMTP_POOL_SIZE="1", SMTP_PIPELINING=pipelining) as pool:
            with pytest.raises(NotifierError) as caught:
                await pool.send(big(0, MESSAGE_SIZE_LIMIT + 64 * 1024))
            await pool.send(outgoing(1))  # the same connection is still usable
        assert pool.connections_opened == 1
    assert (caught.value.kind, caught.value.transient) == ("message_too_large", False)
    assert arrived == ids(1)


# ------------------------------------------------------------------ 4. unknown recipient


@PIPELINING
async def test_an_unknown_recipient_is_rejected_and_the_next_goes_through(
    mta: ChrootMta, pipelining: str
) -> None:
    async with observed(mta) as arrived:
        async with pool_for(mta, SMTP_POOL_SIZE="1", SMTP_PIPELINING=pipelining) as pool:
            with pytest.raises(NotifierError) as caught:
                await pool.send(outgoing(0, recipient=UNKNOWN_RECIPIENT))
            await pool.send(outgoing(1))
        assert pool.connections_opened == 1
    assert (caught.value.kind, caught.value.transient) == ("smtp_rejected", False)
    assert arrived == ids(1)


# ------------------------------------------------------------------ 5. refused sender (Postfix)


async def test_a_refused_sender_holds_every_send(postfix: ChrootMta) -> None:
    """Postfix applies check_sender_access at RCPT ("Sender address rejected"): the sender is
    the provider's verdict on EMAIL_FROM, so every send is held, not just this record."""
    refused = dataclasses.replace(outgoing(0), sender=REFUSED_SENDER)
    async with observed(postfix) as arrived, pool_for(postfix, SMTP_POOL_SIZE="1") as pool:
        with pytest.raises(SenderRejected) as caught:
            await pool.send(refused)
        assert pool.held() is not None
    assert (caught.value.kind, caught.value.transient) == ("smtp_sender_rejected", True)
    assert arrived == Counter()


# ------------------------------------------------------------------ 6. ratelimit (Exim)


async def test_past_the_rate_limit_the_reply_is_unavailable_never_permanent(
    exim: ChrootMta,
) -> None:
    """Exim's ratelimit ACL defers the sender's messages past RATE_LIMIT with 451."""
    sent: list[int] = []
    errors: list[NotifierError] = []
    async with observed(exim) as arrived, pool_for(exim, SMTP_POOL_SIZE="1") as pool:
        for index in range(RATE_LIMIT + 3):
            try:
                await pool.send(dataclasses.replace(outgoing(index), sender=RATE_LIMITED_SENDER))
            except NotifierError as exc:
                errors.append(exc)
            else:
                sent.append(index)
    assert errors, "Exim never deferred the sender"
    assert {(e.kind, e.transient) for e in errors} == {("smtp_unavailable", True)}
    assert 1 <= len(sent) <= RATE_LIMIT
    assert arrived == ids(*sent)


# ------------------------------------------------------------------ 7. idle timeout (Postfix)


async def test_a_connection_postfix_dropped_while_idle_is_replaced(postfix: ChrootMta) -> None:
    """Postfix drops the pooled connection after smtpd_timeout with 421 4.4.2; the next send
    meets that 421 (or the close) on a reused connection and goes out on a fresh one, not
    charged to the record (one attempt only). No NOOP check first: the idle check is off."""
    env = {"SMTP_POOL_SIZE": "1", "RETRY_ATTEMPTS": "1", "SMTP_IDLE_CHECK_SECONDS": "3600"}
    async with observed(postfix) as arrived:
        async with pool_for(postfix, **env) as pool:
            await pool.send(outgoing(0))
            mark = postfix.log_mark()
            await asyncio.to_thread(postfix.wait_for_log, mark, "timeout after", IDLE_WITHIN)
            await pool.send(outgoing(1))
        assert pool.connections_opened == 2
    assert arrived == ids(0, 1)
