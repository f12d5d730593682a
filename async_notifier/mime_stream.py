"""Build the email as a stream: small head, attachment from disk, tail.

Holding the whole message in memory (and letting aiosmtplib copy it several
times) would make 32 emails with 20 MiB attachments in flight cost gigabytes.
Here only the small parts are built in memory, by the stdlib email package and
its SMTP policy (so headers, folding, RFC 2047/2231 encoding and part layout
are the stdlib's, not ours: it also refuses CR/LF in header values, a second
line of defence behind `messages`); the attachment is
base64-encoded from the file block by block while the message is sent, and
the total size is known up front for SMTP's SIZE parameter.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import re
import unicodedata
from collections.abc import AsyncGenerator, Generator, Iterator
from dataclasses import dataclass
from email import policy
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import Policy
from email.utils import formatdate
from pathlib import Path, PurePosixPath

from .messages import Notification
from .render import RenderedEmail

SMTP_POLICY = policy.SMTP.clone(max_line_length=78)
_UNSAFE_FILENAME = re.compile(r'[\\/:*?"<>|\x00-\x1f\x7f]+')


class _Subject(str):
    """A Subject the policy emits as is, folded by `email.header.Header`.

    Python 3.11's header folder drops the space before an encoded word in some
    subjects ("de Vídeo da apresentação.mp4 estão" loses a space; CPython
    gh-144156); the older `Header` encoder folds them correctly.
    """

    name = "Subject"

    def fold(self, *, policy: Policy) -> str:
        charset = "us-ascii" if self.isascii() else "utf-8"
        header = Header(str(self), charset, header_name=self.name, maxlinelen=78)
        return f"{self.name}: {header.encode(linesep=policy.linesep)}{policy.linesep}"


def message_id(notification: Notification, domain: str) -> str:
    """Derived from the record's identity, so a redelivered record repeats it."""
    return f"<{notification.identity[:40]}@{domain}>"


def attachment_filename(notification: Notification) -> str:
    """A safe `<video name>.zip`; the key's path never reaches the client."""
    base = notification.file_name or PurePosixPath(notification.key or "").name
    base = unicodedata.normalize("NFC", base or "")
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    stem = " ".join(_UNSAFE_FILENAME.sub("_", stem).split()).strip(" ._")[:100]
    return f"{stem or 'frames'}.zip"


DEFAULT_CHUNK_SIZE = 256 * 1024
# Base64 with the SMTP policy's 78-column limit: 57 raw bytes make one 76-character line
# (what the stdlib's `email.contentmanager` produces), sent with CRLF.
RAW_LINE = 57
B64_LINE = 76
_LINESEP = SMTP_POLICY.linesep.encode("ascii")
ENCODED_LINE = B64_LINE + len(_LINESEP)


class AttachmentChanged(RuntimeError):
    """The file no longer has the size the message was built for; its `size` would be wrong."""


