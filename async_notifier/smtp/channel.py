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


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


# The reply to one command, once it arrives; None when the connection was lost first.
Slot = asyncio.Future[Reply | None]


class ProtocolError(Exception):
    """The server's bytes are not SMTP replies; the connection cannot be trusted."""


class RefusedError(Exception):
    """The server answered a command of the transaction with an error.

    `phase` says which ("MAIL", "RCPT", "DATA" or "MESSAGE"): refusals before
    MESSAGE leave the connection in sync after RSET; none of them delivered anything.
    """

    def __init__(self, phase: str, reply: Reply) -> None:
        super().__init__(f"{phase} refused: {reply}")
        self.phase = phase
        self.reply = reply


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
        self._slots: collections.deque[Slot] = collections.deque()
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
                if not self._slots:  # e.g. "421 idle timeout" just before the server hangs up
                    self._fail(ProtocolError(f"reply to no command: {reply}"))
                    return
                slot = self._slots.popleft()
                if not slot.done():  # a cancelled caller still consumes its reply
                    slot.set_result(reply)

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
        return len(self._slots)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._release_slots()

    def write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise SMTPServerDisconnected(f"connection lost: {self._lost}")
        self._transport.write(data)

    async def drain(self) -> None:
        await self._writable.wait()
        if self._lost is not None:
            raise SMTPServerDisconnected(f"connection lost: {self._lost}")

    def send_commands(self, data: bytes, replies: int) -> list[Slot]:
        """Write one or more commands at once and reserve the slots of their replies."""
        self.write(data)
        loop = asyncio.get_running_loop()
        slots = [loop.create_future() for _ in range(replies)]
        self._slots.extend(slots)
        return slots

    async def reply(self, slot: Slot) -> Reply:
        reply = await slot
        if reply is None:
            raise SMTPServerDisconnected(f"connection lost: {self._lost}")
        return reply

    async def command(self, line: str) -> Reply:
        (slot,) = self.send_commands(line.encode("ascii") + b"\r\n", 1)
        return await self.reply(slot)

    async def noop(self) -> bool:
        """True when the server still answers: checked before reusing an idle connection."""
        try:
            return (await self.command("NOOP")).code == 250
        except OSError:
            return False

    async def quit(self) -> None:
        try:
            await self.command("QUIT")
        finally:
            self.close()

    async def transmit(
        self, email: StreamedEmail, *, pipelining: bool, size: bool, chunk_size: int
    ) -> Slot:
        """Envelope, then the message streamed from disk, up to its end-of-data mark.

        Returns the slot of the server's verdict without waiting for it, so that on a
        PIPELINING connection the next envelope can go out right behind the end of
        this message (RFC 2920 allows commands after the end of data).
        Raises RefusedError (server said no before the message; nothing delivered),
        LostBeforeEnd (nothing delivered) or AttachmentReadError (the file failed).
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
            envelope = [mail, f"RCPT TO:<{email.recipient}>", "DATA"]
            try:
                mail_reply, rcpt_reply, data_reply = await self._envelope(envelope, pipelining)
                if data_reply.code == 354 and (mail_reply.code != 250 or rcpt_reply.code >= 300):
                    # Pipelined DATA accepted without a valid envelope: end it with an empty body.
                    await self.reply(self.send_commands(b".\r\n", 1)[0])
            except OSError as exc:
                raise LostBeforeEnd(str(exc)) from exc
            for phase, reply, ok in (
                ("MAIL", mail_reply, mail_reply.code == 250),
                ("RCPT", rcpt_reply, rcpt_reply.code in (250, 251)),
                ("DATA", data_reply, data_reply.code == 354),
            ):
                if not ok:
                    raise RefusedError(phase, reply)
            encoder = DataEncoder()
            chunk: bytes | None = first
            while chunk is not None:
                try:
                    self.write(encoder.feed(chunk))
                    await self.drain()
                except OSError as exc:
                    raise LostBeforeEnd(str(exc)) from exc
                try:
                    chunk = next(chunks, None)
                except (OSError, AttachmentChanged) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    raise AttachmentReadError(reason, spoiled=True) from None
            try:
                return self.send_commands(encoder.finish(), 1)[0]
            except OSError as exc:
                raise LostBeforeEnd(str(exc)) from exc
        finally:
            chunks.close()

    async def verdict(self, slot: Slot) -> Reply:
        """The server's answer to a transmitted message.

        Raises RefusedError("MESSAGE") when it was not accepted, LostAfterEnd when the
        connection failed first (delivery unknown). A caller cancelled here leaves the
        connection in sync: the reply is still consumed when it arrives.
        """
        try:
            final = await self.reply(slot)
        except OSError as exc:
            raise LostAfterEnd(str(exc)) from exc
        if final.code != 250:
            raise RefusedError("MESSAGE", final)
        return final

    async def _envelope(self, commands: list[str], pipelining: bool) -> list[Reply]:
        replies: list[Reply] = []
        if pipelining:
            slots = self.send_commands(
                "".join(f"{c}\r\n" for c in commands).encode("ascii"), len(commands)
            )
            try:
                for slot in slots:
                    replies.append(await self.reply(slot))
            except OSError:
                if replies and replies[-1].code >= 400:  # refused, then hung up (e.g. 421)
                    return replies + [replies[-1]] * (len(commands) - len(replies))
                raise
            return replies
        for command in commands:
            reply = await self.command(command)
            replies.append(reply)
            if reply.code >= 400:  # without pipelining, stop at the first refusal
                replies += [reply] * (len(commands) - len(replies))
                break
        return replies

    def _release_slots(self) -> None:
        while self._slots:
            slot = self._slots.popleft()
            if not slot.done():
                slot.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self._lost = exc
        self.close()
