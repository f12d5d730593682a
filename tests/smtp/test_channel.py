"""SmtpChannel against a real aiosmtpd server: a streamed message arrives exactly as built,
and a failure leaves the connection in a state its owner can tell (usable or spoiled).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import aiosmtplib
import pytest
from aiosmtplib.errors import SMTPServerDisconnected
from mime_reference import SENDER, MiB, assert_no_defects, both, joined, notification, write_file
from servers import LOOPBACK, SmtpSink

from async_notifier.mail.mime import StreamedEmail, build_streamed_email
from async_notifier.mail.render import Renderer
from async_notifier.smtp.channel import (
    AttachmentReadError,
    LostBeforeEnd,
    RefusedError,
    Reply,
    SmtpChannel,
)

TIMEOUT = 10.0


async def connect(sink: SmtpSink | tuple[str, int]) -> SmtpChannel:
    """A session set up by aiosmtplib and handed to SmtpChannel, as the pool does it."""
    host, port = (sink.host, sink.port) if isinstance(sink, SmtpSink) else sink
    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=TIMEOUT)
    await smtp.connect()
    await smtp.ehlo()
    return SmtpChannel.take_over(smtp)


async def transaction(
    channel: SmtpChannel,
    streamed: StreamedEmail,
    *,
    pipelining: bool,
    size: bool,
    chunk_size: int,
    limit: float = TIMEOUT,
) -> Reply:
    """One whole transaction, as the pool does it: transmit, then wait for the verdict."""
    slot = await channel.transmit(
        streamed,
        pipelining=pipelining,
        size=size,
        chunk_size=chunk_size,
        limit=limit,
        data_limit=TIMEOUT,
    )
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
    assert await channel.noop(TIMEOUT)
    await channel.quit(TIMEOUT)

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
    assert (await channel.command("RSET", TIMEOUT)).code == 250  # still in sync
    await channel.quit(TIMEOUT)


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
        assert (await channel.command("RSET", TIMEOUT)).code == 250
        await channel.quit(TIMEOUT)
        assert sink.messages == []


async def test_a_server_that_stops_reading_times_out(renderer: Renderer, tmp_path: Path) -> None:
    """Drain really waits, and no longer than its limit: with the peer not reading, the write
    stalls and the channel gives up after `limit` without progress (nothing delivered)."""
    stalled, release = asyncio.Event(), asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 stall.test ESMTP\r\n")
            while line := await reader.readline():
                if line.startswith(b"DATA"):
                    writer.write(b"354 go ahead\r\n")
                    stalled.set()
                    await release.wait()  # read nothing more until the test is over
                    break
                writer.write(b"250 OK\r\n")
        finally:  # also when the test's loop cancels it at its end
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
        with pytest.raises(LostBeforeEnd, match=r"took no data for 0\.5 s"):
            async with asyncio.timeout(TIMEOUT):  # a safety net: the channel's limit fires first
                await transaction(
                    channel, streamed, pipelining=False, size=True, chunk_size=65536, limit=0.5
                )
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
