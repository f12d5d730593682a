"""SMTP DATA encoding, chunk by chunk, so the whole message is never held at once.

aiosmtplib's `data()` takes the message as one `bytes` and copies it while fixing
line endings and dot-stuffing. `DataEncoder` does the same transformation
incrementally (byte for byte what aiosmtplib sends); `SmtpChannel.transmit` writes
each encoded chunk once the transport has drained, so a connection holds about
one chunk plus the transport buffer, whatever the attachment's size.
"""

from __future__ import annotations

import re

from ..mail.mime import Base64Lines

# The same rule as aiosmtplib.protocol.LINE_ENDINGS_REGEX: CRLF, bare LF, bare CR.
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")


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
