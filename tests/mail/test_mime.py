"""The streamed message equals the stdlib's build, and streams through real SMTP unchanged.

References are the real thing, never a re-implementation: the build entirely by the stdlib
email package (`build_streamed_email_stdlib`, which the fast builder must match), a
mail client's parse, aiosmtplib's own DATA encoding, and a real aiosmtpd server.
"""

from __future__ import annotations

import asyncio
import binascii
import email
import email.policy
import hashlib
import itertools
import json
import random
import re
import tracemalloc
from collections.abc import Iterable, Iterator
from dataclasses import replace
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtplib.errors import SMTPServerDisconnected
from aiosmtplib.protocol import SMTPProtocol
from servers import LOOPBACK, SmtpSink

from async_notifier.config import DEFAULT_TEMPLATES_DIR
from async_notifier.errors import AttachmentChanged
from async_notifier.mail.mime import (
    _LINESEP,
    SMTP_POLICY,
    Base64Lines,
    StreamedEmail,
    _Subject,
    attachment_filename,
    build_streamed_email,
    encode_lines,
    encoded_length,
    message_id,
)
from async_notifier.mail.render import RenderedEmail, Renderer
from async_notifier.messages import Notification, parse_body
from async_notifier.smtp.channel import AttachmentReadError, RefusedError, Reply, SmtpChannel
from async_notifier.smtp.data import DataEncoder

SENDER = Address(display_name="Async Notifier", username="no-reply", domain="example.com")
MiB = 1024 * 1024


