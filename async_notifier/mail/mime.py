"""Build the email as a stream: small head, attachment from disk, tail.

Holding the whole message in memory (and letting aiosmtplib copy it several
times) would make 32 emails with 20 MiB attachments in flight cost gigabytes.
Here only the small parts are built in memory. `build_streamed_email` writes the
stdlib email package's layout (SMTP policy) with string formatting and asks the
stdlib to fold and encode every header that is not plain ASCII fitting a line
(RFC 2047/2231 encoding stays the stdlib's, which also refuses CR/LF in header
values, a second line of defence behind `messages`) and to quoted-printable-encode
the bodies; the tests hold it, byte for byte, to a build done entirely by the
stdlib (`tests/mail/test_mime.py`). The attachment is
base64-encoded from the file block by block while the message is sent, and
the total size is known up front for SMTP's SIZE parameter.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import random
import re
import struct
import sys
import unicodedata
from collections.abc import AsyncGenerator, Generator, Iterator
from dataclasses import dataclass
from email import policy, quoprimime
from email.header import Header
from email.headerregistry import Address
from email.policy import Policy
from email.utils import formatdate, quote
from pathlib import Path, PurePosixPath

from ..delivery_status import TRACKING_ID_LENGTH, TRACKING_TAG
from ..errors import AttachmentChanged
from ..messages import Notification
from .render import RenderedEmail

_MAX_LINE = 78
SMTP_POLICY = policy.SMTP.clone(max_line_length=_MAX_LINE)
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
    return f"<{notification.identity[:TRACKING_ID_LENGTH]}@{domain}>"


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


def encoded_length(raw_size: int) -> int:
    """Bytes of `raw_size` bytes as base64 in 76-character CRLF lines, without encoding them."""
    full, rest = divmod(raw_size, RAW_LINE)
    return full * ENCODED_LINE + (4 * -(-rest // 3) + len(_LINESEP) if rest else 0)


class Base64Lines(bytes):
    """Base64 in 76-character CRLF lines: no line starts with "." and no CR or LF is bare.

    The marker lets `smtp_stream.DataEncoder` pass such a chunk through without scanning
    it for dot-stuffing and line endings (it can never need either).
    """

    __slots__ = ()


@functools.lru_cache(maxsize=8)
def _line_splitter(lines: int) -> struct.Struct:
    # One C call cuts the encoded block into its 76-character lines (a list comprehension
    # of slices cost more than the base64 encoding itself).
    return struct.Struct(f"{B64_LINE}s" * lines)


def encode_lines(raw: bytes) -> Base64Lines:
    """Base64 in 76-character lines, each ending in CRLF, as the stdlib lays an attachment out."""
    encoded = binascii.b2a_base64(raw, newline=False)
    if not encoded:
        return Base64Lines()
    full, rest = divmod(len(encoded), B64_LINE)
    lines = _line_splitter(full).unpack_from(encoded) if full else ()
    if rest:
        lines += (encoded[full * B64_LINE :],)
    return Base64Lines(_LINESEP.join((*lines, b"")))


# SES's rules for a message tag's value (API reference, MessageTag): ASCII letters, digits,
# "_" and "-", at most 256 characters.
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
TAG_VALUE_MAX = 256


def tag_value(value: str) -> str:
    """`value` as SES takes it for a message tag: each other character becomes "_", cut at
    256 characters; never empty (SES requires a value)."""
    return _TAG_UNSAFE.sub("_", value)[:TAG_VALUE_MAX] or "_"


def message_tags(
    notification: Notification, tracking_id: str | None = None
) -> tuple[tuple[str, str], ...]:
    """The SES message tags of an email: its video, its status, its `tracking_id` (the key
    of its delivery status; `notification.tracking_id` unless the caller took it before a
    Cognito lookup), and the producer's notification id when it has one. SES repeats them
    in every event it publishes (`mail.tags`)."""
    tags = [
        ("video_id", notification.video_id),
        ("status", str(notification.status)),
        (TRACKING_TAG, tracking_id or notification.tracking_id),
    ]
    if notification.notification_id is not None:
        tags.append(("notification_id", notification.notification_id))
    return tuple((name, tag_value(value)) for name, value in tags)


def tags_header(tags: tuple[tuple[str, str], ...]) -> str:
    """`X-SES-MESSAGE-TAGS: name=value, name=value`, the header through which SES's SMTP
    interface takes message tags (the API takes them as `EmailTags`, and then ignores the
    header). Names and values are tag-safe (`tag_value`: letters, digits, "_" and "-"), so
    the line needs no encoding; a long one is folded after its commas only, never inside
    a tag (the stdlib would turn a long value into encoded words SES cannot read)."""
    pairs = [f"{name}={value}" for name, value in tags]
    if any(_TAG_UNSAFE.search(name) or _TAG_UNSAFE.search(value) for name, value in tags):
        raise ValueError("message tags must be tag-safe (see tag_value)")
    line = f"X-SES-MESSAGE-TAGS: {', '.join(pairs)}"
    if len(line) <= _MAX_LINE:
        return f"{line}{_CRLF}"
    return f"X-SES-MESSAGE-TAGS: {f',{_CRLF} '.join(pairs)}{_CRLF}"


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
    #: SES's message tags (name, value), for event publishing and metrics: the API transport
    #: sends them beside the message (`EmailTags`); SMTP carries them in the message's
    #: `X-SES-MESSAGE-TAGS` header. Values are already safe (`tag_value`).
    tags: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.attachment_size < 0 or (self.attachment is None and self.attachment_size):
            raise ValueError("attachment_size must be 0 without an attachment, never negative")

    def as_bytes(self) -> bytes:
        """The whole message at once: for previews and tests (sending streams it)."""
        return b"".join(self.iter_chunks())

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


# --------------------------------------------------------------------------- fast build
# The layout below is what the stdlib's EmailMessage (set_content, add_alternative,
# add_attachment, SMTP policy) produces, written out with string formatting. The stdlib
# still folds and encodes every header whose value is not plain ASCII that fits a line
# (To with a non-ASCII or quoted display name, Subject, a non-ASCII or long filename,
# and anything unusual), and still quoted-printable-encodes the bodies; the tests hold
# the result byte for byte to a build done entirely by the stdlib (the reference in
# tests/mail/test_mime.py).

_CRLF = "\r\n"
# Values the stdlib would emit unchanged: no encoded words, quoting or folding needed.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9]+(?: [A-Za-z0-9]+)*")
_PLAIN_ADDR = re.compile(r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9._-]+")
_PLAIN_SUBJECT = re.compile(r"[\x21-\x3c\x3e-\x7e]+(?: [\x21-\x3c\x3e-\x7e]+)*")  # no "="


def _stdlib_header(name: str, value: object) -> str:
    """One header line (folded, CRLF-terminated) exactly as EmailMessage would emit it."""
    folded: bytes = SMTP_POLICY.fold_binary(*SMTP_POLICY.header_store_parse(name, value))
    return folded.decode("ascii")


def _header(name: str, value: str, plain: re.Pattern[str]) -> str:
    line = f"{name}: {value}{_CRLF}"
    if len(line) - 2 <= _MAX_LINE and plain.fullmatch(value):
        return line
    return _stdlib_header(name, value)


@functools.lru_cache(maxsize=64)
def _from_header(display_name: str, username: str, domain: str) -> str:
    return _stdlib_header("From", Address(display_name, username, domain))


def _address_header(name: str, address: Address) -> str:
    return _stdlib_header(name, address)


def _to_header(display_name: str, addr: str) -> str:
    if not _PLAIN_ADDR.fullmatch(addr):
        return _stdlib_header("To", Address(display_name=display_name, addr_spec=addr))
    if not display_name:
        return _header("To", addr, _PLAIN_ADDR)
    if _PLAIN_NAME.fullmatch(display_name):
        return _header("To", f"{display_name} <{addr}>", _ANY)
    return _stdlib_header("To", Address(display_name=display_name, addr_spec=addr))


def _subject_header(subject: str) -> str:
    line = f"Subject: {subject}{_CRLF}"
    if len(line) - 2 <= _MAX_LINE and _PLAIN_SUBJECT.fullmatch(subject):
        return line
    return _Subject(subject).fold(policy=SMTP_POLICY)


def _date_header() -> str:
    # formatdate's GMT form, as the Date header renders the parsed value ("+0000").
    return f"Date: {formatdate(usegmt=True)[:-3]}+0000{_CRLF}"


def _boundary() -> str:
    """The stdlib's boundary format ("=" * 15 + 19 random digits + "=="), unique per part.

    Quoted-printable writes "=" as "=3D" and base64 has no "-", so neither body can
    contain a line "--" + boundary: the stdlib's check of the text is not needed.
    """
    return f"==============={random.randrange(sys.maxsize):019d}=="


def _qp_body(text: str) -> str:
    # What contentmanager's set_text_content(cte="quoted-printable") stores, with the
    # generator's CRLF line endings.
    lines = text.encode("utf-8").splitlines()
    body = quoprimime.body_encode((b"\n".join(lines) + b"\n").decode("latin-1"), _MAX_LINE)
    return body.replace("\n", _CRLF)


_MIME = f"MIME-Version: 1.0{_CRLF}"
_AUTO_SUBMITTED = f"Auto-Submitted: auto-generated{_CRLF}"
_TEXT_PART = (
    f'Content-Type: text/plain; charset="utf-8"{_CRLF}'
    f"Content-Transfer-Encoding: quoted-printable{_CRLF}{_CRLF}"
)
_HTML_PART = (
    f'Content-Type: text/html; charset="utf-8"{_CRLF}'
    f"Content-Transfer-Encoding: quoted-printable{_CRLF}{_MIME}{_CRLF}"
)


def _alternative_type(boundary: str) -> str:
    return f'Content-Type: multipart/alternative;{_CRLF} boundary="{boundary}"{_CRLF}'


def build_streamed_email(
    notification: Notification,
    rendered: RenderedEmail,
    *,
    sender: Address,
    attachment: Path | None = None,
    attachment_name: str | None = None,
    reply_to: Address | None = None,
    configuration_set: str | None = None,
    tracking_id: str | None = None,
) -> StreamedEmail:
    """What the stdlib email package builds for the same inputs, about 10x faster.

    The ZIP stays on disk: the head ends with the attachment part's headers and the
    tail is the closing boundary, so the base64 body slots in between. Every email says
    it is automatic (`Auto-Submitted: auto-generated`, RFC 3834: auto-responders stay
    quiet); `reply_to` adds Reply-To, `configuration_set` the header SES reads to track
    deliveries, bounces and complaints (`X-SES-CONFIGURATION-SET`). Its SES message tags
    (`message_tags`, with `tracking_id`) travel beside it for the API and in
    `X-SES-MESSAGE-TAGS` for SMTP.
    """
    if notification.email is None:
        raise ValueError("the recipient's address has not been looked up")
    domain = sender.domain or "localhost"
    mid = message_id(notification, domain)
    inner = _boundary()
    outer = _boundary() if attachment is not None else inner
    while outer == inner and attachment is not None:
        outer = _boundary()
    parts = [
        _from_header(sender.display_name, sender.username, sender.domain),
        _to_header(notification.name or "", notification.email),
        _subject_header(rendered.subject),
        _date_header(),
        _header("Message-ID", mid, _MESSAGE_ID),
        _header("X-Video-Id", notification.video_id, _PLAIN_TOKEN),
        _AUTO_SUBMITTED,
    ]
    if reply_to is not None:
        parts.append(_address_header("Reply-To", reply_to))
    if configuration_set is not None:
        parts.append(_header("X-SES-CONFIGURATION-SET", configuration_set, _PLAIN_TOKEN))
    tags = message_tags(notification, tracking_id)
    parts.append(tags_header(tags))
    parts.append(_MIME)
    language = _header("Content-Language", rendered.locale, _PLAIN_TOKEN)
    if attachment is not None:
        parts += [f'Content-Type: multipart/mixed; boundary="{outer}"{_CRLF}', language]
        parts += [_CRLF, f"--{outer}{_CRLF}", _alternative_type(inner), _CRLF]
    else:
        parts += [_alternative_type(inner), language, _CRLF]
    parts += [f"--{inner}{_CRLF}", _TEXT_PART, _qp_body(rendered.text)]
    parts += [f"{_CRLF}--{inner}{_CRLF}", _HTML_PART, _qp_body(rendered.html)]
    parts.append(f"{_CRLF}--{inner}--{_CRLF}")
    size = 0
    tail = b""
    if attachment is not None:
        size = attachment.stat().st_size
        filename = attachment_name or attachment_filename(notification)
        parts += [
            f"{_CRLF}--{outer}{_CRLF}",
            f"Content-Type: application/zip{_CRLF}",
            f"Content-Transfer-Encoding: base64{_CRLF}",
            _header(
                "Content-Disposition", f'attachment; filename="{quote(filename)}"', _DISPOSITION
            ),
            _MIME,
            _CRLF,
        ]
        tail = f"{_CRLF}--{outer}--{_CRLF}".encode("ascii")
    head = "".join(parts).encode("ascii")
    return StreamedEmail(
        sender=sender.addr_spec,
        recipient=notification.email,
        message_id=mid,
        head=head,
        attachment=attachment,
        attachment_size=size,
        tail=tail,
        tags=tags,
    )


_MESSAGE_ID = re.compile(r"<[A-Za-z0-9]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*>")
_DISPOSITION = re.compile(r'attachment; filename="[A-Za-z0-9._-]+(?: [A-Za-z0-9._-]+)*"')
_ANY = re.compile(r".*")


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
