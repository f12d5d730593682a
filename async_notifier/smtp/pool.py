"""A bounded pool of long-lived SMTP connections, and delivery over it.

The pool's state is its list of connections (`smtp_connection.PooledConnection`),
those still connecting and closing included, and the queue of sends waiting for one.
One synchronous step, `_assign`, hands waiting sends to available connections,
starts the connections they need and picks the ones to retire; nothing else decides.
Connecting and closing run as tasks of their own whose completion callbacks do the
bookkeeping, so a cancelled send, warm-up or close (at any await, even before its
first step) can never leave a place counted that no connection holds.

Delivery on a PIPELINING connection hands the connection to the next email as soon
as the end of data is written, then waits for the server's verdict (one round trip
per message). A connection is retired (after `SMTP_MAX_MESSAGES_PER_CONNECTION`
messages or `SMTP_MAX_CONNECTION_AGE` seconds) only once no verdict is awaited on it,
and QUIT goes out only when no reply is outstanding, so retiring never costs a verdict.
Every command has a time limit; the end-of-data verdict waits up to `SMTP_DATA_TIMEOUT`
(RFC 5321 recommends 10 minutes), within the invocation's deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from aiosmtplib.errors import SMTPAuthenticationError

from ..account.limits import SendLimits
from ..config import Settings
from ..errors import (
    AttachmentUnreadable,
    CircuitOpen,
    DeliveryUnknown,
    LoginRefused,
    MessageTooLarge,
    NotifierError,
    ProviderCondition,
    SmtpThrottled,
    SmtpUnavailable,
)
from ..logs import get_logger
from ..mail.mime import StreamedEmail
from ..ports import CredentialsSource, PoolStats, Receipt
from .breaker import BreakerState, CircuitBreaker
from .channel import (
    AttachmentReadError,
    LostAfterEnd,
    LostBeforeEnd,
    ProtocolError,
    RefusedError,
    Reply,
    Slot,
)
from .connection import PooledConnection, Session, State, handshake, local_hostname, tls_context
from .replies import STALE, Command, judge, queue_id

log = get_logger()
# QUIT is a courtesy: a server slow to say goodbye does not hold a place for long.
QUIT_TIMEOUT = 5.0


@dataclass(frozen=True)
class PoolState:
    """A snapshot of the pool, as `check` verified it."""

    places: int
    connecting: int
    idle: int
    busy: int
    closing: int
    waiting: int


class PoolInvariantError(AssertionError):
    """The pool's books do not match its connections: a bug."""


class _StaleConnection(Exception):
    """The connection failed before the message was complete: nothing delivered, safe to resend."""