def build_streamed_email_stdlib(
    notification: Notification,
    rendered: RenderedEmail,
    *,
    sender: Address,
    attachment: Path | None = None,
    attachment_name: str | None = None,
) -> StreamedEmail:
    """The reference: the whole build by the stdlib email package (~1.5 ms a message).

    `build_streamed_email` must produce the same bytes (Date and boundaries aside);
    the tests hold it to that. The stdlib builds the message with an empty attachment
    part: that yields the part's headers (filename encoded per RFC 2231 when non-ASCII)
    and an empty body followed by the closing boundary, and the base64 body slots in
    just before that boundary. Base64 lines never start with "--", so the boundary the
    stdlib chose cannot collide with the attachment it did not see.
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
    # Set last, as the builder does: turning the message multipart moves Content-* headers down.
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


SIZES = [0, 1, 56, 57, 58, 114, MiB + 1]
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(DEFAULT_TEMPLATES_DIR)


def notification(**fields: Any) -> Notification:
    data: dict[str, Any] = {
        "video_id": "298ce197-3627-4845-83d7-cd6c98a9df8c",
        "status": "COMPLETED",
        "bucket": "videos-zip",
        "key": "298ce197/298ce197.zip",
        "email": "maria@example.com",
        "name": "Maria Conceição",
        "file_name": "férias.mp4",
        "locale": "pt-BR",
    }
    data.update(fields)
    return parse_body(json.dumps({k: v for k, v in data.items() if v is not None}))


def write_file(path: Path, size: int, seed: int = 7) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def both(
    renderer: Renderer,
    n: Notification,
    attachment: Path | None,
    name: str | None = None,
    rendered: RenderedEmail | None = None,
) -> tuple[bytes, StreamedEmail]:
    """The same inputs through the stdlib reference build and `build_streamed_email`."""
    if attachment is not None and name is None:
        name = attachment_filename(n)
    rendered = rendered or renderer.render(n, attachment_name=name)
    kwargs: dict[str, Any] = {"sender": SENDER, "attachment": attachment, "attachment_name": name}
    reference = b"".join(build_streamed_email_stdlib(n, rendered, **kwargs).iter_chunks())
    streamed = build_streamed_email(n, rendered, **kwargs)
    assert normalised(build_streamed_email(n, rendered, **kwargs).as_bytes()) == normalised(
        joined(streamed)
    )
    return reference, streamed


def joined(streamed: StreamedEmail, chunk_size: int = 256 * 1024) -> bytes:
    return b"".join(streamed.iter_chunks(chunk_size))


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, _class=EmailMessage, policy=email.policy.default)


def normalised(data: bytes) -> bytes:
    """Bytes with what legitimately differs between two builds made fixed: Date, boundaries."""
    data = re.sub(rb"^Date: [^\r\n]*\r\n", b"Date: <fixed>\r\n", data, count=1, flags=re.M)
    for index, boundary in enumerate(dict.fromkeys(re.findall(rb'boundary="([^"]+)"', data))):
        data = data.replace(boundary, b"BOUNDARY-%d" % index)
    return data


def structure(message: EmailMessage) -> list[tuple[Any, ...]]:
    """Each part as a mail client sees it: headers (no Date, no boundary), type, decoded body."""
    parts: list[tuple[Any, ...]] = []
    for part in message.walk():
        assert isinstance(part, EmailMessage)
        headers = [
            (key, re.sub(r'boundary="[^"]*"', "boundary=*", str(value)))
            for key, value in part.items()
            if key.lower() != "date"
        ]
        body = None if part.is_multipart() else part.get_content()
        parts.append((part.get_content_type(), part.get_filename(), headers, body))
    return parts


def attachment_chunks(streamed: StreamedEmail, chunk_size: int) -> Iterator[bytes]:
    """The chunks carrying the base64 body (head and tail pieces left out, by offset)."""
    start, end = len(streamed.head), len(streamed.head) + encoded_length(streamed.attachment_size)
    offset = 0
    for chunk in streamed.iter_chunks(chunk_size):
        if start <= offset < end:
            assert offset + len(chunk) <= end  # never mixed with head or tail
            yield chunk
        offset += len(chunk)


def assert_no_defects(message: EmailMessage) -> None:
    for part in message.walk():
        assert part.defects == [], (part.get_content_type(), part.defects)


# --------------------------------------------------------------------------- building


@pytest.mark.parametrize("size", SIZES)
def test_stream_equals_the_stdlib_build(renderer: Renderer, tmp_path: Path, size: int) -> None:
    path = write_file(tmp_path / "frames.zip", size, seed=size)
    stdlib, streamed = both(renderer, notification(), path)
    data = joined(streamed)

    assert streamed.size == len(data) == len(stdlib)
    assert normalised(data) == normalised(stdlib)  # byte for byte but Date and boundaries
    parsed = parse(data)
    assert_no_defects(parsed)
    assert structure(parsed) == structure(parse(stdlib))
    assert parsed.get_content_type() == "multipart/mixed"
    attachment = next(parsed.iter_attachments())
    assert isinstance(attachment, EmailMessage)
    assert attachment.get_content_type() == "application/zip"
    assert attachment.get_content() == path.read_bytes()
    assert attachment.get_filename() == "férias.zip"
    assert b"filename*=utf-8''f%C3%A9rias.zip" in streamed.head
    assert streamed.sender == "no-reply@example.com"
    assert streamed.recipient == "maria@example.com"
    assert streamed.message_id == parsed["Message-ID"]


_NAMES = [
    "Maria",
    "João",
    "Ana Luísa",
    "",
    None,
    "O'Brien",
    "Dr. Who",
    "a" * 70,
    "Ana  Maria",
    "José da Silva Conceição Pereira dos Santos Albuquerque",
    '"quoted"',
    "x,y",
    "日本語 名前",
]
_EMAILS = ["maria@example.com", "a.b+c@sub.example.com", "x" * 50 + "@" + "y" * 40 + ".com"]
_FILES = ["férias.mp4", "video 00001.mp4", "a" * 120 + ".mp4", "my;file.mp4", "x'y.mp4", None]
_SENDERS = [SENDER, Address("Notificações", "n", "ex.com.br"), Address("", "x", "d" * 60 + ".com")]


def test_fast_build_matches_the_stdlib_for_odd_headers(renderer: Renderer, tmp_path: Path) -> None:
    """Plain values take the string-formatting path, the rest the stdlib's: same bytes."""
    path = write_file(tmp_path / "a.zip", 200)
    rnd = random.Random(5)
    for _ in range(150):
        n = notification(
            name=rnd.choice(_NAMES),
            email=rnd.choice(_EMAILS),
            file_name=rnd.choice(_FILES),
            locale=rnd.choice(["pt-BR", "en"]),
            video_id=rnd.choice(["298ce197-3627-4845-83d7-cd6c98a9df8c", "v 1", "x" * 80]),
            status=rnd.choice(["COMPLETED", "FAILED"]),
            message="falhou",
        )
        attachment = rnd.choice([path, None])
        name = attachment_filename(n) if attachment else None
        rendered = renderer.render(n, attachment_name=name)
        kwargs: dict[str, Any] = {
            "sender": rnd.choice(_SENDERS),
            "attachment": attachment,
            "attachment_name": name,
        }
        reference = build_streamed_email_stdlib(n, rendered, **kwargs)
        streamed = build_streamed_email(n, rendered, **kwargs)
        data = joined(streamed)
        assert normalised(data) == normalised(joined(reference)), (n, kwargs)
        assert streamed.size == len(data)
        assert (streamed.sender, streamed.recipient, streamed.message_id) == (
            reference.sender,
            reference.recipient,
            reference.message_id,
        )