def encoded_length(raw_size: int) -> int:
    """Bytes of `raw_size` bytes as base64 in 76-character CRLF lines, without encoding them."""
    full, rest = divmod(raw_size, RAW_LINE)
    return full * ENCODED_LINE + (4 * -(-rest // 3) + len(_LINESEP) if rest else 0)


def encode_lines(raw: bytes) -> bytes:
    """Base64 in 76-character lines, each ending in CRLF, as the stdlib lays an attachment out."""
    encoded = binascii.b2a_base64(raw, newline=False)
    if not encoded:
        return b""
    lines = [encoded[i : i + B64_LINE] for i in range(0, len(encoded), B64_LINE)]
    return _LINESEP.join(lines) + _LINESEP


@dataclass(frozen=True)
class StreamedEmail:
    """A message as `head` + base64 of `attachment` + `tail`, ready to be sent in chunks.

    Without an attachment `head` is the whole message and `tail` is empty.
    """

    sender: str
    recipient: str
    message_id: str
    head: bytes
    attachment: Path | None
    attachment_size: int
    tail: bytes

    def __post_init__(self) -> None:
        if self.attachment_size < 0 or (self.attachment is None and self.attachment_size):
            raise ValueError("attachment_size must be 0 without an attachment, never negative")

    @property
    def size(self) -> int:
        """Exact length of the message in bytes (before SMTP dot-stuffing), file unread."""
        return len(self.head) + encoded_length(self.attachment_size) + len(self.tail)

    def iter_chunks(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Generator[bytes, None, None]:
        """The message in chunks of at most `chunk_size` bytes; concatenated, it is `size` long.

        The file is opened on the first `next()` (before the head is yielded), so a
        missing attachment fails before anything was sent. It is read in blocks of
        whole 57-byte lines, so every block but the last encodes to complete lines and
        memory stays around a few chunks whatever the file's size.

        Raises `AttachmentChanged` if the file's size differs from `attachment_size`.
        """
        lines = chunk_size // ENCODED_LINE
        if lines < 1:
            raise ValueError(f"chunk_size must be at least {ENCODED_LINE} (one base64 line)")
        return self._generate(chunk_size, lines * RAW_LINE)

    def chunks(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> AsyncGenerator[bytes, None]:
        """`iter_chunks` for `async for`, giving the event loop a turn after every chunk.

        Reads stay synchronous: the file was just written to the Lambda's local temp
        dir, so a block comes from the page cache in tens of microseconds, less than
        a thread hop would cost (and base64 holds the GIL, so a thread would gain
        nothing for the encoding either). The chunk size bounds each step's work.
        """
        return _yielding(self.iter_chunks(chunk_size))

    def _generate(self, chunk_size: int, block_size: int) -> Generator[bytes, None, None]:
        if self.attachment is None:
            yield from _pieces(self.head, chunk_size)
            yield from _pieces(self.tail, chunk_size)
            return
        with self.attachment.open("rb") as file:
            yield from _pieces(self.head, chunk_size)
            remaining = self.attachment_size
            while remaining:
                wanted = min(block_size, remaining)
                # BufferedReader.read(n) only returns short at end of file.
                block = file.read(wanted)
                if len(block) != wanted:
                    raise AttachmentChanged(
                        f"{self.attachment} shrank below {self.attachment_size} bytes"
                    )
                remaining -= wanted
                yield encode_lines(block)
            if file.read(1):
                raise AttachmentChanged(f"{self.attachment} grew past {self.attachment_size} bytes")
        yield from _pieces(self.tail, chunk_size)


def build_streamed_email(
    notification: Notification,
    rendered: RenderedEmail,
    *,
    sender: Address,
    attachment: Path | None = None,
    attachment_name: str | None = None,
) -> StreamedEmail:
    """What `mailer.build_email` builds for the same inputs, with the ZIP left on disk.

    The stdlib builds the message with an empty attachment part: that yields the
    part's headers (filename encoded per RFC 2231 when non-ASCII) and an empty body
    followed by the closing boundary, and the base64 body slots in just before that
    boundary. Base64 lines never start with "--", so the boundary the stdlib chose
    cannot collide with the attachment it did not see.
    """
    if notification.email is None:
        raise ValueError("the recipient's address has not been looked up")
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = sender
    msg["To"] = Address(display_name=notification.name or "", addr_spec=notification.email)
    msg["Subject"] = _Subject(rendered.subject)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = mid = message_id(notification, sender.domain or "localhost")
    msg["X-Video-Id"] = notification.video_id
    msg.set_content(rendered.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8", cte="quoted-printable")
    size = 0
    if attachment is not None:
        size = attachment.stat().st_size
        msg.add_attachment(
            b"",
            maintype="application",
            subtype="zip",
            filename=attachment_name or attachment_filename(notification),
        )
    # Set last, as mailer does: turning the message multipart moves Content-* headers down.
    msg["Content-Language"] = rendered.locale
    data = msg.as_bytes(policy=SMTP_POLICY)
    head, tail = data, b""
    if attachment is not None:
        boundary = msg.get_boundary()  # set by the generator while flattening
        tail = _LINESEP + f"--{boundary}--".encode("ascii") + _LINESEP
        if boundary is None or not data.endswith(tail):
            raise RuntimeError("unexpected MIME layout from the email package: cannot stream")
        head = data[: -len(tail)]
    return StreamedEmail(
        sender=sender.addr_spec,
        recipient=notification.email,
        message_id=mid,
        head=head,
        attachment=attachment,
        attachment_size=size,
        tail=tail,
    )


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    """`data` in slices of at most `size` bytes, so no chunk exceeds the caller's bound."""
    if len(data) <= size:
        if data:
            yield data
        return
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _yielding(chunks: Generator[bytes, None, None]) -> AsyncGenerator[bytes, None]:
    # closing(): the file is closed as soon as the consumer stops, not when GC runs.
    with contextlib.closing(chunks):
        for chunk in chunks:
            yield chunk
            await asyncio.sleep(0)
