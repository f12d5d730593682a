"""An SMTP connection after its handshake: pipelined commands and streamed DATA.

aiosmtplib does the fiddly part of a session (connect, EHLO, STARTTLS with
certificate checks, AUTH) and then hands its transport to this protocol.
aiosmtplib reads exactly one reply per command and drops replies nobody waits
for, which rules out PIPELINING (RFC 2920). Here every command written reserves
a slot for its reply, and replies fill the slots in order. So MAIL, RCPT and
DATA go out in one write; the next message's envelope can follow the previous
message's end-of-data before its verdict is back (one round trip per message);
and a caller that stops waiting (cancelled) leaves the connection in sync. The
message body is written in chunks with flow control instead of as one buffer.

Time limits belong to the replies, and each starts on its turn: when the reply
before it has arrived (a command's own write, if nothing was outstanding). So a
message pipelined behind a verdict that takes its full SMTP_DATA_TIMEOUT loses
none of its own SMTP_TIMEOUT, and a reply that is late on its turn fails the
connection, which releases every slot behind it: no wait is ever unbounded.
The slot of a message's verdict is reserved as soon as DATA is accepted, so a
server that answers in the middle of the body (`552 5.3.4` and a hang-up) has
its reply read as that message's verdict, never as a reply to no command.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.errors import SMTPServerDisconnected

from ..errors import AttachmentChanged
from ..mail.mime import StreamedEmail
from .data import DataEncoder

MAX_REPLY_BYTES = 64 * 1024
# Replies are a line or a few (EHLO lists its extensions); more is a broken or hostile server.
MAX_REPLY_LINES = 100
# A reply late on its turn fails its caller; the connection waits this many times its limit
# more for it, so that the commands pipelined behind it can still be answered.
LATE_GRACE = 2


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


# The reply to one command, once it arrives; None when the connection was lost first.
Slot = asyncio.Future[Reply | None]


@dataclass(eq=False)
class _Pending:
    """A command whose reply is due, and how long it may take once its turn comes (None:
    not yet armed, for a verdict whose end of data is still being written)."""

    slot: Slot
    command: str
    limit: float | None
    timer: asyncio.TimerHandle | None = None
    overdue: bool = False


class ProtocolError(Exception):
    """The server's bytes are not SMTP replies; the connection cannot be trusted."""


class RefusedError(Exception):
    """The server answered a command of the transaction with an error.

    `phase` says which ("MAIL", "RCPT", "DATA" or "MESSAGE"): refusals before
    MESSAGE leave the connection in sync after RSET; none of them delivered anything.
    """

    def __init__(self, phase: str, reply: Reply, *, early: bool = False) -> None:
        super().__init__(f"{phase} refused: {reply}")
        self.phase = phase
        self.reply = reply
        # Answered in the middle of the body: the message never ended, the stream is mid-DATA.
        self.early = early


class LostBeforeEnd(ConnectionError):
    """The connection failed before the end-of-data mark was sent: nothing was delivered."""


class LostAfterEnd(ConnectionError):
    """The connection failed after the end-of-data mark was sent: delivery is unknown."""


class AttachmentReadError(Exception):
    """The message's file could not be read: a local problem, not the connection's.

    `spoiled`: part of the message had already been written, so the connection is in
    the middle of DATA and can carry nothing more; otherwise nothing was sent at all.
    """

    def __init__(self, reason: str, *, spoiled: bool) -> None:
        super().__init__(reason)
        self.spoiled = spoiled