def test_boundaries_are_fresh_and_distinct(renderer: Renderer, tmp_path: Path) -> None:
    path = write_file(tmp_path / "a.zip", 10)
    seen: set[bytes] = set()
    for _ in range(50):
        data = joined(
            build_streamed_email(
                notification(), renderer.render(notification()), sender=SENDER, attachment=path
            )
        )
        outer, inner = re.findall(rb'boundary="([^"]+)"', data)
        assert outer != inner
        assert not {outer, inner} & seen
        seen |= {outer, inner}


@pytest.mark.parametrize("chunk_size", [78, 79, 155, 156, 4096, 65_536])
def test_chunking_changes_nothing_but_the_cuts(
    renderer: Renderer, tmp_path: Path, chunk_size: int
) -> None:
    path = write_file(tmp_path / "frames.zip", 10_000)
    _, streamed = both(renderer, notification(), path)
    chunks = list(streamed.iter_chunks(chunk_size))
    assert max(map(len, chunks)) <= chunk_size
    assert b"".join(chunks) == joined(streamed)


def test_chunk_size_below_one_line_is_refused(renderer: Renderer, tmp_path: Path) -> None:
    _, streamed = both(renderer, notification(), write_file(tmp_path / "a.zip", 10))
    with pytest.raises(ValueError, match="at least 78"):
        streamed.iter_chunks(77)


def test_non_ascii_filename_uses_rfc2231(renderer: Renderer, tmp_path: Path) -> None:
    path = write_file(tmp_path / "x.zip", 1000)
    name = "Férias em São Paulo 🎞 — dia 1.zip"
    stdlib, streamed = both(renderer, notification(), path, name=name)
    assert b"filename*0*=utf-8''F%C3%A9rias" in streamed.head  # RFC 2231, with continuations
    data = joined(streamed)
    assert normalised(data) == normalised(stdlib)
    parsed = parse(data)
    assert_no_defects(parsed)
    assert structure(parsed) == structure(parse(stdlib))
    assert next(parsed.iter_attachments()).get_filename() == name


def test_without_attachment_it_is_the_whole_alternative(renderer: Renderer) -> None:
    n = notification(status="FAILED", bucket=None, key=None, message="Codec não suportado")
    stdlib, streamed = both(renderer, n, None)
    assert streamed.tail == b""
    assert streamed.attachment is None
    assert streamed.attachment_size == 0
    data = joined(streamed, chunk_size=1000)
    assert streamed.size == len(data) == len(streamed.head)
    assert normalised(data) == normalised(stdlib)
    parsed = parse(data)
    assert_no_defects(parsed)
    assert parsed.get_content_type() == "multipart/alternative"
    assert structure(parsed) == structure(parse(stdlib))


def test_size_formula_matches_real_base64_for_every_remainder() -> None:
    for raw in [*range(0, 250), 57 * 1000, 57 * 1000 + 1, MiB + 1]:
        data = bytes(raw)
        stdlib = email.policy.SMTP.clone(max_line_length=78)
        message = EmailMessage(policy=stdlib)
        message.set_content(data, maintype="application", subtype="zip")
        body = message.as_bytes().split(b"\r\n\r\n", 1)[1]
        assert encoded_length(raw) == len(body), raw


def test_the_file_is_opened_first_and_read_in_whole_lines(
    renderer: Renderer, tmp_path: Path
) -> None:
    path = write_file(tmp_path / "a.zip", 57 * 100 + 5)
    _, streamed = both(renderer, notification(), path)
    chunks = streamed.iter_chunks(78 * 10)
    path.unlink()
    with pytest.raises(FileNotFoundError):
        next(chunks)  # before the head: nothing was sent yet
    path = write_file(tmp_path / "a.zip", 57 * 100 + 5)
    body = list(attachment_chunks(streamed, 78 * 10))
    assert len(body) == 11
    assert all(len(c) == 78 * 10 for c in body[:-1])  # every block but the last: 570 raw bytes
    assert all(len(line) == 76 for c in body[:-1] for line in c.split(b"\r\n")[:-1])


