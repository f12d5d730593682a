"""One pooled SMTP connection: its handshake, and the state the pool decides from.

A connection is an object with its own state rather than a slot in a counter, so the
pool can always answer "what is this connection doing?" (connecting, ready with a
send writing on it or verdicts in flight, closing) and a cancelled send can only
ever change its own connection. Its place in the pool is held from the moment it
starts connecting until its socket is closed: `SMTP_POOL_SIZE` is what the server
sees.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import ssl
import time
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib.errors import SMTPAuthenticationError, SMTPException, SMTPResponseException

from ..config import Settings
from ..errors import SmtpUnavailable
from ..ports import SmtpCredentials
from .channel import SmtpChannel


class State(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(eq=False)
class PooledConnection:
    """A connection and what is going on on it.

    `writer`: a send holds the write turn (envelope and message go out in order).
    `awaited`: verdicts that sends are waiting for; on a PIPELINING connection the
    next send writes while they are in flight. `retiring`: no new message; closed with
    QUIT once nothing is awaited. `spoiled`: the byte stream is in an unknown state (a
    message cut short): never written to again, its socket closed without QUIT once the
    verdicts still awaited have been read.
    """

    state: State = State.CONNECTING
    channel: SmtpChannel | None = None
    pipelining: bool = False
    size_extension: bool = False
    ready_at: float = 0.0
    last_used: float = 0.0
    messages: int = 0
    writer: bool = False
    awaited: int = 0
    retiring: bool = False
    spoiled: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def connected(self) -> bool:
        return self.channel is not None and self.channel.is_connected

    def is_idle(self) -> bool:
        return self.state is State.READY and not self.writer and self.awaited == 0

    def is_available(self) -> bool:
        """May take the next message now (without PIPELINING: only once its verdict is in)."""
        return (
            self.state is State.READY
            and not self.writer
            and not self.retiring
            and (self.pipelining or self.awaited == 0)
            and self.connected
        )

    def has_expired(self, now: float, max_age: float, max_messages: int) -> bool:
        """Too old, used up, or dropped by the server: take no more messages."""
        return now - self.ready_at >= max_age or self.messages >= max_messages or not self.connected

    def can_close(self) -> bool:
        return self.state is State.READY and not self.writer and self.awaited == 0

    def mark_ready(self, channel: SmtpChannel, *, pipelining: bool, size_extension: bool) -> None:
        self.channel = channel
        self.pipelining = pipelining
        self.size_extension = size_extension
        self.state = State.READY
        self.ready_at = self.last_used = time.monotonic()

    def close_socket(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.state = State.CLOSED


@dataclass(frozen=True)
class Session:
    """What a finished handshake hands the pool."""

    channel: SmtpChannel
    pipelining: bool
    size_extension: bool
    size_limit: int  # the server's SIZE; 0 when it sets none


async def handshake(
    settings: Settings,
    credentials: SmtpCredentials | None,
    tls_context: ssl.SSLContext | None,
    local_hostname: str,
) -> Session:
    """Connect, greet, STARTTLS and AUTH through aiosmtplib, then take the socket over.

    aiosmtplib bounds each step by `SMTP_TIMEOUT`. A refused login raises
    SMTPAuthenticationError (the caller may re-read a rotated secret); everything else
    that goes wrong is SmtpUnavailable. Cancelled mid-way, the socket is closed.
    """
    s = settings
    username = credentials.username if credentials else s.smtp_user
    password = credentials.password if credentials else s.smtp_password
    smtp = aiosmtplib.SMTP(
        hostname=s.smtp_server,
        port=s.smtp_port,
        username=username,
        password=password if username else None,
        local_hostname=local_hostname,
        timeout=s.smtp_timeout,
        use_tls=s.smtp_tls == "tls",
        start_tls=s.smtp_tls == "starttls",
        tls_context=tls_context,
    )
    where = f"SMTP {s.smtp_server}:{s.smtp_port}"
    try:
        await smtp.connect()
        if smtp.last_ehlo_response is None:  # aiosmtplib greets lazily without TLS or AUTH
            await smtp.ehlo()
        channel = SmtpChannel.take_over(smtp)
    except SMTPAuthenticationError:
        smtp.close()
        raise
    except SMTPResponseException as exc:
        smtp.close()
        raise SmtpUnavailable(f"{where} refused the session: {exc.code} {exc.message}") from None
    except (SMTPException, OSError, ssl.SSLError) as exc:
        smtp.close()
        raise SmtpUnavailable(f"cannot connect to {where}: {type(exc).__name__}: {exc}") from None
    except BaseException:
        smtp.close()  # cancelled mid-handshake: the socket must not outlive the attempt
        raise
    size = smtp.esmtp_extensions.get("size", "")
    return Session(
        channel,
        pipelining=s.smtp_pipelining and smtp.supports_extension("pipelining"),
        size_extension=smtp.supports_extension("size"),
        size_limit=int(size) if size.isdigit() else 0,
    )


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Always verifying; SMTP_CA_FILE adds a private CA, it never turns checks off."""
    if settings.smtp_tls == "none":
        return None
    cafile = str(settings.smtp_ca_file) if settings.smtp_ca_file else None
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def local_hostname(settings: Settings) -> str:
    return settings.smtp_local_hostname or socket.gethostname() or "localhost"
