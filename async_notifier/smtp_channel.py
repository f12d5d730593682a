"""An SMTP connection after its handshake: pipelined commands and streamed DATA.

aiosmtplib does the fiddly part of a session (connect, EHLO, STARTTLS with
certificate checks, AUTH) and then hands its transport to this protocol.
aiosmtplib reads exactly one reply per command and drops replies nobody waits
for, which rules out PIPELINING (RFC 2920); here every reply is queued, so
MAIL, RCPT and DATA go out in one write and cost one round trip, and the
message body is written in chunks with flow control instead of as one buffer.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.errors import SMTPServerDisconnected

from .mime_stream import StreamedEmail
from .smtp_stream import DataEncoder

MAX_REPLY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


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


class SmtpChannel(asyncio.Protocol):
    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[str] = []
        self._replies: collections.deque[Reply] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost: Exception | None = None
        self.end_sent = False  # the end-of-data mark of the current message went out

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
            if line[3:4] != b"-":  # the last line of a (possibly multi-line) reply
                self._replies.append(Reply(int(line[:3]), "\n".join(self._lines)))
                self._lines = []
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or SMTPServerDisconnected("connection closed by the server")
        self._transport = None
        self._writable.set()
        self._wake()

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

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise SMTPServerDisconnected(f"connection lost: {self._lost}")
        self._transport.write(data)

    async def drain(self) -> None:
        await self._writable.wait()
        if self._lost is not None:
            raise SMTPServerDisconnected(f"connection lost: {self._lost}")

    async def reply(self) -> Reply:
        while not self._replies:
            if self._lost is not None:
                raise SMTPServerDisconnected(f"connection lost: {self._lost}")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._replies.popleft()

    async def command(self, line: str) -> Reply:
        self.write(line.encode("ascii") + b"\r\n")
        return await self.reply()

    async def noop(self) -> bool:
        """True when the server still answers: checked before reusing an idle connection."""
        try:
            return (await self.command("NOOP")).code == 250
        except (OSError, ProtocolError):
            return False

    async def quit(self) -> None:
        try:
            await self.command("QUIT")
        finally:
            self.close()

    async def send(
        self, email: StreamedEmail, *, pipelining: bool, size: bool, chunk_size: int
    ) -> Reply:
        """One transaction: envelope, then the message streamed from disk.

        Raises RefusedError (server said no; nothing delivered), LostBeforeEnd
        (nothing delivered), LostAfterEnd (delivery unknown), or OSError when the
        attachment cannot be read (before anything was sent).
        """
        self.end_sent = False
        chunks = email.iter_chunks(chunk_size)
        first = next(chunks)  # opens the attachment: fail before the envelope, not inside DATA
        try:
            mail = f"MAIL FROM:<{email.sender}>" + (f" SIZE={email.size}" if size else "")
            envelope = [mail, f"RCPT TO:<{email.recipient}>", "DATA"]
            try:
                replies = await self._envelope(envelope, pipelining)
            except (OSError, ProtocolError) as exc:
                raise LostBeforeEnd(str(exc)) from exc
            mail_reply, rcpt_reply, data_reply = replies
            if data_reply.code == 354 and (mail_reply.code != 250 or rcpt_reply.code >= 300):
                # Pipelined DATA accepted without a valid envelope: end it with an empty body.
                self.write(b".\r\n")
                await self.reply()
            for phase, reply, ok in (
                ("MAIL", mail_reply, mail_reply.code == 250),
                ("RCPT", rcpt_reply, rcpt_reply.code in (250, 251)),
                ("DATA", data_reply, data_reply.code == 354),
            ):
                if not ok:
                    raise RefusedError(phase, reply)
            encoder = DataEncoder()
            try:
                self.write(encoder.feed(first))
                for chunk in chunks:
                    await self.drain()
                    self.write(encoder.feed(chunk))
                await self.drain()
                self.write(encoder.finish())
                self.end_sent = True
            except (OSError, ProtocolError) as exc:
                self.close()  # the server holds a partial message it will discard
                raise LostBeforeEnd(str(exc)) from exc
            except BaseException:
                self.close()
                raise
            try:
                final = await self.reply()
            except (OSError, ProtocolError) as exc:
                self.close()
                raise LostAfterEnd(str(exc)) from exc
            except BaseException:
                self.close()  # cancelled while the server decides: never reuse this connection
                raise
            if final.code != 250:
                raise RefusedError("MESSAGE", final)
            return final
        finally:
            chunks.close()

    async def _envelope(self, commands: list[str], pipelining: bool) -> list[Reply]:
        replies: list[Reply] = []
        if pipelining:
            self.write("".join(f"{c}\r\n" for c in commands).encode("ascii"))
            try:
                for _ in commands:
                    replies.append(await self.reply())
            except (OSError, ProtocolError):
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

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self._lost = exc
        self.close()
        self._wake()