@pytest.mark.parametrize("change", [-1, +1])
def test_a_file_that_changed_size_is_an_error(
    renderer: Renderer, tmp_path: Path, change: int
) -> None:
    path = write_file(tmp_path / "a.zip", 5000)
    _, streamed = both(renderer, notification(), path)
    write_file(path, 5000 + change)
    with pytest.raises(AttachmentChanged):
        list(streamed.iter_chunks())


def test_streaming_50_mib_keeps_chunks_and_memory_bounded(
    renderer: Renderer, tmp_path: Path
) -> None:
    path = tmp_path / "big.zip"
    rng = random.Random(50)
    digest = hashlib.sha256()
    with path.open("wb") as file:
        for _ in range(50):
            block = rng.randbytes(MiB)
            digest.update(block)
            file.write(block)
    _, streamed = both(renderer, notification(), path)
    chunk_size = 64 * 1024
    start, end = len(streamed.head), len(streamed.head) + encoded_length(50 * MiB)
    decoded = hashlib.sha256()
    total = largest = 0
    tracemalloc.start()
    try:
        for chunk in streamed.iter_chunks(chunk_size):
            largest = max(largest, len(chunk))
            if start <= total < end:
                decoded.update(binascii.a2b_base64(chunk))  # whole lines: decodable alone
            total += len(chunk)
            del chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert largest <= chunk_size
    assert total == streamed.size
    assert decoded.digest() == digest.digest()
    # A few chunks' worth (file block, base64, lines, result), not the 67 MiB message.
    assert peak < 10 * chunk_size, peak


async def test_async_chunks_match_and_close_the_file(renderer: Renderer, tmp_path: Path) -> None:
    path = write_file(tmp_path / "a.zip", 20_000)
    _, streamed = both(renderer, notification(), path)
    assert b"".join([c async for c in streamed.chunks(1024)]) == joined(streamed)
    partial = streamed.chunks(1024)
    await anext(partial)
    await partial.aclose()  # stops the sync generator too, closing the file (no ResourceWarning)


# --------------------------------------------------------------------------- DATA encoding


class _OneShotTransport(asyncio.Transport):
    """Records what aiosmtplib writes and answers DATA with 354, the message with 250."""

    def __init__(self, protocol: SMTPProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))
        reply = b"354 go ahead\r\n" if data == b"DATA\r\n" else b"250 OK\r\n"
        asyncio.get_running_loop().call_soon(self.protocol.data_received, reply)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def aiosmtplib_data(message: bytes) -> bytes:
    """What aiosmtplib itself sends after DATA for `message` (its one-shot encoding)."""
    protocol = SMTPProtocol(loop=asyncio.get_running_loop())
    transport = _OneShotTransport(protocol)
    protocol.connection_made(transport)
    await protocol.execute_data_command(message, timeout=TIMEOUT)
    assert transport.written[0] == b"DATA\r\n"
    return b"".join(transport.written[1:])


def encode(chunks: Iterable[bytes]) -> bytes:
    encoder = DataEncoder()
    return b"".join([*(encoder.feed(chunk) for chunk in chunks), encoder.finish()])


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize(
    ("chunks", "wire"),
    [
        ([], b"\r\n.\r\n"),
        ([b"", b""], b"\r\n.\r\n"),
        ([b"."], b"..\r\n.\r\n"),
        ([b"a\r", b"\n.b"], b"a\r\n..b\r\n.\r\n"),  # CRLF split, then a dot at line start
        ([b"a\r\n", b".b\r\n"], b"a\r\n..b\r\n.\r\n"),
        ([b"a", b".b"], b"a.b\r\n.\r\n"),  # a dot mid-line is not stuffed
        ([b"a\r", b"", b"\r", b"\n"], b"a\r\n\r\n.\r\n"),  # bare CR, then CRLF over 3 chunks
        ([b"a\n.\n"], b"a\r\n..\r\n.\r\n"),  # bare LFs
        ([b"x\r"], b"x\r\n.\r\n"),  # a trailing bare CR
        ([b"x\r\n"], b"x\r\n.\r\n"),
    ],
)
async def test_data_encoder_cases(chunks: list[bytes], wire: bytes) -> None:
    message = b"".join(chunks)
    assert await aiosmtplib_data(message) == wire
    assert encode(chunks) == wire