class SmtpPool:
    def __init__(self, settings: Settings, *, secret: CredentialsSource | None = None) -> None:
        self._settings = settings
        self._secret = secret
        self._size = settings.smtp_pool_size
        self._tls_context = tls_context(settings)
        self._local_hostname = local_hostname(settings)
        self._connections: list[PooledConnection] = []
        self._waiting: collections.deque[asyncio.Future[PooledConnection]] = collections.deque()
        self._closed = False
        self._warm = 0  # connections the batch warms up (`prewarm`), kept until it ends
        self._probe_timer: asyncio.TimerHandle | None = None
        self.limits = SendLimits(settings)  # the wiring gives it the quota (`use_quota`)
        self.breaker = CircuitBreaker(
            settings.smtp_breaker_threshold, settings.smtp_breaker_cooldown
        )
        self.size_limit: int | None = None  # the server's SIZE, learned at the first EHLO
        self.connections_opened = 0  # over the pool's life
        self._stats = PoolStats()

    async def __aenter__(self) -> SmtpPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ delivering

    name = "smtp"

    async def send(self, email: StreamedEmail) -> None:
        """Deliver one email and wait for the server's verdict (`deliver`, without receipt)."""
        await self.deliver(email)

    async def deliver(
        self, email: StreamedEmail, *, reached: Callable[[], None] | None = None
    ) -> Receipt:
        """`ports.MailTransport.deliver`: `reached()` once the end of data is written."""
        sending = await self.transmit(email)
        if reached is not None:
            reached()
        reply = await sending.verdict()
        return Receipt(self.name, queue_id(reply.text))

    async def transmit(self, email: StreamedEmail) -> Sending:
        """Send one email up to its end of data; its verdict is awaited with `verdict()`.

        A reused connection the server closed (it may hang up right after its last 250,
        before we see the close) fails before the message ends, so the email goes out on
        another: at most once per connection the pool can hold, then on a fresh one. A
        fresh connection that fails says the server is unwell: that is the record's error.
        Nothing was delivered when this raises or is cancelled; once it returns, the
        caller must await `verdict()` at once (the pool counts the verdict as awaited).
        """
        for attempt in range(1, self._size + 2):
            self._raise_if_held()
            await self.limits.wait_turn()
            self._raise_if_held()
            # A resend goes to the head of the queue: this email has waited its turn.
            conn = await self._acquire(first=attempt > 1)
            reused = conn.messages > 0
            try:
                slot = await self._transmit(conn, email)
            except _StaleConnection as exc:
                if reused and attempt <= self._size:
                    continue
                raise SmtpUnavailable(f"SMTP connection lost: {exc}") from None
            return Sending(self, conn, email, slot)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def held(self) -> ProviderCondition | None:
        """What holds for every message now, if anything: no send is tried meanwhile."""
        if self._circuit_open():
            return self._circuit_error()
        return self.limits.held()

    def _raise_if_held(self) -> None:
        held = self.held()
        if held is not None:
            raise held

    async def refresh_limits(self) -> None:
        """Re-read the account's quota when it is due (`SendLimits.refresh`)."""
        await self.limits.refresh()

    async def server_size_limit(self) -> int | None:
        """The server's advertised SIZE (0: no limit); connects if no connection has yet."""
        if self.size_limit is None:
            conn = await self._acquire()
            self._release(conn)
        return self.size_limit

    async def _acquire(self, *, first: bool = False) -> PooledConnection:
        """A ready connection with the write turn, checked with NOOP if it sat idle.

        Each failed check closes a connection that was ready before this send asked, and
        one opened since is used unchecked, so this ends.
        """
        asked = time.monotonic()
        while True:
            conn = await self._wait_for_connection(first=first)
            if await self._still_alive(conn, asked):
                return conn
            first = True

    async def _wait_for_connection(self, *, first: bool = False) -> PooledConnection:
        if self._closed:
            raise SmtpUnavailable("SMTP pool is closed")
        if self._circuit_open():
            raise self._circuit_error()
        waiter: asyncio.Future[PooledConnection] = asyncio.get_running_loop().create_future()
        if first:
            self._waiting.appendleft(waiter)
        else:
            self._waiting.append(waiter)
        self._update()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed over just as we were cancelled
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)

    async def _still_alive(self, conn: PooledConnection, asked: float) -> bool:
        """NOOP a connection that sat idle: servers drop idle clients without telling.

        One handed over a moment ago, or opened after the send asked, is only checked for
        a close seen meanwhile (a server that hangs up right after its 250 is noticed here,
        not by the next envelope).
        """
        if not conn.connected:
            self._release(conn, spoiled=True)
            return False
        idle = time.monotonic() - conn.last_used
        if conn.ready_at >= asked or idle < self._settings.smtp_idle_check:
            return True
        assert conn.channel is not None
        alive = False
        try:  # timed from its turn, by the channel: a verdict before it costs it nothing
            alive = await conn.channel.noop(self._settings.smtp_timeout)
        finally:  # cancelled, timed out or refused: the connection is not worth keeping
            conn.last_used = time.monotonic()
            self._release(conn, spoiled=not alive, keep_turn=alive)
        return alive

    async def _transmit(self, conn: PooledConnection, email: StreamedEmail) -> Slot:
        """Envelope and message, up to the end-of-data mark; the verdict is still due.

        Gives the write turn back in every case: after the end of data (the verdict now
        awaited), or with the connection spoiled when the stream was cut mid-way. Each
        reply is timed from its turn by the channel, and the body's writes by SMTP_TIMEOUT
        without progress, so a message pipelined behind a slow verdict keeps its time.
        """
        assert conn.channel is not None
        s = self._settings
        spoiled = True
        reused = conn.messages > 0
        try:
            verdict = await conn.channel.transmit(
                email,
                pipelining=conn.pipelining,
                size=conn.size_extension,
                chunk_size=s.smtp_chunk_bytes,
                limit=s.smtp_timeout,
                data_limit=s.smtp_data_timeout,
            )
            spoiled = False
            conn.messages += 1
            conn.awaited += 1
            return verdict
        except RefusedError as exc:
            outcome = self._judge(exc.phase, exc.reply, reused=reused, size=email.size)
            if outcome == STALE:  # 421 to a reused connection: the server closed it
                raise _StaleConnection(f"{exc.phase} answered {exc.reply}") from None
            # Answered in the middle of the body, the stream is mid-DATA: nothing more on it.
            spoiled = exc.early or not await self._reset(conn, exc.reply.code)
            raise outcome from None
        except AttachmentReadError as exc:
            spoiled = exc.spoiled
            raise AttachmentUnreadable(f"the attachment could not be read: {exc}") from None
        except (LostBeforeEnd, ProtocolError, OSError) as exc:
            raise _StaleConnection(f"{type(exc).__name__}: {exc}") from None
        finally:  # also when cancelled: a message cut short spoils the connection
            self._release(conn, spoiled=spoiled)

    async def _reset(self, conn: PooledConnection, code: int) -> bool:
        """Clear the envelope after a refusal; True when the connection can go on."""
        assert conn.channel is not None
        if code == 421:  # the server is closing this connection
            return False
        try:
            reply = await conn.channel.command("RSET", self._settings.smtp_timeout)
        except OSError:
            return False
        return reply.code == 250

    async def _confirm(self, conn: PooledConnection, email: StreamedEmail, verdict: Slot) -> Reply:
        """Wait for the server's answer to a transmitted message and judge it.

        A timeout here fails only this message: the connection takes nothing new and is
        closed once the other verdicts in flight on it have been read. Cancelled (the
        deadline), the message may still be accepted: the late reply is read into its own
        slot, so the connection stays in step for the emails behind it.
        """
        assert conn.channel is not None
        spoiled = False
        try:  # within SMTP_DATA_TIMEOUT of its turn: the channel fails a late reply
            reply = await conn.channel.verdict(verdict)
        except asyncio.CancelledError:
            log.warning(
                "cancelled after the message was sent: delivery unknown",
                extra={"message_id": email.message_id},
            )
            raise
        except RefusedError as exc:
            spoiled = exc.reply.code == 421
            outcome = self._judge("MESSAGE", exc.reply, reused=True, size=email.size)
            assert outcome != STALE  # a verdict is never a stale connection's
            raise outcome from None
        except LostAfterEnd as exc:
            spoiled = True
            raise DeliveryUnknown(
                f"no verdict for {email.message_id} ({exc}); it may have been accepted"
            ) from None
        finally:
            conn.awaited -= 1
            conn.last_used = time.monotonic()
            if spoiled:
                conn.spoiled = conn.retiring = True
            self._update()
        self.limits.accepted()
        return reply

    def _judge(
        self, phase: str, reply: Reply, *, reused: bool, size: int
    ) -> NotifierError | Literal["stale"]:
        """A refusal judged (`replies.judge`), and what it tells the pool. "Slow down" lowers
        the pace of every send; a provider-wide refusal holds them all (and fails those
        waiting for a connection); a size refusal teaches the server's limit."""
        error = judge(_command(phase), reply, reused=reused)
        if error == STALE:
            return error
        if isinstance(error, MessageTooLarge):
            self.learn_size_limit(size)
        elif isinstance(error, SmtpThrottled):
            self._stats.throttled += 1
            self.limits.throttled(error)
        elif isinstance(error, ProviderCondition):
            error = self.limits.trip(error)
            self._update()
        return error

    def learn_size_limit(self, refused: int) -> None:
        """A message of `refused` bytes was too large: the server's limit is below it, even
        if it advertised none (or a larger one)."""
        if not self.size_limit or self.size_limit >= refused:
            self.size_limit = max(1, refused - 1)

    # ------------------------------------------------------------------ the one step

    def _release(
        self, conn: PooledConnection, *, spoiled: bool = False, keep_turn: bool = False
    ) -> None:
        """Give back the write turn (unless `keep_turn`); a spoiled connection takes no more."""
        if spoiled:
            conn.spoiled = conn.retiring = True
        if not keep_turn or spoiled:
            conn.writer = False
        conn.last_used = time.monotonic()
        self._update()

    def _update(self) -> None:
        """Assign, open, retire: the only place the pool's state changes shape."""
        now = time.monotonic()
        s = self._settings
        for conn in list(self._connections):
            if conn.state is not State.READY:
                continue
            if conn.has_expired(now, s.smtp_max_connection_age, s.smtp_max_messages_per_connection):
                conn.retiring = True
            if (conn.retiring or self._closed) and conn.can_close():
                if self._quit_first(conn):
                    self._start(conn, State.CLOSING, self._quit(conn), self._closed_cb)
                else:  # nothing to say to it: close now, not in a task that might not run
                    self._forget(conn)
        while self._waiting:
            waiter = self._waiting[0]
            if waiter.done():  # cancelled, or failed by a connection attempt
                self._waiting.popleft()
                continue
            available = self._pick()
            if available is None:
                break
            self._waiting.popleft()
            available.writer = True
            waiter.set_result(available)
        if self._closed:
            return
        held = self.held()  # nothing connected and nothing may connect, or nothing may be sent
        if held is not None:
            self._fail_waiting(held)
            return
        connecting = sum(c.state is State.CONNECTING for c in self._connections)
        wanted = sum(not w.done() for w in self._waiting)
        while (
            connecting < wanted
            and len(self._connections) < self._size
            and self.breaker.may_connect(connecting)
        ):
            self._open_one()
            connecting += 1

    def _live(self) -> int:
        """Connections that can carry a message now or soon: connecting, or ready and not
        retiring (one past its age or its message count is on its way out)."""
        return sum(
            c.state is State.CONNECTING or (c.state is State.READY and not c.retiring)
            for c in self._connections
        )

    def _probe_when_due(self) -> None:
        """Look again when the cool-down ends: sends may be waiting behind a busy connection
        while the breaker is open, and nothing else would start the probe then."""
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        delay = self.breaker.retry_in()
        self._probe_timer = asyncio.get_running_loop().call_later(delay, self._update)

    def _circuit_open(self) -> bool:
        """The breaker is open and no connection is up or coming: nothing can be sent."""
        return self.breaker.state is BreakerState.OPEN and not any(
            c.state in (State.READY, State.CONNECTING) for c in self._connections
        )

    def _circuit_error(self) -> CircuitOpen:
        return CircuitOpen(
            f"SMTP circuit open: {self.breaker.threshold} connection attempts in a row "
            f"failed; next attempt in {self.breaker.retry_in():.0f} s",
            retry_after=self.breaker.retry_in(),
        )

    def _fail_waiting(self, error: Exception) -> None:
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_exception(error)

    def _pick(self) -> PooledConnection | None:
        """An available connection: an idle one first (most recently used: least likely
        stale), else a PIPELINING one with verdicts in flight."""
        best: PooledConnection | None = None
        for conn in self._connections:
            if not conn.is_available():
                continue
            if best is None or (conn.awaited, -conn.last_used) < (best.awaited, -best.last_used):
                best = conn
        return best

    def _open_one(self) -> PooledConnection:
        self.breaker.attempt_started()
        conn = PooledConnection()
        self._connections.append(conn)
        self._start(conn, State.CONNECTING, self._connect(conn), self._connected_cb)
        return conn

    def _start(
        self,
        conn: PooledConnection,
        state: State,
        work: collections.abc.Coroutine[None, None, None],
        done: Callable[[PooledConnection, asyncio.Task[None]], None],
    ) -> None:
        conn.state = state
        conn.task = asyncio.ensure_future(work)
        conn.task.add_done_callback(functools.partial(done, conn))

    # ------------------------------------------------------------------ connecting

    async def _connect(self, conn: PooledConnection) -> None:
        session = await self._open()
        if self.size_limit is None:
            self.size_limit = session.size_limit
        conn.mark_ready(
            session.channel, pipelining=session.pipelining, size_extension=session.size_extension
        )

    async def _open(self) -> Session:
        """Connect and authenticate; a refused login re-reads a rotated secret once."""
        credentials = await self._secret.get() if self._secret else None
        try:
            return await handshake(
                self._settings, credentials, self._tls_context, self._local_hostname
            )
        except SMTPAuthenticationError as exc:
            if credentials is not None and self._secret is not None:
                self._secret.invalidate(credentials)
                fresh = await self._secret.get()
                if fresh != credentials:
                    with contextlib.suppress(SMTPAuthenticationError):
                        return await handshake(
                            self._settings, fresh, self._tls_context, self._local_hostname
                        )
            where = f"SMTP {self._settings.smtp_server}:{self._settings.smtp_port}"
            raise LoginRefused(
                f"{where} refused the login: {exc.code} {exc.message} (check SMTP_USER and "
                "the password)"
            ) from None

    def _connected_cb(self, conn: PooledConnection, task: asyncio.Task[None]) -> None:
        """Book the end of a connection attempt, whatever it was (even cancelled unstarted)."""
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None or conn.state is not State.READY:
            conn.close_socket()
            self._connections.remove(conn)
            if error is not None:
                self._stats.connections_failed += 1
                if isinstance(error, ProviderCondition):  # a refused login: wait for a fix
                    error = self.limits.trip(error)
                opened = isinstance(error, NotifierError) and self.breaker.failed()
                if self.breaker.state is BreakerState.OPEN:
                    self._probe_when_due()
                if opened:
                    assert isinstance(error, NotifierError)
                    self._stats.circuit_opened += 1
                    log.warning(
                        "SMTP circuit opened",
                        extra={
                            "failures": self.breaker.threshold,
                            "retry_in": self.breaker.cooldown,
                            "reason": error.reason,
                        },
                    )
                # One failed attempt fails one waiting send, the one that waited longest;
                # with nobody waiting (a warm-up), the sends meet the failure themselves.
                waiter = next((w for w in self._waiting if not w.done()), None)
                if waiter is not None:
                    waiter.set_exception(error)
                elif not isinstance(error, NotifierError):
                    log.error("unexpected error opening an SMTP connection", exc_info=error)
        else:
            self.breaker.succeeded()
            self.connections_opened += 1
            self._stats.connections_opened += 1
        self._update()

    # ------------------------------------------------------------------ closing

    @staticmethod
    def _quit_first(conn: PooledConnection) -> bool:
        """QUIT only on a clean stream with no reply outstanding (one still due would be lost)."""
        channel = conn.channel
        return (
            channel is not None
            and not conn.spoiled
            and channel.is_connected
            and not channel.outstanding
        )

    async def _quit(self, conn: PooledConnection) -> None:
        assert conn.channel is not None
        with contextlib.suppress(OSError):
            await conn.channel.quit(min(QUIT_TIMEOUT, self._settings.smtp_timeout))

    def _closed_cb(self, conn: PooledConnection, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("unexpected error closing an SMTP connection", exc_info=task.exception())
        self._forget(conn)
        self._update()
        if not self._closed:
            self._warm_up()  # a connection retired with QUIT (its age, its count) is replaced

    def _forget(self, conn: PooledConnection) -> None:
        """Close the socket and free the place: the connection leaves the pool."""
        conn.close_socket()
        self._connections.remove(conn)
        self._stats.connections_closed += 1

    # ------------------------------------------------------------------ batches and life

    def prewarm(self, count: int) -> None:
        """Start opening connections, up to `count`, in the background.

        On a cold start the handshakes (TCP, TLS, AUTH: several round trips to a remote
        server) then overlap what the batch does first, such as loading aioboto3. Open and
        opening connections count towards `count`. A failure goes to a send waiting at that
        moment, if any (one attempt, one failed send), else it is left for the sends, which
        meet it again on the same path and report it per record.
        """
        if self._closed or self.held() is not None:
            return
        # Kept up while the batch runs: a connection retired past SMTP_MAX_CONNECTION_AGE
        # (after an idle gap, all of them) is replaced once its place is free.
        self._warm = min(count, self._size)
        self._update()  # retires the expired ones first: they are not live
        self._warm_up()

    def _warm_up(self) -> None:
        """Open connections until `_warm` are live, within the free places, while attempts
        succeed (a failing server is not reconnected to for nobody)."""
        while self._warm and self._live() < self._warm and self.breaker.healthy:
            connecting = sum(c.state is State.CONNECTING for c in self._connections)
            if len(self._connections) >= self._size or not self.breaker.may_connect(connecting):
                break
            self._open_one()

    async def stop_prewarm(self) -> None:
        """Cancel the connection attempts still running: the batch that wanted them is over
        (or past its deadline), and a half-open connection must not outlive the invocation."""
        self._warm = 0
        tasks = [c.task for c in self._connections if c.state is State.CONNECTING and c.task]
        for task in tasks:
            task.cancel()
        # The completion callbacks (registered first) have booked them when this returns.
        await asyncio.gather(*tasks, return_exceptions=True)

    def start_batch(self, connections: int) -> None:
        """Begin counting a batch's statistics and warm up its connections."""
        self._stats = PoolStats()
        self.prewarm(connections)

    async def finish_batch(self, *, until: float | None = None) -> PoolStats:
        """Stop the warm-ups still running, let retiring connections say QUIT (until the
        loop time `until`, if given), and return what the batch cost.

        A connection still owed a reply nobody waits for any more (its send was cancelled
        at the deadline) is closed: nothing ambiguous is carried into the next invocation,
        and a server that stopped answering does not keep its places. Nothing the batch
        started is left running when this returns (Lambda freezes the process).
        """
        await self.stop_prewarm()
        for conn in self._connections:
            if conn.is_idle() and conn.channel is not None and conn.channel.outstanding:
                conn.spoiled = conn.retiring = True
        self._update()
        await self._wait_closing(until)
        self._stats.send_rate = self.limits.send_rate
        return self._stats

    async def _wait_closing(self, until: float | None) -> None:
        tasks = [c.task for c in self._connections if c.state is State.CLOSING and c.task]
        if not tasks:
            return
        timeout = None if until is None else max(0.0, until - asyncio.get_running_loop().time())
        _, late = await asyncio.wait(tasks, timeout=timeout)
        for task in late:  # their completion callbacks close the sockets
            task.cancel()
        if late:
            await asyncio.wait(late)

    async def aclose(self) -> None:
        """QUIT every connection once its verdicts are in; the pool refuses further sends."""
        self._closed = True
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_exception(SmtpUnavailable("SMTP pool is closed"))
        await self.stop_prewarm()
        self._update()
        await self._wait_closing(None)

    def check(self) -> PoolState:
        """Verify the pool's invariant and return its state.

        Every place is one listed connection, and each is connecting, idle, busy (a
        writer or verdicts in flight) or closing; never more places than the pool's size,
        never a closed connection still listed, never a ready one without a channel.
        """
        counts = collections.Counter[str]()
        for conn in self._connections:
            if conn.state is State.CLOSED:
                raise PoolInvariantError("a closed connection is still listed")
            if conn.awaited < 0:
                raise PoolInvariantError("a connection awaits a negative number of verdicts")
            if conn.state is State.READY:
                if conn.channel is None:
                    raise PoolInvariantError("a ready connection has no channel")
                if (conn.retiring or self._closed) and conn.can_close():
                    raise PoolInvariantError("a connection to retire is not closing")
                counts["idle" if conn.is_idle() else "busy"] += 1
            else:
                if conn.writer or conn.awaited:
                    raise PoolInvariantError(f"a {conn.state.value} connection is in use")
                counts[conn.state.value] += 1
        state = PoolState(
            places=len(self._connections),
            connecting=counts["connecting"],
            idle=counts["idle"],
            busy=counts["busy"],
            closing=counts["closing"],
            waiting=sum(not w.done() for w in self._waiting),
        )
        if state.places > self._size:
            raise PoolInvariantError(f"{state.places} connections in a pool of {self._size}")
        if state.places != state.connecting + state.idle + state.busy + state.closing:
            raise PoolInvariantError(f"places do not add up: {state}")
        return state


def _command(phase: str) -> Command:
    if phase in ("MAIL", "RCPT", "DATA"):
        return phase  # type: ignore[return-value]
    return "MESSAGE"


class Sending:
    """A message past its end of data on a pooled connection; its verdict is still due."""

    __slots__ = ("_conn", "_email", "_pool", "_slot")

    def __init__(self, pool: SmtpPool, conn: PooledConnection, email: StreamedEmail, slot: Slot):
        self._pool = pool
        self._conn = conn
        self._email = email
        self._slot = slot

    async def verdict(self) -> Reply:
        """The server's verdict: its reply when it accepted the message, else raises the
        record's error (`DeliveryUnknown` when it cannot be known)."""
        return await self._pool._confirm(self._conn, self._email, self._slot)