class SmtpChannel(asyncio.Protocol):
    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._pending: collections.deque[_Pending] = collections.deque()
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost: Exception | None = None

    @classmethod
    def take_over(cls, smtp: aiosmtplib.SMTP) -> SmtpChannel:
        """Adopt the transport of a connected, authenticated aiosmtplib session."""
        transport = smtp.transport
        if transport is None or transport.is_closing():
            raise SMTPServerDisconnected("connection lost during the handshake")
        channel = cls()
        channel._transport = transport  # type: ignore[assignment]
        transport.set_protocol(channel)
        # aiosmtplib must not touch the transport again (it would close it on GC paths).
        smtp.transport = None
        smtp.protocol = None
        return channel

    # asyncio.Protocol callbacks

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_REPLY_BYTES:
            self._fail(ProtocolError("reply too long"))
            return
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1]).rstrip(b"\r\n")
            del self._buffer[: end + 1]
            if len(line) < 3 or not line[:3].isdigit():
                self._fail(ProtocolError(f"malformed reply line {line[:60]!r}"))
                return
            self._lines.append(line[4:].decode("utf-8", "replace"))
            if len(self._lines) > MAX_REPLY_LINES:
                self._fail(ProtocolError(f"reply of more than {MAX_REPLY_LINES} lines"))
                return
            if line[3:4] != b"-":  # the last line of a (possibly multi-line) reply
                reply = Reply(int(line[:3]), "\n".join(self._lines))
                self._lines = []
                if not self._pending:  # e.g. "421 idle timeout" just before the server hangs up
                    self._fail(ProtocolError(f"reply to no command: {reply}"))
                    return
                pending = self._pending.popleft()
                if pending.timer is not None:
                    pending.timer.cancel()
                if not pending.slot.done():  # a cancelled caller still consumes its reply
                    pending.slot.set_result(reply)
                self._start_turn()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost is None:
            self._lost = exc or SMTPServerDisconnected("connection closed by the server")
        self._transport = None
        self._writable.set()
        self._release_slots()

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # what the pool uses

    @property
    def is_connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    @property
    def outstanding(self) -> int:
        """Commands written whose reply has not arrived (awaited or not)."""
        return len(self._pending)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._release_slots()

    def write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise SMTPServerDisconnected(f"connection lost: {self._lost}")
        self._transport.write(data)

    async def drain(self, limit: float) -> None:
        """Wait until the socket takes more (flow control), at most `limit` seconds."""
        if not self._writable.is_set():  # a timer only when the socket is full: 1 in ~10 chunks
            try:
                async with asyncio.timeout(limit):
                    await self._writable.wait()
            except TimeoutError:
                raise SMTPServerDisconnected(f"the server took no data for {limit:g} s") from None
        if self._lost is not None:
            raise SMTPServerDisconnected(f"connection lost: {self._lost}")

    def send_commands(self, data: bytes, commands: list[tuple[str, float]]) -> list[Slot]:
        """Write one or more commands at once and reserve the slots of their replies, each
        (name, time limit) with its limit counted from its turn."""
        self.write(data)
        return [self.reserve(name, limit) for name, limit in commands]

    def reserve(self, command: str, limit: float | None = None) -> Slot:
        """The slot of the next reply; `limit` None: armed later (`arm`)."""
        slot: Slot = asyncio.get_running_loop().create_future()
        # A late reply fails its slot; retrieved here in case its caller has gone.
        slot.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._pending.append(_Pending(slot, command, limit))
        if len(self._pending) == 1:
            self._start_turn()
        return slot

    def arm(self, slot: Slot, limit: float) -> None:
        """Give a reserved slot its time limit (the verdict's, once the end of data is out)."""
        for pending in self._pending:
            if pending.slot is slot:
                pending.limit = limit
                if pending is self._pending[0]:
                    self._start_turn()
                return

    def _start_turn(self) -> None:
        """The reply at the head is now due: its clock starts."""
        if not self._pending:
            return
        head = self._pending[0]
        if head.limit is not None and head.timer is None:
            head.timer = asyncio.get_running_loop().call_later(head.limit, self._late, head)

    def _late(self, pending: _Pending) -> None:
        """A reply late on its turn fails its caller at once. The connection stays a while
        longer (twice the limit, LATE_GRACE) for the commands pipelined behind it, whose
        turns come when it arrives; after that, it is given up and they are released."""
        if not self._pending or self._pending[0] is not pending or pending.limit is None:
            return
        if not pending.overdue:
            pending.overdue = True
            if not pending.slot.done():
                late = f"no reply to {pending.command} within {pending.limit:g} s"
                pending.slot.set_exception(TimeoutError(late))
            pending.timer = asyncio.get_running_loop().call_later(
                pending.limit * LATE_GRACE, self._late, pending
            )
            return
        waited = pending.limit * (1 + LATE_GRACE)
        self._fail(TimeoutError(f"no reply to {pending.command} within {waited:g} s"))

    async def reply(self, slot: Slot) -> Reply:
        """The reply in `slot`; OSError when the connection was lost first, TimeoutError
        (an OSError) when it was late on its turn."""
        reply = await slot
        if reply is None:
            raise SMTPServerDisconnected(f"connection lost: {self._lost}")
        return reply

    async def command(self, line: str, limit: float) -> Reply:
        name = line.split(" ", 1)[0].split(":", 1)[0].upper()
        (slot,) = self.send_commands(line.encode("ascii") + b"\r\n", [(name, limit)])
        return await self.reply(slot)

    async def noop(self, limit: float) -> bool:
        """True when the server still answers: checked before reusing an idle connection."""
        try:
            return (await self.command("NOOP", limit)).code == 250
        except OSError:
            return False

    async def quit(self, limit: float) -> None:
        try:
            await self.command("QUIT", limit)
        finally:
            self.close()

    async def transmit(
        self,
        email: StreamedEmail,
        *,
        pipelining: bool,
        size: bool,
        chunk_size: int,
        limit: float,
        data_limit: float,
    ) -> Slot:
        """Envelope, then the message streamed from disk, up to its end-of-data mark.

        Returns the slot of the server's verdict without waiting for it, so that on a
        PIPELINING connection the next envelope can go out right behind the end of
        this message (RFC 2920 allows commands after the end of data). Each envelope
        reply may take `limit` from its turn, the socket may refuse data for `limit`
        at most, and the verdict `data_limit` from its turn.
        Raises RefusedError (the server said no before the end of the message, possibly
        in the middle of the body: `early`; nothing delivered), LostBeforeEnd (nothing
        delivered) or AttachmentReadError (the file failed).
        The connection is never closed here: a caller that stops half-way (an error,
        a cancellation) leaves it mid-DATA, and the pool decides what to do with it
        (the verdicts of earlier messages on it are still to be read).
        """
        chunks = email.iter_chunks(chunk_size)
        try:
            # Opens the attachment: fail before the envelope, not inside DATA.
            first = next(chunks)
        except (OSError, AttachmentChanged) as exc:
            raise AttachmentReadError(f"{type(exc).__name__}: {exc}", spoiled=False) from None
        try:
            mail = f"MAIL FROM:<{email.sender}>" + (f" SIZE={email.size}" if size else "")
            envelope = [(mail, "MAIL"), (f"RCPT TO:<{email.recipient}>", "RCPT"), ("DATA", "DATA")]
            try:
                mail_reply, rcpt_reply, data_reply = await self._envelope(
                    envelope, pipelining, limit
                )
                accepted = mail_reply.code == 250 and 200 <= rcpt_reply.code < 300
                if data_reply.code == 354 and not accepted:
                    # Pipelined DATA accepted without a valid envelope: end it with an empty body.
                    await self.reply(self.send_commands(b".\r\n", [("MESSAGE", limit)])[0])
            except OSError as exc:
                raise LostBeforeEnd(str(exc)) from exc
            for phase, reply, ok in (
                ("MAIL", mail_reply, mail_reply.code == 250),
                ("RCPT", rcpt_reply, 200 <= rcpt_reply.code < 300),
                ("DATA", data_reply, data_reply.code == 354),
            ):
                if not ok:
                    raise RefusedError(phase, reply)
            # The verdict's slot, from now on: a reply in the middle of the body is its.
            verdict = self.reserve("MESSAGE")
            encoder = DataEncoder()
            chunk: bytes | None = first
            while chunk is not None:
                try:
                    self.write(encoder.feed(chunk))
                    await self.drain(limit)
                except OSError as exc:
                    self._raise_if_answered_early(verdict)
                    raise LostBeforeEnd(str(exc)) from exc
                self._raise_if_answered_early(verdict)
                try:
                    chunk = next(chunks, None)
                except (OSError, AttachmentChanged) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    raise AttachmentReadError(reason, spoiled=True) from None
            try:
                self.write(encoder.finish())
            except OSError as exc:
                self._raise_if_answered_early(verdict)
                raise LostBeforeEnd(str(exc)) from exc
            self.arm(verdict, data_limit)
            return verdict
        finally:
            chunks.close()

    @staticmethod
    def _raise_if_answered_early(verdict: Slot) -> None:
        """The server answered before the end of the message (`552 5.3.4` mid-body)."""
        if verdict.done() and not verdict.cancelled():
            reply = verdict.result()
            if reply is not None:
                raise RefusedError("MESSAGE", reply, early=True)

    async def verdict(self, slot: Slot) -> Reply:
        """The server's answer to a transmitted message.

        Raises RefusedError("MESSAGE") when it was not accepted, LostAfterEnd when the
        connection failed first, or the reply was late (delivery unknown). A caller
        cancelled here leaves the connection in sync: the reply is still consumed when it
        arrives, and its time limit still runs.
        """
        try:
            final = await self.reply(slot)
        except OSError as exc:
            raise LostAfterEnd(str(exc)) from exc
        if final.code != 250:
            raise RefusedError("MESSAGE", final)
        return final

    async def _envelope(
        self, commands: list[tuple[str, str]], pipelining: bool, limit: float
    ) -> list[Reply]:
        replies: list[Reply] = []
        if pipelining:
            slots = self.send_commands(
                "".join(f"{line}\r\n" for line, _ in commands).encode("ascii"),
                [(name, limit) for _, name in commands],
            )
            try:
                for slot in slots:
                    replies.append(await self.reply(slot))
            except OSError:
                if replies and replies[-1].code >= 400:  # refused, then hung up (e.g. 421)
                    return replies + [replies[-1]] * (len(commands) - len(replies))
                raise
            return replies
        for line, _ in commands:
            reply = await self.command(line, limit)
            replies.append(reply)
            if reply.code >= 400:  # without pipelining, stop at the first refusal
                replies += [reply] * (len(commands) - len(replies))
                break
        return replies

    def _release_slots(self) -> None:
        while self._pending:
            pending = self._pending.popleft()
            if pending.timer is not None:
                pending.timer.cancel()
            if not pending.slot.done():
                pending.slot.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self._lost = exc
        self.close()