async def test_data_encoder_equals_aiosmtplib_for_every_short_message_and_split() -> None:
    for length in range(7):
        for message in map(b"".join, itertools.product([b".", b"\r", b"\n", b"a"], repeat=length)):
            wire = await aiosmtplib_data(message)
            for k in range(min(length, 3)):
                for cuts in itertools.combinations(range(1, length), k):
                    assert encode(split(message, cuts)) == wire, (message, cuts)
            bytewise = [message[i : i + 1] for i in range(length)]
            assert encode(bytewise) == wire
            assert encode(itertools.chain.from_iterable((c, b"") for c in bytewise)) == wire


async def test_data_encoder_equals_aiosmtplib_for_random_splits() -> None:
    rng = random.Random(5321)
    tokens = [b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"a", b"bc", b"From ", b"\x00"]
    for _ in range(400):
        message = b"".join(rng.choices(tokens, k=rng.randrange(0, 120)))
        wire = await aiosmtplib_data(message)
        for _ in range(25):
            cuts = [rng.randrange(0, len(message) + 1) for _ in range(rng.randrange(0, 12))]
            assert encode(split(message, cuts)) == wire, (message, sorted(cuts))


async def test_data_encoder_on_a_streamed_message_equals_aiosmtplib(
    renderer: Renderer, tmp_path: Path
) -> None:
    n = notification()
    rendered = renderer.render(n, attachment_name="férias.zip")
    rendered = replace(rendered, text=".leading dot\n..two\n.\nend\n" + rendered.text)
    path = write_file(tmp_path / "a.zip", 100_000)
    _, streamed = both(renderer, n, path, rendered=rendered)
    message = joined(streamed)
    wire = await aiosmtplib_data(message)
    for chunk_size in (78, 1000, 4096, 256 * 1024):
        assert encode(streamed.iter_chunks(chunk_size)) == wire


async def test_base64_chunks_pass_through_only_at_a_line_start() -> None:
    lines = encode_lines(random.Random(3).randbytes(57 * 40 + 7))
    assert isinstance(lines, Base64Lines)
    assert lines.endswith(b"\r\n")
    assert not lines.startswith(b".")
    for before in (b"", b"head\r\n", b"head\r", b"head", b"\r\n."):
        wire = await aiosmtplib_data(before + bytes(lines))
        assert encode([before, lines]) == wire, before


def test_data_encoder_is_single_use() -> None:
    encoder = DataEncoder()
    encoder.finish()
    with pytest.raises(RuntimeError):
        encoder.feed(b"x")
    with pytest.raises(RuntimeError):
        encoder.finish()


# --------------------------------------------------------------------------- real SMTP


async def connect(sink: SmtpSink | tuple[str, int]) -> SmtpChannel:
    """A session set up by aiosmtplib and handed to SmtpChannel, as the pool does it."""
    host, port = (sink.host, sink.port) if isinstance(sink, SmtpSink) else sink
    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=TIMEOUT)
    await smtp.connect()
    await smtp.ehlo()
    return SmtpChannel.take_over(smtp)


async def transaction(
    channel: SmtpChannel, streamed: StreamedEmail, *, pipelining: bool, size: bool, chunk_size: int
) -> Reply:
    """One whole transaction, as the pool does it: transmit, then wait for the verdict."""
    slot = await channel.transmit(streamed, pipelining=pipelining, size=size, chunk_size=chunk_size)
    return await channel.verdict(slot)


async def send(
    channel: SmtpChannel, streamed: StreamedEmail, *, chunk_size: int = 4096, size: bool = True
) -> Reply:
    async with asyncio.timeout(TIMEOUT):
        return await transaction(
            channel, streamed, pipelining=True, size=size, chunk_size=chunk_size
        )


