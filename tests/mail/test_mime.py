"""The streamed message equals the stdlib's build, byte for byte but Date and boundaries.

References are the real thing, never a re-implementation: the build entirely by the stdlib
email package (`mime_reference.build_streamed_email_stdlib`, which the fast builder must
match) and a mail client's parse.
"""

from __future__ import annotations

import binascii
import email
import email.policy
import hashlib
import random
import re
import tracemalloc
from collections.abc import Iterator
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path
from typing import IO, Any

import pytest
from mime_reference import (
    SENDER,
    MiB,
    assert_no_defects,
    both,
    build_streamed_email_stdlib,
    joined,
    normalised,
    notification,
    write_file,
)

from async_notifier.errors import AttachmentChanged
from async_notifier.mail.mime import (
    StreamedEmail,
    attachment_filename,
    build_streamed_email,
    encoded_length,
    message_tags,
    tag_value,
    tags_header,
)
from async_notifier.mail.render import Renderer

SIZES = [0, 1, 56, 57, 58, 114, MiB + 1]


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, _class=EmailMessage, policy=email.policy.default)


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


def recording(path: Path) -> tuple[Path, list[IO[bytes]]]:
    """`path`, noting every file opened through it. The list keeps each file object alive,
    so one left open stays open: the garbage collector cannot close it behind the test."""
    opened: list[IO[bytes]] = []

    class Recording(type(path)):  # type: ignore[misc]  # PosixPath; Path itself from 3.12
        def open(self, *args: Any, **kwargs: Any) -> Any:
            file = super().open(*args, **kwargs)
            opened.append(file)
            return file

    return Recording(path), opened


async def test_async_chunks_match_and_close_the_file(renderer: Renderer, tmp_path: Path) -> None:
    path, opened = recording(write_file(tmp_path / "a.zip", 20_000))
    _, streamed = both(renderer, notification(), path)
    assert b"".join([c async for c in streamed.chunks(1024)]) == joined(streamed)
    assert opened
    assert all(file.closed for file in opened)  # read to the end: closed
    partial = streamed.chunks(1024)
    await anext(partial)
    assert not opened[-1].closed  # open while the message is being read
    await partial.aclose()  # stops the sync generator too, closing the file at once
    assert opened[-1].closed


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("298ce197-3627-4845-83d7-cd6c98a9df8c", "298ce197-3627-4845-83d7-cd6c98a9df8c"),
        ("COMPLETED", "COMPLETED"),
        ("a.b@c d/é", "a_b_c_d__"),  # SES takes letters, digits, "_" and "-" only
        ("x" * 300, "x" * 256),
        ("", "_"),  # SES requires a value
    ],
)
def test_tag_values_follow_ses_rules(value: str, expected: str) -> None:
    assert tag_value(value) == expected


def tags_of(data: bytes) -> dict[str, str]:
    """X-SES-MESSAGE-TAGS as SES reads it: the unfolded header, "name=value, name=value"."""
    raw = parse(data)["X-SES-MESSAGE-TAGS"]
    assert raw is not None
    value = re.sub(r"\r?\n[ \t]", " ", str(raw))  # RFC 5322 unfolding
    assert "=?" not in value  # no encoded word: SES would read it as the tag's value
    return dict(pair.split("=", 1) for pair in value.split(", "))


def test_tags_travel_beside_the_message_and_in_its_ses_header(renderer: Renderer) -> None:
    """The SES API takes them as EmailTags (and then ignores the header); SES's SMTP
    interface reads X-SES-MESSAGE-TAGS. Both carry the tracking id that joins SES's events
    to the notification's delivery status."""
    n = notification(notification_id="batch 7/1")
    streamed = build_streamed_email(n, renderer.render(n), sender=SENDER)
    assert streamed.tags == (
        ("video_id", "298ce197-3627-4845-83d7-cd6c98a9df8c"),
        ("status", "COMPLETED"),
        ("tracking_id", n.tracking_id),
        ("notification_id", "batch_7_1"),
    )
    assert n.tracking_id == n.identity[:40]
    assert streamed.message_id.startswith(f"<{n.tracking_id}@")
    assert tags_of(streamed.as_bytes()) == dict(streamed.tags)
    without = notification()
    assert [name for name, _ in message_tags(without)] == ["video_id", "status", "tracking_id"]
    # A Cognito recipient's tracking id is taken before the lookup, which changes `identity`.
    looked_up = build_streamed_email(n, renderer.render(n), sender=SENDER, tracking_id="f" * 40)
    assert dict(looked_up.tags)["tracking_id"] == "f" * 40
    assert tags_of(looked_up.as_bytes())["tracking_id"] == "f" * 40


def test_a_long_tags_header_is_folded_between_tags_never_encoded(renderer: Renderer) -> None:
    n = notification(video_id="v" * 255, notification_id="n" * 200)
    streamed = build_streamed_email(n, renderer.render(n), sender=SENDER)
    head = streamed.head.decode("ascii")
    start = head.index("X-SES-MESSAGE-TAGS:")
    end = head.index("\r\nMIME-Version:", start)
    lines = head[start:end].split("\r\n")
    assert len(lines) == 4  # one tag a line
    assert all(len(line) <= 998 for line in lines)
    assert all(line.startswith(" ") for line in lines[1:])
    assert tags_of(streamed.as_bytes()) == dict(streamed.tags)
    assert dict(streamed.tags)["video_id"] == "v" * 255
    with pytest.raises(ValueError, match="tag-safe"):
        tags_header((("video_id", "a b"),))
