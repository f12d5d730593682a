"""A bounded pool of long-lived SMTP connections, and delivery over it.

Connections open on demand, or ahead of it with `prewarm`, up to `size`; each does
EHLO/STARTTLS/AUTH once (through aiosmtplib), then carries up to `max_messages`
emails over a pipelined `SmtpChannel`, handed to the next email as soon as the
previous one's end of data is written. A connection idle for a while is checked
with NOOP before reuse and replaced when the server dropped it; one older than
`max_age` is retired.
The lifecycle is explicit (`aclose` sends QUIT to every idle connection) and the
pool holds no global state: a process keeps one across warm invocations, tests
own one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib.errors import SMTPAuthenticationError, SMTPException, SMTPResponseException

from .config import Settings
from .errors import (
    DeliveryUnknown,
    NotifierError,
    RecipientRejected,
    SmtpThrottled,
    SmtpUnavailable,
)
from .logs import get_logger
from .mime_stream import StreamedEmail
from .secrets import SecretSource, SmtpCredentials
from .smtp_channel import (
    LostAfterEnd,
    LostBeforeEnd,
    RefusedError,
    Reply,
    Slot,
    SmtpChannel,
)
from .throttle import PoolBackoff, TokenBucket, is_throttling

log = get_logger()
_QUIT_TIMEOUT = 2.0
# Authentication problems are the sender's configuration, not the message's: retry after a fix.
_AUTH_CODES = frozenset({530, 534, 535, 538})


@dataclass(eq=False)
class PooledConnection:
    channel: SmtpChannel
    pipelining: bool
    size_extension: bool
    created_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    messages_sent: int = 0
    broken: bool = False

    def usable(self, max_age: float) -> bool:
        return (
            not self.broken
            and self.channel.is_connected
            and time.monotonic() - self.created_at < max_age
        )


class _StaleConnection(Exception):
    """The connection failed before the message was complete: nothing delivered, safe to resend."""


class SmtpPool:
    def __init__(self, settings: Settings, *, secret: SecretSource | None = None) -> None:
        self._settings = settings
        self._secret = secret
        self._size = settings.smtp_pool_size
        self._max_messages = settings.smtp_max_messages_per_connection
        self._max_age = settings.smtp_max_connection_age
        self._idle_check = settings.smtp_idle_check
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
        self._warming: set[asyncio.Task[None]] = set()
        self._opening = 0  # connections the warm-up is still opening
        self._awaiting_warm = 0  # sends waiting for one of those rather than opening their own

    async def __aenter__(self) -> SmtpPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def send(
        self, email: StreamedEmail, *, on_cancelled_after_data: Callable[[], None] | None = None
    ) -> None:
        """Deliver one email; a pooled connection that turns out dead is replaced.

        A reused connection the server closed (it may hang up right after its last 250,
        before we see the close) fails before the message ends, so the email goes out on
        another: at most once per connection the pool can hold, then on a fresh one. A
        fresh connection that fails says the server is unwell: that is the record's error.

        On a PIPELINING connection the connection goes back to the pool as soon as the end
        of the message is written, and the server's verdict is awaited after: the next
        email's envelope goes out behind this one, so a message costs one round trip.
        `on_cancelled_after_data` is called when the send is cancelled (the deadline) after
        the end of the message went out: like DeliveryUnknown, the email may be delivered.
        """
        for attempt in range(1, self._size + 2):
            await self.backoff.wait()
            if self._rate is not None:
                await self._rate.acquire()
            async with self._connection() as conn:
                reused = conn.messages_sent > 0
                try:
                    verdict = await self._transmit(conn, email)
                except _StaleConnection as exc:
                    if reused and attempt <= self._size:
                        continue
                    raise SmtpUnavailable(f"SMTP connection lost: {exc}") from None
                if not conn.pipelining:  # the server takes one command at a time
                    await self._confirm(conn, email, verdict, on_cancelled_after_data)
                    return
            await self._confirm(conn, email, verdict, on_cancelled_after_data)
            return

    def prewarm(self, count: int) -> None:
        """Start opening connections, up to `count`, in the background.

        On a cold start the handshakes (TCP, TLS, AUTH: several round trips to a remote
        server) then overlap what the batch does first, such as loading aioboto3. Open and
        opening connections count towards `count`. A failure is left for the sends, which
        meet it again on the same path and report it per record.
        """
        if self._closed:
            return
        for _ in range(min(count, self._size) - self._total):
            # The slot is taken now, so a send that comes meanwhile waits for this
            # connection instead of opening one more.
            self._total += 1
            self._opening += 1
            task = asyncio.create_task(self._warm_one())
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)

    async def stop_prewarm(self) -> None:
        """Cancel the handshakes still running: the batch that wanted them is over (or past
        its deadline), and a half-open connection must not outlive the invocation."""
        tasks = list(self._warming)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A task cancelled before its first step never ran: give back the slot it held.
        self._total -= self._opening
        self._opening = 0

    async def _warm_one(self) -> None:
        """Open one connection into the idle list, in the slot `prewarm` took for it."""
        try:
            conn = await self._open()
        except BaseException as exc:
            self._opening -= 1
            self._total -= 1
            async with self._cond:
                self._cond.notify_all()  # the sends waiting for it open their own
            if isinstance(exc, Exception):
                return  # left for the sends, which meet it again and report it
            raise
        await self._release(conn, warmed=True)

    async def server_size_limit(self) -> int | None:
        """The server's advertised SIZE (0: no limit); connects if no connection has yet."""
        if self.size_limit is None:
            async with self._connection():
                pass
        return self.size_limit

    async def aclose(self, quit_timeout: float = _QUIT_TIMEOUT) -> None:
        """QUIT every idle connection; the pool refuses further sends."""
        await self.stop_prewarm()
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
            raise  # `_transmit` or `_confirm` has already judged the connection
        except BaseException:
            conn.broken = True  # cancelled or crashed mid-transaction: state unknown
            raise
        finally:
            await self._release(conn)

    async def _acquire(self) -> PooledConnection:
        while True:
            conn, expired = await self._take_idle_or_slot()
            await asyncio.gather(*(_quit(old) for old in expired))
            if conn is None:
                break
            if await self._still_alive(conn):
                return conn
            conn.channel.close()
            await self._free_slot()
        try:
            return await self._open()
        except BaseException:
            await self._free_slot()
            raise

    async def _free_slot(self) -> None:
        """Give back the slot of a connection that failed to open or was found dead."""
        async with self._cond:
            self._total -= 1
            self._cond.notify()

    async def _take_idle_or_slot(
        self,
    ) -> tuple[PooledConnection | None, list[PooledConnection]]:
        """An idle connection, or None after reserving a slot for a new one; plus the
        idle connections found too old or dead, for the caller to close outside the lock."""
        expired: list[PooledConnection] = []
        async with self._cond:
            while True:
                if self._closed:
                    raise SmtpUnavailable("SMTP pool is closed")
                while self._idle:
                    conn = self._idle.pop()  # most recently used first: least likely stale
                    if conn.usable(self._max_age):
                        return conn, expired
                    self._total -= 1
                    expired.append(conn)
                if self._awaiting_warm < self._opening:
                    # A connection the warm-up is opening will come free: wait for it.
                    self._awaiting_warm += 1
                    try:
                        await self._cond.wait()
                    finally:
                        self._awaiting_warm -= 1
                    continue
                if self._total < self._size:
                    self._total += 1
                    return None, expired
                await self._cond.wait()

    async def _still_alive(self, conn: PooledConnection) -> bool:
        """NOOP a connection that sat idle: servers drop idle clients without telling."""
        if time.monotonic() - conn.last_used < self._idle_check:
            return True
        try:
            async with asyncio.timeout(self._settings.smtp_timeout):
                return await conn.channel.noop()
        except TimeoutError:
            return False

    async def _release(self, conn: PooledConnection, *, warmed: bool = False) -> None:
        conn.last_used = time.monotonic()
        retire = not conn.usable(self._max_age) or conn.messages_sent >= self._max_messages
        # Book it before taking the lock (no await in between): even if cancelled while
        # waiting for the lock, the connection is in the idle list or counted out.
        if retire or self._closed:
            self._total -= 1
        else:
            self._idle.append(conn)
        if warmed:
            self._opening -= 1
        async with self._cond:
            if warmed:
                self._cond.notify_all()  # sends waiting for a warm-up connection look again
            else:
                self._cond.notify()
        if retire or self._closed:
            if conn.usable(float("inf")):
                await _quit(conn)
            else:
                conn.channel.close()

    async def _open(self) -> PooledConnection:
        """Connect and authenticate; a refused login re-reads a rotated secret once."""
        credentials = await self._secret.get() if self._secret else None
        try:
            return await self._connect(credentials)
        except SMTPAuthenticationError as exc:
            if credentials is not None and self._secret is not None:
                self._secret.invalidate(credentials)
                fresh = await self._secret.get()
                if fresh != credentials:
                    with contextlib.suppress(SMTPAuthenticationError):
                        return await self._connect(fresh)
            where = f"SMTP {self._settings.smtp_server}:{self._settings.smtp_port}"
            raise SmtpUnavailable(
                f"{where} refused the login: {exc.code} {exc.message} (check SMTP_USER and "
                "the password)"
            ) from None

    async def _connect(self, credentials: SmtpCredentials | None) -> PooledConnection:
        s = self._settings
        username = credentials.username if credentials else s.smtp_user
        password = credentials.password if credentials else s.smtp_password
        smtp = aiosmtplib.SMTP(
            hostname=s.smtp_server,
            port=s.smtp_port,
            username=username,
            password=password if username else None,
            local_hostname=self._local_hostname,
            timeout=s.smtp_timeout,
            use_tls=s.smtp_tls == "tls",
            start_tls=s.smtp_tls == "starttls",
            tls_context=self._tls_context,
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
            raise SmtpUnavailable(
                f"{where} refused the session: {exc.code} {exc.message}"
            ) from None
        except (SMTPException, OSError, ssl.SSLError) as exc:
            smtp.close()
            raise SmtpUnavailable(
                f"cannot connect to {where}: {type(exc).__name__}: {exc}"
            ) from None
        except BaseException:
            smtp.close()  # cancelled mid-handshake: the warm loop would keep the socket open
            raise
        self.connections_opened += 1
        if self.size_limit is None:
            size = smtp.esmtp_extensions.get("size", "")
            self.size_limit = int(size) if size.isdigit() else 0
        return PooledConnection(
            channel,
            pipelining=s.smtp_pipelining and smtp.supports_extension("pipelining"),
            size_extension=smtp.supports_extension("size"),
        )

    async def _transmit(self, conn: PooledConnection, email: StreamedEmail) -> Slot:
        """Envelope and message, up to the end-of-data mark; the verdict is still due."""
        try:
            async with asyncio.timeout(self._transaction_timeout(email)):
                verdict = await conn.channel.transmit(
                    email,
                    pipelining=conn.pipelining,
                    size=conn.size_extension,
                    chunk_size=self._settings.smtp_chunk_bytes,
                )
        except RefusedError as exc:
            await _reset(conn, exc.reply.code)
            raise self._refused(exc.reply) from None
        except TimeoutError:
            conn.broken = True
            conn.channel.close()
            raise _StaleConnection("timed out") from None
        except (LostBeforeEnd, OSError) as exc:
            conn.broken = True
            raise _StaleConnection(f"{type(exc).__name__}: {exc}") from None
        conn.messages_sent += 1
        return verdict

    async def _confirm(
        self,
        conn: PooledConnection,
        email: StreamedEmail,
        verdict: Slot,
        on_cancelled_after_data: Callable[[], None] | None,
    ) -> None:
        """Wait for the server's answer to a transmitted message and judge it."""
        try:
            async with asyncio.timeout(self._settings.smtp_timeout):
                await conn.channel.verdict(verdict)
        except asyncio.CancelledError:
            log.warning(
                "cancelled after the message was sent: delivery unknown",
                extra={"message_id": email.message_id},
            )
            if on_cancelled_after_data is not None:
                on_cancelled_after_data()
            raise
        except RefusedError as exc:
            if exc.reply.code == 421:
                conn.broken = True
            raise self._refused(exc.reply) from None
        except LostAfterEnd:
            conn.broken = True
            raise DeliveryUnknown(
                "connection lost after the message was sent, before the server's reply; "
                f"it may have accepted {email.message_id}"
            ) from None
        except TimeoutError:
            conn.broken = True
            conn.channel.close()
            raise DeliveryUnknown(
                f"timed out waiting for the reply to {email.message_id}; it may have been accepted"
            ) from None
        self.backoff.succeeded()

    def _refused(self, reply: Reply) -> NotifierError:
        """The record's error for a refusal; throttling also pauses the whole pool."""
        error = _classify(reply)
        if isinstance(error, SmtpThrottled):
            self.backoff.throttled()
        return error

    def _transaction_timeout(self, email: StreamedEmail) -> float:
        """SMTP_TIMEOUT for the exchange, plus time for the body at a modest 1 MB/s floor."""
        return self._settings.smtp_timeout + email.size / 1_000_000


def _classify(reply: Reply) -> NotifierError:
    text = f"SMTP {reply.code} {reply.text}"
    if is_throttling(reply.code, reply.text):
        return SmtpThrottled(text)
    if reply.code in _AUTH_CODES:
        return SmtpUnavailable(f"{text} (check SMTP_USER and the password)")
    if 500 <= reply.code < 600:
        return RecipientRejected(text)
    return SmtpUnavailable(text)


async def _reset(conn: PooledConnection, code: int) -> None:
    """Clear the envelope after a refusal so the connection can carry the next email."""
    if code == 421:
        conn.broken = True
        return
    try:
        reply = await conn.channel.command("RSET")
        conn.broken = reply.code != 250
    except OSError:
        conn.broken = True


async def _quit(conn: PooledConnection, quit_timeout: float = _QUIT_TIMEOUT) -> None:
    if not conn.channel.is_connected:
        return
    try:
        async with asyncio.timeout(quit_timeout):
            await conn.channel.quit()
    except OSError:
        pass
    finally:
        conn.channel.close()


def _tls_context(settings: Settings) -> ssl.SSLContext:
    """Always verifying; SMTP_CA_FILE adds a private CA, it never turns checks off."""
    cafile = str(settings.smtp_ca_file) if settings.smtp_ca_file else None
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