async def test_end_to_end_through_aiosmtpd(
    renderer: Renderer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    n = notification()
    rendered = renderer.render(n, attachment_name="férias.zip")
    rendered = replace(rendered, text=".leading dot\n..two\n.\n" + rendered.text)
    path = write_file(tmp_path / "frames.zip", MiB + 1)
    _, streamed = both(renderer, n, path, rendered=rendered)
    second = build_streamed_email(
        notification(email="joao@example.com", video_id="v2"),
        rendered,
        sender=SENDER,
        attachment=write_file(tmp_path / "other.zip", 57 * 3, seed=2),
    )

    channel = await connect(smtp_sink)
    for message in (streamed, second):  # the connection stays in sync for the next one
        reply = await send(channel, message)
        assert reply.code == 250
    assert await channel.noop()
    await channel.quit()

    received = await asyncio.to_thread(smtp_sink.wait_for, 2)
    assert smtp_sink.connections_opened == 1
    assert received[0].data == joined(streamed)  # un-stuffed by the server: exactly our bytes
    assert received[0].rcpt_tos == ["maria@example.com"]
    assert received[1].rcpt_tos == ["joao@example.com"]
    parsed = smtp_sink.parsed()
    assert_no_defects(parsed[0])
    text = parsed[0].get_body(preferencelist=("plain",))
    assert text is not None
    assert text.get_content().replace("\r\n", "\n").startswith(".leading dot\n..two\n.\n")
    assert next(parsed[0].iter_attachments()).get_content() == path.read_bytes()
    assert next(parsed[1].iter_attachments()).get_content() == (tmp_path / "other.zip").read_bytes()


async def test_missing_file_fails_before_data(
    renderer: Renderer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    _, streamed = both(renderer, notification(), write_file(tmp_path / "a.zip", 100))
    (tmp_path / "a.zip").unlink()
    channel = await connect(smtp_sink)
    with pytest.raises(AttachmentReadError, match="FileNotFoundError") as failure:
        await send(channel, streamed)
    assert not failure.value.spoiled  # nothing was written: the connection is not to blame
    assert channel.is_connected
    assert (await channel.command("RSET")).code == 250  # still in sync
    await channel.quit()


async def test_failure_inside_data_spoils_the_connection(
    renderer: Renderer, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    path = write_file(tmp_path / "a.zip", 200_000)
    _, streamed = both(renderer, notification(), path)
    write_file(path, 100_000)  # shrinks after the size was taken
    channel = await connect(smtp_sink)
    with pytest.raises(AttachmentReadError, match="AttachmentChanged") as failure:
        await send(channel, streamed)
    # Half a message went out: the stream can carry nothing more. The channel leaves the
    # closing to its owner (the pool still reads earlier verdicts first); here that is us.
    assert failure.value.spoiled
    channel.close()
    await asyncio.to_thread(smtp_sink.wait_idle)
    assert smtp_sink.messages == []  # the partial message died with the connection


async def test_a_refused_message_leaves_the_connection_usable(
    renderer: Renderer, tmp_path: Path
) -> None:
    _, streamed = both(renderer, notification(), write_file(tmp_path / "a.zip", 300_000))
    with SmtpSink(data_size_limit=100_000) as sink:
        channel = await connect(sink)
        with pytest.raises(RefusedError) as caught:  # no SIZE: the limit is hit inside DATA
            await send(channel, streamed, chunk_size=8192, size=False)
        assert (caught.value.phase, caught.value.reply.code) == ("MESSAGE", 552)
        assert channel.is_connected
        assert (await channel.command("RSET")).code == 250
        await channel.quit()
        assert sink.messages == []


async def test_a_server_that_stops_reading_times_out(renderer: Renderer, tmp_path: Path) -> None:
    """Drain really waits: with the peer not reading, the write stalls and the timeout fires."""
    stalled, release = asyncio.Event(), asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stall.test ESMTP\r\n")
        while line := await reader.readline():
            if line.startswith(b"DATA"):
                writer.write(b"354 go ahead\r\n")
                stalled.set()
                await release.wait()  # read nothing more until the test is over
                break
            writer.write(b"250 OK\r\n")
        writer.close()

    path = tmp_path / "big.zip"
    with path.open("wb") as file:
        file.truncate(128 * MiB)  # sparse: far more than the socket buffers hold
    n = notification()
    rendered = renderer.render(n, attachment_name="a.zip")
    streamed = build_streamed_email(n, rendered, sender=SENDER, attachment=path)
    server = await asyncio.start_server(serve, LOOPBACK, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        channel = await connect((LOOPBACK, port))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await transaction(channel, streamed, pipelining=False, size=True, chunk_size=65536)
        assert stalled.is_set()
        # Left mid-DATA for its owner to close (the pool marks such a connection spoiled).
        assert channel.is_connected
        channel.close()
        assert not channel.is_connected
    finally:
        release.set()
        server.close()
        await server.wait_closed()


async def test_not_connected_is_refused() -> None:
    with pytest.raises(SMTPServerDisconnected):
        SmtpChannel.take_over(aiosmtplib.SMTP())
