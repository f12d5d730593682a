"""Fault-injecting peers for the reliability tests: a misbehaving SMTP server and S3 proxy.

`FaultySmtp` is the `SmtpSink` (same recording, same server-side connection counts) with
faults described by an `SmtpFaults` value that can be swapped while the server runs.
`S3FaultProxy` sits between a client and moto and answers some requests itself (500, 503, a
dropped connection) or damages the response on its way back (a body cut short, a slow body).

Both serve from their own event loop in their own thread, so all shared state sits behind a
lock, and every fault is recorded *before* the client can observe it: once a client has seen
a disconnect or an error reply, the counters and logs already say why.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import random
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from email.utils import formatdate
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from aiosmtpd.smtp import Envelope, Session, syntax
from connections import Connections
from servers import LOOPBACK, Received, SmtpSink, _Handler, _SinkController, _SinkSMTP

from async_notifier.local.service import Service

# --------------------------------------------------------------------------- SMTP

#: The replies the server sends for each fault, for assertions on what a client saw.
REPLY_CLOSING = "421 4.7.0 closing"
REPLY_TEMPFAIL = "451 4.3.0 try again"
REPLY_REJECT = "550 5.1.1 mailbox unavailable"
REPLY_THROTTLE = "454 4.7.0 Throttling failure: Maximum sending rate exceeded"
REPLY_RATE_CLOSE = "421 4.7.0 rate limit exceeded"
REPLY_REJECT_5XX = "554 5.6.0 message rejected"


class SmtpFault(enum.StrEnum):
    """What `FaultySmtp` injected; a StrEnum, so `counts["tempfail"]` works as well."""

    CLOSE_AFTER = "close_after"  # 421 + close after N messages on a connection
    TEMPFAIL = "tempfail"  # 451 after DATA, message not recorded
    REJECT = "reject"  # 550 at RCPT for a configured recipient
    THROTTLE = "throttle"  # 454 at MAIL (or 421 + close with throttle_close)
    DROP_IN_DATA = "drop_in_data"  # connection closed while DATA was being received
    DROP_AFTER_DATA = "drop_after_data"  # message recorded, connection closed, no reply
    REJECT_5XX = "reject_5xx"  # 554 after DATA (random mode only), message not recorded
    STALL = "stall"  # a stall before the greeting or the DATA reply
    SILENT = "silent"  # a command (or a message's verdict) never answered (never_answer)


@dataclass(frozen=True)
class SmtpFaults:
    """Which faults `FaultySmtp` injects. Every field off by default: a healthy server.

    Message ordinals ("every k-th") are counted server-wide, from 1, over the DATA commands
    that reached the 354 reply since this value was installed; at most one DATA fault hits a
    message, in this order of precedence: drop_in_data_every, tempfail_every,
    drop_after_data_every, then the random mode.
    """

    #: After N messages accepted on a connection, its next command (QUIT excepted, which gets
    #: its normal 221) is answered `421 4.7.0 closing` and the connection is closed. 0 = the
    #: first command after the greeting.
    close_after: int | None = None
    #: Every k-th message gets `451 4.3.0 try again` after its DATA; it is not recorded.
    tempfail_every: int | None = None
    #: Recipients refused at RCPT with `550 5.1.1` (case-insensitive).
    reject: AbstractSet[str] = frozenset()  # stored as a casefolded frozenset
    #: The refusal's text, `{address}` replaced by the recipient (as many servers echo it).
    reject_reply: str = REPLY_REJECT
    #: (every, length): MAIL commands are counted server-wide; `every` of them pass, then
    #: `length` are refused with `454 4.7.0 Throttling failure...`, and so on. (0, 1) refuses
    #: every MAIL.
    throttle_burst: tuple[int, int] | None = None
    #: Throttle with `421 4.7.0 rate limit exceeded` and close the connection instead of 454.
    throttle_close: bool = False
    #: Every MAIL is answered with this reply instead of 250 (a spent daily quota, a refused
    #: sender: what holds for every message).
    mail_reply: str | None = None
    #: Every k-th message: after the 354, read the message's header block, then close the
    #: connection before its body and final dot were read (nothing recorded, no reply).
    drop_in_data_every: int | None = None
    #: Every k-th message: record it (in `accepted` AND `ambiguous`), then close the
    #: connection without sending the 250: delivered, but the client cannot know.
    drop_after_data_every: int | None = None
    #: Sleep this long before the greeting or before the reply to the end of DATA (every
    #: message). `math.inf` stalls until the client gives up (the message is then never
    #: recorded, since a stalled server records only when it replies).
    stall_seconds: float | None = None
    stall_on: Literal["greeting", "data"] = "data"
    #: Random mode: one draw from `random.Random(rng_seed)` per message at its DATA, mapped to
    #: at most one of these faults (cumulative probabilities, their sum must be <= 1).
    #: p_reject_5xx answers `554 5.6.0 message rejected` after DATA (not recorded).
    rng_seed: int = 0
    #: A slow server: wait this long before answering each command named in `delay_on`
    #: ("*": all of them; "MESSAGE": the verdict on a message's end of data), plus a random
    #: 0..`reply_jitter` seconds drawn from `random.Random(rng_seed)`.
    reply_delay: float = 0.0
    reply_jitter: float = 0.0
    delay_on: AbstractSet[str] = frozenset({"*"})
    #: Commands (or "MESSAGE") the server never answers: it goes quiet, the socket stays open.
    never_answer: AbstractSet[str] = frozenset()
    #: The k-th message's verdict (by DATA ordinal, from 1) comes `verdict_delays[k-1]` late.
    verdict_delays: tuple[float, ...] = ()
    p_tempfail: float = 0.0
    p_drop_in_data: float = 0.0
    p_drop_after_data: float = 0.0
    p_reject_5xx: float = 0.0

    def __post_init__(self) -> None:
        # Accept any iterable of addresses (a set, a list...), compare case-insensitively.
        object.__setattr__(self, "reject", frozenset(a.casefold() for a in self.reject))
        object.__setattr__(self, "delay_on", frozenset(c.upper() for c in self.delay_on))
        object.__setattr__(self, "never_answer", frozenset(c.upper() for c in self.never_answer))
        if self.reply_delay < 0 or self.reply_jitter < 0:
            raise ValueError("reply_delay and reply_jitter must be >= 0")
        if self.close_after is not None and self.close_after < 0:
            raise ValueError("close_after must be >= 0")
        for name in ("tempfail_every", "drop_in_data_every", "drop_after_data_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.throttle_burst is not None:
            every, length = self.throttle_burst
            if every < 0 or length < 1:
                raise ValueError("throttle_burst needs every >= 0 and length >= 1")
        if self.stall_seconds is not None and not self.stall_seconds >= 0:
            raise ValueError("stall_seconds must be >= 0")
        if self.stall_on not in ("greeting", "data"):
            raise ValueError("stall_on must be 'greeting' or 'data'")
        probabilities = self._probabilities()
        if any(not 0.0 <= p <= 1.0 for _, p in probabilities):
            raise ValueError("probabilities must be within [0, 1]")
        if sum(p for _, p in probabilities) > 1.0 + 1e-9:
            raise ValueError("the probabilities must add up to at most 1")

    def _probabilities(self) -> list[tuple[SmtpFault, float]]:
        return [
            (SmtpFault.DROP_IN_DATA, self.p_drop_in_data),
            (SmtpFault.TEMPFAIL, self.p_tempfail),
            (SmtpFault.DROP_AFTER_DATA, self.p_drop_after_data),
            (SmtpFault.REJECT_5XX, self.p_reject_5xx),
        ]

    @property
    def random_mode(self) -> bool:
        return any(p > 0 for _, p in self._probabilities())


@dataclass(frozen=True)
class SmtpFaultEvent:
    """One injected fault, with what the server knew of the transaction at that moment.

    `command` is the SMTP command it answered ("GREETING" for a stall before the greeting).
    `data` is the message content received so far: complete for tempfail, reject_5xx and
    drop_after_data, the header block only for drop_in_data, None before DATA (reject,
    throttle, close_after, a greeting stall). `random` tells whether the random mode chose it.
    """

    kind: SmtpFault
    command: str
    mail_from: str | None
    rcpt_tos: tuple[str, ...]
    data: bytes | None
    random: bool = False


class _FaultySMTP(_SinkSMTP):
    """One connection: the sink's protocol with the fault points wired in."""

    sink: FaultySmtp

    def __init__(self, handler: Any, *, sink: FaultySmtp, **kwargs: Any) -> None:
        super().__init__(handler, sink=sink, **kwargs)
        # The fault chosen at DATA start for the message in flight, read by handle_DATA.
        self.pending: tuple[SmtpFault | None, bool] = (None, False)
        self.ordinal = 0  # that message's DATA ordinal, server-wide
        # Guard every command: close_after must answer "the next command", whatever it is.
        self._smtp_methods = {
            name: self._guarded(name, method) for name, method in self._smtp_methods.items()
        }

    def _guarded(
        self, command: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        async def guarded(arg: str | None) -> None:
            await self.sink._before_reply(self, command)
            limit = self.sink.faults.close_after
            if limit is not None and command != "QUIT" and self.accepted_here >= limit:
                self.sink._injected(self._event(SmtpFault.CLOSE_AFTER, command))
                await self.push(REPLY_CLOSING)
                await self.hang_up()
            await method(arg)

        # HELP and the syntax checks read attributes the @syntax decorator set on the method.
        guarded.__dict__.update(getattr(method, "__dict__", {}))
        return guarded

    def _event(
        self,
        kind: SmtpFault,
        command: str,
        data: bytes | None = None,
        *,
        rcpt_tos: Iterable[str] | None = None,
        chosen_randomly: bool = False,
    ) -> SmtpFaultEvent:
        envelope = self.envelope
        return SmtpFaultEvent(
            kind=kind,
            command=command,
            mail_from=envelope.mail_from if envelope is not None else None,
            rcpt_tos=tuple(
                rcpt_tos if rcpt_tos is not None else (envelope.rcpt_tos if envelope else ())
            ),
            data=data,
            random=chosen_randomly,
        )

    async def hang_up(self) -> None:
        """Close the connection without another word, and never return.

        Closing makes asyncio call connection_lost(), where aiosmtpd cancels the task this runs
        in; so nothing after the close (no status line) is ever written.
        """
        if self.transport is not None:
            self.transport.close()
        await asyncio.get_running_loop().create_future()

    async def _handle_client(self) -> None:
        faults = self.sink.faults
        if faults.stall_seconds is not None and faults.stall_on == "greeting":
            self.sink._injected(self._event(SmtpFault.STALL, "GREETING"))
            try:
                await _stall(faults.stall_seconds)
            except asyncio.CancelledError:  # the client went away (EOF): close our side too
                self._writer.close()
                raise
        await super()._handle_client()

    def _data_will_start(self, arg: str | None) -> bool:
        """Whether aiosmtpd's smtp_DATA would answer 354 (otherwise it replies an error)."""
        assert self.session is not None
        return bool(
            self.session.host_name
            and not (self._auth_required and not self.session.authenticated)
            and self.envelope is not None
            and self.envelope.rcpt_tos
            and not arg
        )

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if not self._data_will_start(arg):
            await super().smtp_DATA(arg)
            return
        self.pending = self.sink._decide_data()
        self.ordinal = self.sink._data_ordinal()
        kind, chosen_randomly = self.pending
        if kind is not SmtpFault.DROP_IN_DATA:
            await super().smtp_DATA(arg)  # handle_DATA applies the other faults
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        # Read the header block (so the event shows which message it was: Message-ID, To...),
        # then hang up before the body, let alone the final dot, has been read.
        head = bytearray()
        while len(head) < _DROP_IN_DATA_READ:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                line = await self._reader.read(exc.consumed)
            if line == b".\r\n":  # a message without a body: hang up at its very end
                break
            head += line
            if line == b"\r\n":
                break
        self.sink._injected(
            self._event(
                SmtpFault.DROP_IN_DATA, "DATA", bytes(head), chosen_randomly=chosen_randomly
            )
        )
        await self.hang_up()


#: At most this much of the content is read before a drop_in_data hang-up.
_DROP_IN_DATA_READ = 64 * 1024


async def _stall(seconds: float) -> None:
    if math.isinf(seconds):
        await asyncio.get_running_loop().create_future()  # until the connection goes away
    else:
        await asyncio.sleep(seconds)


class _FaultyHandler(_Handler):
    """aiosmtpd hooks: throttling at MAIL, rejection at RCPT, the DATA outcomes (EHLO, with
    PIPELINING when `pipelining` is set, is the sink's)."""

    sink: FaultySmtp

    async def handle_MAIL(
        self,
        server: _FaultySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        faults = self.sink.faults
        throttled = self.sink._throttle_mail()  # counts every MAIL
        if faults.mail_reply is not None:
            return faults.mail_reply
        if throttled:
            self.sink._injected(
                SmtpFaultEvent(
                    SmtpFault.THROTTLE, "MAIL", mail_from=address, rcpt_tos=(), data=None
                )
            )
            if faults.throttle_close:
                await server.push(REPLY_RATE_CLOSE)
                await server.hang_up()
            return REPLY_THROTTLE
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: _FaultySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address.casefold() in self.sink.faults.reject:
            self.sink._injected(server._event(SmtpFault.REJECT, "RCPT", rcpt_tos=[address]))
            return self.sink.faults.reject_reply.format(address=address)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: _FaultySMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content
        assert isinstance(data, bytes)
        kind, chosen_randomly = server.pending
        server.pending = (None, False)
        await self.sink._before_reply(server, "MESSAGE")
        faults = self.sink.faults
        if 0 < server.ordinal <= len(faults.verdict_delays):
            await asyncio.sleep(faults.verdict_delays[server.ordinal - 1])
        if faults.stall_seconds is not None and faults.stall_on == "data":
            self.sink._injected(server._event(SmtpFault.STALL, "DATA"))
            await _stall(faults.stall_seconds)
        if kind in (SmtpFault.TEMPFAIL, SmtpFault.REJECT_5XX):
            self.sink._injected(server._event(kind, "DATA", data, chosen_randomly=chosen_randomly))
            return REPLY_TEMPFAIL if kind is SmtpFault.TEMPFAIL else REPLY_REJECT_5XX
        received = Received(
            mail_from=envelope.mail_from or "", rcpt_tos=list(envelope.rcpt_tos), data=data
        )
        server.accepted_here += 1
        if kind is SmtpFault.DROP_AFTER_DATA:
            event = server._event(kind, "DATA", data, chosen_randomly=chosen_randomly)
            self.sink._record_ambiguous(received, event)
            await server.hang_up()
        self.sink._record(received)
        return "250 OK"


class _FaultyController(_SinkController):
    handler_class = _FaultyHandler
    protocol_class = _FaultySMTP


class FaultySmtp(SmtpSink):
    """`SmtpSink` that misbehaves as its `faults` say; `faults` can be replaced at any time.

    Everything the sink offers still works (`messages`/`accepted`, `wait_for`, `wait_idle`,
    `connections_opened`, `connections_open`, `quit_count`, `parsed()`, TLS and AUTH). On top:
    `ambiguous`, `counts` (faults injected, by kind), `events` (each injected fault) and
    `configure(**changes)`.
    """

    def __init__(
        self,
        faults: SmtpFaults | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        auth: tuple[str, str] | None = None,
        data_size_limit: int = 64 * 1024 * 1024,
    ) -> None:
        super().__init__(tls=tls, auth=auth, data_size_limit=data_size_limit)
        self._faults = SmtpFaults()
        self._rng = random.Random(0)
        self._data_seq = 0
        self._mail_seq = 0
        self._ambiguous: list[Received] = []
        self._events: list[SmtpFaultEvent] = []
        self._counts: Counter[SmtpFault] = Counter()
        self.faults = faults or SmtpFaults()

    # -- configuration (any thread)

    @property
    def faults(self) -> SmtpFaults:
        with self._cond:
            return self._faults

    @faults.setter
    def faults(self, faults: SmtpFaults) -> None:
        """Install new faults: restarts the k-th counters and reseeds the random mode."""
        with self._cond:
            self._faults = faults
            self._rng = random.Random(faults.rng_seed)
            self._data_seq = 0
            self._mail_seq = 0

    def configure(self, **changes: Any) -> SmtpFaults:
        """`faults = replace(faults, **changes)`; returns the new value."""
        with self._cond:
            self.faults = replace(self._faults, **changes)
            return self._faults

    # -- decisions and records (server thread)

    def _decide_data(self) -> tuple[SmtpFault | None, bool]:
        """The fault, if any, for the next message whose DATA starts; (kind, chosen at random)."""
        with self._cond:
            faults = self._faults
            self._data_seq += 1
            n = self._data_seq
            drawn: SmtpFault | None = None
            if faults.random_mode:  # draw for every message, so the sequence stays seeded
                r = self._rng.random()
                edge = 0.0
                for kind, p in faults._probabilities():
                    edge += p
                    if r < edge:
                        drawn = kind
                        break
            for kind, every in (
                (SmtpFault.DROP_IN_DATA, faults.drop_in_data_every),
                (SmtpFault.TEMPFAIL, faults.tempfail_every),
                (SmtpFault.DROP_AFTER_DATA, faults.drop_after_data_every),
            ):
                if every is not None and n % every == 0:
                    return kind, False
            return drawn, drawn is not None

    @property
    def mail_commands(self) -> int:
        """MAIL commands received since the faults were last installed."""
        with self._cond:
            return self._mail_seq

    def _data_ordinal(self) -> int:
        with self._cond:
            return self._data_seq

    def _throttle_mail(self) -> bool:
        with self._cond:
            burst = self._faults.throttle_burst
            self._mail_seq += 1
            if burst is None:
                return False
            every, length = burst
            return (self._mail_seq - 1) % (every + length) >= every

    async def _before_reply(self, server: _FaultySMTP, command: str) -> None:
        """The slow or silent server: wait before answering `command`, or never answer."""
        with self._cond:
            faults = self._faults
            jitter = self._rng.uniform(0, faults.reply_jitter) if faults.reply_jitter else 0.0
        if command in faults.never_answer:
            self._injected(server._event(SmtpFault.SILENT, command))
            await _stall(math.inf)
        if "*" in faults.delay_on or command in faults.delay_on:
            delay = faults.reply_delay + jitter
            if delay:
                await asyncio.sleep(delay)

    def _injected(self, event: SmtpFaultEvent) -> None:
        with self._cond:
            self._events.append(event)
            self._counts[event.kind] += 1
            self._cond.notify_all()

    def _record_ambiguous(self, message: Received, event: SmtpFaultEvent) -> None:
        with self._cond:
            self._messages.append(message)
            self._ambiguous.append(message)
            self._events.append(event)
            self._counts[event.kind] += 1
            self._cond.notify_all()

    # -- observations (any thread)

    @property
    def accepted(self) -> list[Received]:
        """Every message the server took responsibility for, including `ambiguous` ones."""
        return self.messages

    @property
    def ambiguous(self) -> list[Received]:
        """Accepted messages whose 250 was never sent (the connection was closed instead)."""
        with self._cond:
            return list(self._ambiguous)

    @property
    def counts(self) -> Counter[SmtpFault]:
        """Faults injected since start/clear(), by kind (a Counter: missing kinds are 0)."""
        with self._cond:
            return Counter(self._counts)

    @property
    def events(self) -> list[SmtpFaultEvent]:
        with self._cond:
            return list(self._events)

    def wait_for_fault(self, kind: SmtpFault | str, count: int = 1, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._counts[SmtpFault(kind)] >= count, timeout):
                raise TimeoutError(
                    f"expected {count} {kind} fault(s) within {timeout}s, "
                    f"got {self._counts[SmtpFault(kind)]}"
                )

    def wait_idle_async(self, timeout: float = 10.0) -> Awaitable[None]:
        """`await server.wait_idle_async()` in async tests: a blocking wait_idle() there would
        keep the client's socket open (asyncio closes a transport in a later loop iteration)."""
        return asyncio.to_thread(self.wait_idle, timeout)

    def wait_for_async(self, count: int, timeout: float = 10.0) -> Awaitable[list[Received]]:
        return asyncio.to_thread(self.wait_for, count, timeout)

    def clear(self) -> None:
        """Forget messages, faults seen and counters (the configured faults stay)."""
        super().clear()
        with self._cond:
            self._ambiguous.clear()
            self._events.clear()
            self._counts.clear()

    # -- lifecycle

    _controller_class = _FaultyController
    _server_hostname = "faulty.test"

    def start(self) -> None:
        # The controller's readiness probe must meet a healthy server (no stall, no 421).
        wanted, self.faults = self.faults, SmtpFaults()
        super().start()
        self.clear()
        self.faults = wanted


# --------------------------------------------------------------------------- S3 proxy


class S3Action(enum.StrEnum):
    """What an `S3Rule` does to a request it fires on."""

    INTERNAL_ERROR = "internal_error"  # answer 500 InternalError (S3 XML), not forwarded
    SLOW_DOWN = "slow_down"  # answer 503 SlowDown (S3 XML), not forwarded
    DROP = "drop"  # close the connection without any response, not forwarded
    CUT = "cut"  # forward; send the full Content-Length header but only part of the body
    SLOW = "slow"  # forward; trickle the body in small chunks with pauses
    CHUNKED = "chunked"  # forward; relay the body with Transfer-Encoding: chunked, no length
    STALL = "stall"  # take the request, never answer (until the client gives up and closes)


_ERRORS: dict[S3Action, tuple[int, str, str, str]] = {
    S3Action.INTERNAL_ERROR: (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    S3Action.SLOW_DOWN: (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


@dataclass(frozen=True)
class S3Rule:
    """When and how to damage requests through `S3FaultProxy`.

    A request matches when its method is in `methods` (empty = any), `match` (if set) is a
    substring of its URL-decoded path, e.g. "/videos-zip/" for one bucket or a key, and
    `target` (if set) is its `X-Amz-Target` header, the operation of a JSON-protocol call
    such as "DynamoDB_20120810.DeleteItem" or "AmazonSQS.SendMessageBatch". Among the
    matching requests the rule fires on every `every`-th one (counted per rule from 1), or
    with `probability` (one draw from the proxy's seeded RNG per matching request), or on all
    of them if neither is set; and at most `times` times in total.
    """

    action: S3Action
    match: str | None = None
    methods: AbstractSet[str] = frozenset()  # stored as an uppercased frozenset
    every: int | None = None
    probability: float | None = None
    times: int | None = None
    target: str | None = None
    #: CUT: the share of the body sent before the connection is closed (0 = none of it).
    cut_fraction: float = 0.5
    #: SLOW: the body goes out `slow_chunk` bytes at a time, `slow_delay` seconds apart.
    #: CHUNKED: the body goes out in chunks of `slow_chunk` bytes, without pauses.
    slow_chunk: int = 16 * 1024
    slow_delay: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", S3Action(self.action))
        object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))
        if self.every is not None and self.every < 1:
            raise ValueError("every must be >= 1")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        if self.times is not None and self.times < 0:
            raise ValueError("times must be >= 0")
        if not 0.0 <= self.cut_fraction < 1.0:
            raise ValueError("cut_fraction must be within [0, 1)")
        if self.slow_chunk < 1 or self.slow_delay < 0:
            raise ValueError("slow_chunk must be >= 1 and slow_delay >= 0")

    def matches(self, method: str, path: str, target: str | None = None) -> bool:
        if self.methods and method.upper() not in self.methods:
            return False
        if self.target is not None and target != self.target:
            return False
        return self.match is None or self.match in path


@dataclass(frozen=True)
class S3Faults:
    """The proxy's rules, tried in order; the first that fires decides. No rules: passthrough."""

    rules: tuple[S3Rule, ...] = ()
    rng_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))


@dataclass(frozen=True)
class ProxiedRequest:
    """One request the proxy saw, and the fault it injected (None: forwarded intact)."""

    method: str
    path: str
    action: S3Action | None
    target: str | None = None  # the X-Amz-Target header, if any


@dataclass
class _RuleState:
    matched: int = 0
    fired: int = 0


_HEAD_LIMIT = 1024 * 1024
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection"})


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _rebuild_head(start_line: str, headers: list[tuple[str, str]]) -> bytes:
    """The same message head, but one exchange per connection: `Connection: close`."""
    kept = [f"{name}: {value}" for name, value in headers if name.lower() not in _HOP_BY_HOP]
    return ("\r\n".join([start_line, *kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1")


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def s3_error_body(code: str, message: str, resource: str, request_id: str) -> bytes:
    """The XML body S3 sends with an error status."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()


class S3FaultProxy(Service):
    """An HTTP/1.1 proxy on 127.0.0.1 in front of `upstream` (moto) that injects S3 faults.

    One request per connection: `Connection: close` is forced on every request it forwards and
    every response it returns, so clients (botocore, aiohttp) simply open a new connection for
    the next request. Anything can go through it (S3, SQS, DynamoDB...); scope rules with
    `match`/`methods`. It runs its own event loop in its own thread.
    """

    def __init__(
        self, upstream: str, faults: S3Faults | None = None, *, linger: float = 2.0
    ) -> None:
        parts = urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream needs a host and a port: {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.host = LOOPBACK
        self.port = 0
        self.linger = linger
        self._lock = threading.Lock()
        self._faults = S3Faults()
        self._rng = random.Random(0)
        self._states: list[_RuleState] = []
        self._requests: list[ProxiedRequest] = []
        self._counts: Counter[S3Action] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections = Connections()
        self.faults = faults or S3Faults()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- configuration (any thread)

    @property
    def faults(self) -> S3Faults:
        with self._lock:
            return self._faults

    @faults.setter
    def faults(self, faults: S3Faults) -> None:
        """Install new rules: restarts their counters and reseeds the RNG."""
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.rng_seed)
            self._states = [_RuleState() for _ in faults.rules]

    def set_rules(self, *rules: S3Rule, rng_seed: int = 0) -> None:
        self.faults = S3Faults(rules=rules, rng_seed=rng_seed)

    # -- observations (any thread)

    @property
    def requests(self) -> list[ProxiedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def counts(self) -> Counter[S3Action]:
        """Faults injected since start/clear(), by action (missing actions are 0)."""
        with self._lock:
            return Counter(self._counts)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._counts.clear()

    def _decide(self, method: str, path: str, target: str | None = None) -> S3Rule | None:
        with self._lock:
            chosen: S3Rule | None = None
            for rule, state in zip(self._faults.rules, self._states, strict=True):
                if not rule.matches(method, path, target):
                    continue
                state.matched += 1
                if rule.times is not None and state.fired >= rule.times:
                    continue
                if rule.every is not None:
                    fires = state.matched % rule.every == 0
                elif rule.probability is not None:
                    fires = self._rng.random() < rule.probability
                else:
                    fires = True
                if fires:
                    state.fired += 1
                    chosen = rule
                    break
            action = chosen.action if chosen is not None else None
            self._requests.append(ProxiedRequest(method, path, action, target))
            if chosen is not None:
                self._counts[chosen.action] += 1
            return chosen

    # -- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("S3 fault proxy already running")
        loop = asyncio.new_event_loop()
        ready: asyncio.Future[None] = loop.create_future()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(
                        self._connections.track(self._serve), self.host, 0, limit=_HEAD_LIMIT
                    )
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                started.set()
                loop.close()
                return
            ready.set_result(None)
            started.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        started.wait(10.0)
        if failure or not ready.done():
            self._thread.join(10.0)
            self._thread = self._loop = None
            raise RuntimeError("S3 fault proxy did not start") from (
                failure[0] if failure else None
            )

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._connections.close()

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10.0)

    # -- one connection (proxy thread)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            request_line, headers = _parse_head(head)
            method, _, rest = request_line.partition(" ")
            target = rest.rpartition(" ")[0]
            path = unquote(urlsplit(target).path)
            rule = self._decide(method, path, _header(headers, "x-amz-target"))
            if rule is not None and rule.action is S3Action.DROP:
                transport = writer.transport
                if isinstance(transport, asyncio.Transport):
                    transport.abort()  # a reset, not even a FIN-terminated empty response
                return
            if rule is not None and rule.action is S3Action.STALL:
                while await reader.read(64 * 1024):  # until the client closes
                    pass
                return
            if rule is not None and rule.action in _ERRORS:
                await self._answer_error(rule.action, method, path, headers, reader, writer)
                await self._linger(reader, writer)
                return
            up_reader, upstream = await asyncio.open_connection(*self.upstream, limit=_HEAD_LIMIT)
            upstream.write(_rebuild_head(request_line, headers))
            pump = asyncio.create_task(_copy(reader, upstream))
            try:
                await self._relay_response(method, rule, up_reader, writer)
            finally:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await pump
            await self._linger(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            # stop(): end quietly; asyncio's stream callback would log a cancelled task.
            pass
        finally:
            if upstream is not None:
                upstream.close()
            writer.close()

    async def _answer_error(
        self,
        action: S3Action,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        # Read a small request body first: closing with unread data makes the kernel send a
        # reset, and the client may then see that instead of the error. With Expect:
        # 100-continue the client waits for us, and the final status tells it not to send.
        length = _header(headers, "content-length")
        expect = (_header(headers, "expect") or "").lower() == "100-continue"
        if length and length.isdigit() and not expect and int(length) <= 64 * 1024 * 1024:
            with contextlib.suppress(asyncio.IncompleteReadError):
                await reader.readexactly(int(length))
        status, reason, code, message = _ERRORS[action]
        request_id = uuid.uuid4().hex[:16].upper()
        body = b"" if method == "HEAD" else s3_error_body(code, message, path, request_id)
        response = [
            f"HTTP/1.1 {status} {reason}",
            f"x-amz-request-id: {request_id}",
            f"x-amz-id-2: {uuid.uuid4().hex}",
            "Content-Type: application/xml",
            f"Content-Length: {len(body)}",
            f"Date: {formatdate(time.time(), usegmt=True)}",
            "Server: AmazonS3",
            "Connection: close",
        ]
        writer.write(("\r\n".join(response) + "\r\n\r\n").encode() + body)
        await writer.drain()

    async def _relay_response(
        self,
        method: str,
        rule: S3Rule | None,
        up_reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        while True:
            head = await up_reader.readuntil(b"\r\n\r\n")
            status_line, headers = _parse_head(head)
            status = int(status_line.split(" ", 2)[1])
            if 100 <= status < 200:  # 100 Continue: pass it on, the real answer follows
                writer.write(head)
                await writer.drain()
                continue
            break
        length_text = _header(headers, "content-length")
        length: int | None
        if method == "HEAD" or status in (204, 304):
            length = 0
        elif length_text is not None and length_text.isdigit():
            length = int(length_text)
        else:
            length = None  # chunked or close-delimited: everything until upstream closes
        action = rule.action if rule is not None else None
        if action is S3Action.CHUNKED and length:
            assert rule is not None
            kept = [(n, v) for n, v in headers if n.lower() != "content-length"]
            writer.write(_rebuild_head(status_line, [*kept, ("Transfer-Encoding", "chunked")]))
            await _copy_chunked(up_reader, writer, length, rule.slow_chunk)
            return
        writer.write(_rebuild_head(status_line, headers))
        if action is S3Action.CUT:
            assert rule is not None
            await self._send_cut(up_reader, writer, length, rule.cut_fraction)
        elif action is S3Action.SLOW:
            assert rule is not None
            await _copy(up_reader, writer, length, rule.slow_chunk, rule.slow_delay)
        else:
            await _copy(up_reader, writer, length)

    async def _send_cut(
        self,
        up_reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        length: int | None,
        fraction: float,
    ) -> None:
        if length is None:
            chunk = await up_reader.read(64 * 1024)
            send = chunk[: int(len(chunk) * fraction)]
        else:
            wanted = int(length * fraction)
            send = await up_reader.readexactly(wanted) if wanted else b""
        writer.write(send)
        await writer.drain()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then wait briefly for the client to close, so it reads all we sent."""
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
        with contextlib.suppress(TimeoutError, OSError, asyncio.IncompleteReadError):
            async with asyncio.timeout(self.linger):
                while await reader.read(64 * 1024):
                    pass


async def _copy_chunked(
    source: asyncio.StreamReader, sink: asyncio.StreamWriter, length: int, chunk: int
) -> None:
    """Copy `length` bytes as an HTTP/1.1 chunked body of `chunk`-byte chunks."""
    remaining = length
    while remaining > 0:
        data = await source.readexactly(min(chunk, remaining))
        sink.write(b"%x\r\n%s\r\n" % (len(data), data))
        await sink.drain()
        remaining -= len(data)
    sink.write(b"0\r\n\r\n")
    await sink.drain()


async def _copy(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    length: int | None = None,
    chunk: int = 64 * 1024,
    delay: float = 0.0,
) -> None:
    """Copy `length` bytes (None: until EOF), `chunk` at a time, pausing `delay` in between."""
    remaining = length
    while remaining is None or remaining > 0:
        data = await source.read(chunk if remaining is None else min(chunk, remaining))
        if not data:
            if remaining:
                raise asyncio.IncompleteReadError(b"", remaining)
            break
        sink.write(data)
        await sink.drain()
        if remaining is not None:
            remaining -= len(data)
        if delay:
            await asyncio.sleep(delay)
