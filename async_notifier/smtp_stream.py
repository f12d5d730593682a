"""Send a `StreamedEmail` as SMTP DATA chunk by chunk, never holding the whole message.

aiosmtplib's `data()` takes the message as one `bytes` and copies it while fixing
line endings and dot-stuffing. `DataEncoder` does the same transformation
incrementally (byte for byte what aiosmtplib sends), and `send_streamed_data`
writes each encoded chunk only once the transport has drained below its
high-water mark, so a connection holds about one chunk plus the transport
buffer, whatever the attachment's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

import aiosmtplib
from aiosmtplib import SMTPResponse
from aiosmtplib.errors import SMTPDataError, SMTPServerDisconnected, SMTPTimeoutError
from aiosmtplib.protocol import SMTPProtocol

from .mime_stream import DEFAULT_CHUNK_SIZE, Base64Lines, StreamedEmail

# The same rule as aiosmtplib.protocol.LINE_ENDINGS_REGEX: CRLF, bare LF, bare CR.
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
_START_INPUT = 354
_COMPLETED = 250


class DataEncoder:
    """Incremental SMTP DATA encoding: CRLF line endings, dot-stuffing, final `CRLF.CRLF`.

    For any split of a message into chunks, `feed()` outputs plus `finish()` equal
    what aiosmtplib's `execute_data_command` writes after DATA for the whole
    message: bare LF and bare CR become CRLF, a line starting with "." gets a
    second "." (RFC 5321 §4.5.2), and the end is CRLF "." CRLF (a CRLF added when
    the message lacks one). State carried between chunks: a trailing CR (is it
    half of a CRLF?) and whether the output ends at the start of a line.
    """

    def __init__(self) -> None:
        self._held_cr = False
        self._ends_crlf = False
        self._line_start = True
        self._finished = False

    def feed(self, chunk: bytes) -> bytes:
        """Encode `chunk`; may hold back one trailing CR until the next byte is known."""
        if self._finished:
            raise RuntimeError("DataEncoder.feed() after finish()")
        if type(chunk) is Base64Lines and self._line_start and not self._held_cr:
            # Whole base64 lines ending in CRLF: nothing to stuff or fix (no line starts
            # with "." and there is no bare CR or LF), so skip the four scans below.
            if chunk:
                self._ends_crlf = True
            return chunk
        data = b"\r" + chunk if self._held_cr else chunk
        self._held_cr = data.endswith(b"\r")
        if self._held_cr:
            data = data[:-1]
        if not data:
            return b""
        # Fast path: base64 lines are already CRLF-only, so skip the regex (~3x slower)
        # when every CR and every LF belongs to a CRLF.
        crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
            data = _LINE_ENDINGS.sub(b"\r\n", data)
        data = data.replace(b"\n.", b"\n..")
        if self._line_start and data.startswith(b"."):
            data = b"." + data
        self._ends_crlf = self._line_start = data.endswith(b"\n")
        return data

    def finish(self) -> bytes:
        """The end of DATA: a held CR as CRLF, a CRLF if the message lacked one, then ".CRLF"."""
        if self._finished:
            raise RuntimeError("DataEncoder.finish() called twice")
        self._finished = True
        if self._held_cr or not self._ends_crlf:
            return b"\r\n.\r\n"
        return b".\r\n"


async def send_streamed_data(
    smtp: aiosmtplib.SMTP,
    email: StreamedEmail,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    timeout: float | None,  # noqa: ASYNC109 - per step; asyncio.timeout would bound the total
) -> SMTPResponse:
    """Send DATA with `email` streamed from disk; call after MAIL and RCPT were accepted.

    `timeout` bounds each wait (the 354 reply, each drain of the socket, the final
    reply), like aiosmtplib's per-command timeout: a stalled peer is caught, a large
    message on a slow but moving link is not cut off. The protocol's command lock is
    held throughout, so no other command on this connection can land inside the data.

    Raises:
        OSError (e.g. FileNotFoundError) before DATA is sent: the attachment cannot be
            opened. The connection is untouched and usable; RSET the envelope.
        SMTPDataError: the server replied to DATA with other than 354, or to the
            message with other than 250. It replied, so the session is in sync and the
            connection usable, except after a 421 (the server is closing it).
        Anything else once DATA was written: SMTPServerDisconnected, SMTPTimeoutError
            (SMTPReadTimeoutError for a reply), AttachmentChanged or OSError from the
            file, CancelledError. The server is mid-message and cannot be resynced, so
            the connection is closed here (`smtp.is_connected` is False) and must be
            replaced. A failure before the final "." was written makes the server drop
            the partial message; one while awaiting the final reply leaves delivery unknown.
    """
    protocol = smtp.protocol
    # aiosmtplib has no public API for streaming DATA, so this uses SMTPProtocol's
    # internals (checked against aiosmtplib 5.1.3; the end-to-end tests break if they move):
    # _command_lock serialises commands, _response_pending must be set before the
    # reply can arrive or data_received() drops it, _drain_helper() is StreamWriter.drain().
    lock = protocol._command_lock if protocol is not None else None
    if protocol is None or lock is None or not smtp.is_connected:
        raise SMTPServerDisconnected("Server not connected")
    encoder = DataEncoder()
    async with contextlib.aclosing(email.chunks(chunk_size)) as chunks:
        first = await anext(chunks)  # opens the attachment: fail before DATA, not inside it
        async with lock:
            try:
                protocol._response_pending = True
                protocol.write(b"DATA\r\n")
                reply = await protocol.read_response(timeout=timeout)
                if reply.code != _START_INPUT:
                    raise SMTPDataError(reply.code, reply.message)
                # Armed for the final reply now: it can arrive while a drain is awaited (or
                # early, e.g. 552), and data_received() drops replies nobody armed for.
                protocol._response_pending = True
                await _write(protocol, encoder.feed(first), timeout)
                async for chunk in chunks:
                    await _write(protocol, encoder.feed(chunk), timeout)
                await _write(protocol, encoder.finish(), timeout)
                reply = await protocol.read_response(timeout=timeout)
            except SMTPDataError:
                raise
            except BaseException:
                smtp.close()
                raise
    if reply.code != _COMPLETED:
        raise SMTPDataError(reply.code, reply.message)
    return reply


async def _write(protocol: SMTPProtocol, data: bytes, limit: float | None) -> None:
    """Write, then wait until the transport's buffer is below its high-water mark."""
    if not data:
        return
    protocol.write(data)  # SMTPServerDisconnected when the transport is gone
    try:
        async with asyncio.timeout(limit):
            await protocol._drain_helper()
    except TimeoutError:
        raise SMTPTimeoutError("Timed out sending message data") from None
    except OSError as exc:  # ConnectionResetError from drain, or the socket's error
        raise SMTPServerDisconnected(f"Connection lost: {exc}") from exc
