"""DATA encoding (dot-stuffing, line ends, the end of data) equals aiosmtplib's own, however
the message is cut into chunks.

The reference is aiosmtplib's one-shot encoding of the whole message, recorded off a
transport that answers like a server.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiosmtplib.protocol import SMTPProtocol
from mime_reference import both, joined, notification, write_file

from async_notifier.mail.mime import Base64Lines, encode_lines
from async_notifier.mail.render import Renderer
from async_notifier.smtp.data import DataEncoder

TIMEOUT = 10.0


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
