"""A bounded pool of long-lived SMTP connections, and delivery over it.

Connections open lazily up to `size`, do EHLO/STARTTLS/AUTH once, carry up to
`max_messages` emails each, and are replaced when the server drops them. The
lifecycle is explicit (`aclose` sends QUIT to every idle connection) and the
pool holds no global state, so tests and warm invocations can own one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib.errors import (
    SMTPDataError,
    SMTPException,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPSenderRefused,
)

from .config import Settings
from .errors import (
    DeliveryUnknown,
    NotifierError,
    RecipientRejected,
    SmtpThrottled,
    SmtpUnavailable,
)
from .mailer import OutgoingEmail
from .throttle import PoolBackoff, TokenBucket, is_throttling

_QUIT_TIMEOUT = 5.0


@dataclass(eq=False)
class PooledConnection:
    smtp: aiosmtplib.SMTP
    created_at: float = field(default_factory=time.monotonic)
    messages_sent: int = 0
    broken: bool = False

    def usable(self) -> bool:
        return not self.broken and self.smtp.is_connected


class _StaleConnection(Exception):
    """The connection failed before any message data was sent: safe to resend."""


class SmtpPool:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._size = settings.smtp_pool_size
        self._max_messages = settings.smtp_max_messages_per_connection
        self._tls_context = _tls_context(settings) if settings.smtp_tls != "none" else None
        self._local_hostname = settings.smtp_local_hostname or socket.gethostname() or "localhost"
        self._idle: list[PooledConnection] = []
        self._total = 0
        self._cond = asyncio.Condition()
        self._closed = False
        self._rate = TokenBucket(settings.smtp_rate_limit) if settings.smtp_rate_limit else None
        self.backoff = PoolBackoff()
        self.size_limit: int | None = None  # the server's SIZE, learned at the first EHLO
        self.connections_opened = 0

    async def __aenter__(self) -> SmtpPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def send(self, email: OutgoingEmail) -> None:
        """Deliver one email; a connection that went stale while idle is replaced once."""
        for attempt in (1, 2):
            await self.backoff.wait()
            if self._rate is not None:
                await self._rate.acquire()
            async with self._connection() as conn:
                reused = conn.messages_sent > 0
                try:
                    await self._deliver(conn, email)
                except _StaleConnection as exc:
                    if reused and attempt == 1:
                        continue
                    raise SmtpUnavailable(f"SMTP connection lost: {exc}") from None
                except SmtpThrottled:
                    self.backoff.throttled()
                    raise
                self.backoff.succeeded()
                return

    async def server_size_limit(self) -> int | None:
        """The server's advertised SIZE (0 or absent: no limit); connects if none has yet."""
        if self.connections_opened == 0:
            async with self._connection():
                pass
        return self.size_limit

    async def aclose(self, quit_timeout: float = _QUIT_TIMEOUT) -> None:
        """QUIT every idle connection; the pool refuses further sends."""
        async with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._total -= len(idle)
            self._cond.notify_all()
        await asyncio.gather(*(_quit(conn, quit_timeout) for conn in idle))

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[PooledConnection]:
        conn = await self._acquire()
        try:
            yield conn
        except NotifierError:
            raise  # `_deliver` has already judged the connection
        except BaseException:
            conn.broken = True  # cancelled or crashed mid-command: state unknown
            raise
        finally:
            await self._release(conn)

    async def _acquire(self) -> PooledConnection:
        async with self._cond:
            while True:
                if self._closed:
                    raise SmtpUnavailable("SMTP pool is closed")
                while self._idle:
                    conn = self._idle.pop()  # most recently used first: least likely stale
                    if conn.usable():
                        return conn
                    conn.smtp.close()
                    self._total -= 1
                if self._total < self._size:
                    self._total += 1
                    break
                await self._cond.wait()
        try:
            return await self._open()
        except BaseException:
            async with self._cond:
                self._total -= 1
                self._cond.notify()
            raise

    async def _release(self, conn: PooledConnection) -> None:
        retire = not conn.usable() or conn.messages_sent >= self._max_messages
        async with self._cond:
            if retire or self._closed:
                self._total -= 1
            else:
                self._idle.append(conn)
            self._cond.notify()
        if retire or self._closed:
            if conn.usable():
                await _quit(conn)
            else:
                conn.smtp.close()

    async def _open(self) -> PooledConnection:
        s = self._settings
        smtp = aiosmtplib.SMTP(
            hostname=s.smtp_server,
            port=s.smtp_port,
            username=s.smtp_user,
            password=s.smtp_password if s.smtp_user else None,
            local_hostname=self._local_hostname,
            timeout=s.smtp_timeout,
            use_tls=s.smtp_tls == "tls",
            start_tls=s.smtp_tls == "starttls",
            tls_context=self._tls_context,
        )
        try:
            await smtp.connect()
        except SMTPResponseException as exc:
            smtp.close()
            raise SmtpUnavailable(
                f"SMTP {s.smtp_server}:{s.smtp_port} refused the session: {exc.code} {exc.message}"
            ) from None
        except (TimeoutError, SMTPException, OSError, ssl.SSLError) as exc:
            smtp.close()
            raise SmtpUnavailable(
                f"cannot connect to SMTP {s.smtp_server}:{s.smtp_port}: {type(exc).__name__}: {exc}"
            ) from None
        self.connections_opened += 1
        if self.size_limit is None:
            size = smtp.esmtp_extensions.get("size", "")
            self.size_limit = int(size) if size.isdigit() and int(size) > 0 else 0
        return PooledConnection(smtp)

    async def _deliver(self, conn: PooledConnection, email: OutgoingEmail) -> None:
        smtp = conn.smtp
        options = [f"SIZE={len(email.data)}"] if smtp.supports_extension("size") else []
        try:
            await smtp.mail(email.sender, options=options)
            await smtp.rcpt(email.recipient)
        except (SMTPSenderRefused, SMTPRecipientRefused) as exc:
            await _reset(conn, exc.code)
            raise _classify(exc) from None
        except (TimeoutError, SMTPException, OSError) as exc:
            conn.broken = True
            raise _StaleConnection(f"{type(exc).__name__}: {exc}") from None
        try:
            await smtp.data(email.data)
        except SMTPDataError as exc:
            await _reset(conn, exc.code)
            raise _classify(exc) from None
        except (TimeoutError, SMTPException, OSError) as exc:
            conn.broken = True
            raise DeliveryUnknown(
                f"connection lost during DATA ({type(exc).__name__}); the server may have "
                f"accepted {email.message_id}"
            ) from None
        conn.messages_sent += 1


def _classify(exc: SMTPResponseException) -> NotifierError:
    text = f"SMTP {exc.code} {exc.message}"
    if is_throttling(exc.code, exc.message):
        return SmtpThrottled(text)
    if 500 <= exc.code < 600:
        return RecipientRejected(text)
    return SmtpUnavailable(text)


async def _reset(conn: PooledConnection, code: int) -> None:
    """Clear the envelope after a refusal so the connection can carry the next email."""
    if code == 421:
        conn.broken = True
        return
    try:
        await conn.smtp.rset()
    except (TimeoutError, SMTPException, OSError):
        conn.broken = True


async def _quit(conn: PooledConnection, quit_timeout: float = _QUIT_TIMEOUT) -> None:
    try:
        await conn.smtp.quit(timeout=quit_timeout)
    except (TimeoutError, SMTPException, OSError):
        pass
    finally:
        conn.smtp.close()


def _tls_context(settings: Settings) -> ssl.SSLContext:
    """Always verifying; SMTP_CA_FILE adds a private CA, it never turns checks off."""
    cafile = str(settings.smtp_ca_file) if settings.smtp_ca_file else None
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
