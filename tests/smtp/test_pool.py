"""The SMTP pool against a real aiosmtpd server, counted from the server side."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from conditions import until, wait_until
from faults import FaultySmtp, SmtpFaults
from pool_emails import expected_subjects, outgoing, settings, subjects
from servers import LOOPBACK, SmtpSink, TlsFiles, free_port, make_zip

from async_notifier.config import DEFAULT_TEMPLATES_DIR, Settings
from async_notifier.errors import RecipientRejected, SmtpUnavailable
from async_notifier.mail.mime import build_streamed_email
from async_notifier.mail.render import Renderer
from async_notifier.messages import parse_body
from async_notifier.smtp.pool import SmtpPool
from bench.proxy import Route, start_route, stop_route

PASSWORD = "s3cret-pool-password"


def sink_settings(sink: SmtpSink, **extra: str) -> Settings:
    return settings(sink.host, sink.port, **extra)


async def idle(sink: SmtpSink) -> None:
    """Wait, off the event loop, until the server saw every connection close.

    Blocking the loop instead would stop the client from ever closing its sockets.
    """
    await asyncio.to_thread(sink.wait_idle)


async def test_connections_open_lazily(smtp_sink: SmtpSink) -> None:
    async with SmtpPool(sink_settings(smtp_sink, SMTP_POOL_SIZE="4")) as pool:
        assert pool.connections_opened == 0
    assert smtp_sink.connections_opened == 0


async def test_prewarm_opens_connections_before_any_send(smtp_sink: SmtpSink) -> None:
    async with SmtpPool(sink_settings(smtp_sink, SMTP_POOL_SIZE="4")) as pool:
        pool.prewarm(3)
        await asyncio.to_thread(wait_until, lambda: smtp_sink.connections_open == 3)
        pool.prewarm(100)  # never beyond the pool size; open ones count
        await asyncio.to_thread(wait_until, lambda: smtp_sink.connections_open == 4)
        await asyncio.gather(*(pool.send(outgoing(i)) for i in range(8)))
        assert pool.connections_opened == 4  # the sends used the warm connections
    await idle(smtp_sink)
    assert smtp_sink.connections_opened == 4
    assert subjects(smtp_sink) == expected_subjects(8)


async def test_a_send_during_the_warm_up_waits_for_that_connection(smtp_sink: SmtpSink) -> None:
    """A one-record batch warms one connection; its send, arriving while the handshake is
    still running, takes that connection instead of opening a second one."""
    async with SmtpPool(sink_settings(smtp_sink, SMTP_POOL_SIZE="4")) as pool:
        pool.prewarm(1)
        await pool.send(outgoing(0))
        assert pool.connections_opened == 1
        # More sends than connections warming: the others open their own, within the pool.
        pool.prewarm(2)
        await asyncio.gather(*(pool.send(outgoing(i)) for i in range(1, 5)))
        assert 2 <= pool.connections_opened <= 4
    await idle(smtp_sink)
    assert smtp_sink.connections_opened == pool.connections_opened
    assert subjects(smtp_sink) == expected_subjects(5)


async def test_stop_prewarm_before_the_warm_up_ran_gives_its_slots_back(
    smtp_sink: SmtpSink,
) -> None:
    async with SmtpPool(sink_settings(smtp_sink, SMTP_POOL_SIZE="2")) as pool:
        pool.prewarm(2)
        await pool.stop_prewarm()  # cancelled before their first step
        await asyncio.gather(*(pool.send(outgoing(i)) for i in range(4)))
        assert 1 <= pool.connections_opened <= 2
    assert subjects(smtp_sink) == expected_subjects(4)


async def test_stop_prewarm_closes_handshakes_still_running(faulty_smtp: FaultySmtp) -> None:
    """A server stalling its greeting: the batch ends, and no half-open connection stays."""
    faulty_smtp.faults = SmtpFaults(stall_seconds=math.inf, stall_on="greeting")
    s = settings(faulty_smtp.host, faulty_smtp.port, SMTP_POOL_SIZE="2")
    async with SmtpPool(s) as pool:
        pool.prewarm(2)
        await asyncio.to_thread(wait_until, lambda: faulty_smtp.connections_open == 2)
        await pool.stop_prewarm()
        await asyncio.to_thread(faulty_smtp.wait_idle, 5.0)
        assert pool.connections_opened == 0
        faulty_smtp.faults = SmtpFaults()
        await pool.send(outgoing(0))  # the slots the warm-up held are free again
    assert subjects(faulty_smtp) == expected_subjects(1)


async def test_sequential_sends_share_one_connection(smtp_sink: SmtpSink) -> None:
    async with SmtpPool(sink_settings(smtp_sink, SMTP_POOL_SIZE="4")) as pool:
        for index in range(10):
            await pool.send(outgoing(index))
    await idle(smtp_sink)
    assert subjects(smtp_sink) == expected_subjects(10)
    assert smtp_sink.connections_opened == 1
    assert pool.connections_opened == 1


async def test_concurrent_sends_use_at_most_pool_size_connections(smtp_sink: SmtpSink) -> None:
    async with SmtpPool(sink_settings(smtp_sink, SMTP_POOL_SIZE="3")) as pool:
        await asyncio.gather(*(pool.send(outgoing(i)) for i in range(60)))
    await idle(smtp_sink)
    assert subjects(smtp_sink) == expected_subjects(60)
    assert [m.rcpt_tos for m in smtp_sink.messages].count(["user7@example.com"]) == 1
    assert 1 <= smtp_sink.connections_opened <= 3
    assert pool.connections_opened == smtp_sink.connections_opened


async def test_connection_recycled_after_max_messages(smtp_sink: SmtpSink) -> None:
    s = sink_settings(smtp_sink, SMTP_POOL_SIZE="1", SMTP_MAX_MESSAGES_PER_CONNECTION="3")
    async with SmtpPool(s) as pool:
        for index in range(10):
            await pool.send(outgoing(index))
    await idle(smtp_sink)
    assert subjects(smtp_sink) == expected_subjects(10)
    assert smtp_sink.connections_opened == 4  # 3 + 3 + 3 + 1
    assert smtp_sink.quit_count == 4  # three recycled, the last one closed by aclose
    assert smtp_sink.connections_open == 0


async def test_aclose_quits_idle_connections(smtp_sink: SmtpSink) -> None:
    pool = SmtpPool(sink_settings(smtp_sink, SMTP_POOL_SIZE="4"))
    await asyncio.gather(*(pool.send(outgoing(i)) for i in range(12)))
    opened = smtp_sink.connections_opened
    assert 1 <= opened <= 4
    assert smtp_sink.connections_open == opened  # kept open between messages
    assert smtp_sink.quit_count == 0
    await pool.aclose()
    await idle(smtp_sink)
    assert smtp_sink.connections_open == 0
    assert smtp_sink.quit_count == opened
    with pytest.raises(SmtpUnavailable, match="closed"):
        await pool.send(outgoing(99))
    assert len(smtp_sink.messages) == 12


async def test_server_dropping_connections_mid_batch() -> None:
    with SmtpSink(drop_after=2) as sink:
        async with SmtpPool(sink_settings(sink, SMTP_POOL_SIZE="3")) as pool:
            # One at a time first: every third send finds its pooled connection gone.
            for index in range(9):
                await pool.send(outgoing(index))
            await asyncio.gather(*(pool.send(outgoing(i)) for i in range(9, 40)))
        await idle(sink)
        assert subjects(sink) == expected_subjects(40)
        assert sink.connections_opened >= 20  # at most two messages per connection
        assert sink.connections_open == 0


async def test_a_send_tries_each_pooled_connection_the_server_dropped() -> None:
    """Every idle connection is dead though none looks it: the email still goes out, on a
    fresh connection after trying each pooled one (not after one retry)."""
    with SmtpSink() as sink:
        async with SmtpPool(sink_settings(sink, SMTP_POOL_SIZE="3")) as pool:
            await asyncio.gather(*(pool.send(outgoing(i)) for i in range(3)))
            assert pool.connections_opened == 3
            sink.hang_up_on_reuse = True
            await pool.send(outgoing(3))
            assert pool.connections_opened == 4
        assert subjects(sink) == expected_subjects(4)


async def test_rejected_recipient_keeps_the_connection_usable() -> None:
    with SmtpSink(reject={"gone@example.com"}) as sink:
        async with SmtpPool(sink_settings(sink, SMTP_POOL_SIZE="1")) as pool:
            await pool.send(outgoing(0))
            with pytest.raises(RecipientRejected) as caught:
                await pool.send(outgoing(1, recipient="gone@example.com"))
            await pool.send(outgoing(2))
        await idle(sink)
        assert caught.value.transient is False
        assert "550" in caught.value.reason
        assert [m.rcpt_tos for m in sink.messages] == [
            ["user0@example.com"],
            ["user2@example.com"],
        ]
        assert sink.connections_opened == 1


async def test_unreachable_server() -> None:
    async with SmtpPool(settings(LOOPBACK, free_port(), SMTP_POOL_SIZE="2")) as pool:
        with pytest.raises(SmtpUnavailable) as caught:
            await pool.send(outgoing(0))
        results = await asyncio.gather(
            *(pool.send(outgoing(i)) for i in range(5)), return_exceptions=True
        )
    assert caught.value.transient is True
    assert "cannot connect" in caught.value.reason
    assert all(isinstance(result, SmtpUnavailable) for result in results)
    assert pool.connections_opened == 0


async def test_real_email_with_attachment_and_dot_lines_arrives_intact(
    smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    """The ZIP is streamed from disk and lines starting with '.' are dot-stuffed on the wire."""
    data = make_zip(300_000, seed=21)
    zip_path = tmp_path / "frames.zip"
    zip_path.write_bytes(data)
    renderer = Renderer(DEFAULT_TEMPLATES_DIR)
    completed = parse_body(
        json.dumps(
            {
                "video_id": "vid-1",
                "bucket": "videos-zip",
                "key": "v/v.zip",
                "email": "maria@example.com",
                "name": "Maria",
                "file_name": "férias.mp4",
            }
        )
    )
    failed = parse_body(
        json.dumps(
            {
                "video_id": "vid-2",
                "status": "FAILED",
                "email": "joao@example.com",
                "message": "first line\n.\n..two dots\n.\r\nlast line",
            }
        )
    )
    s = sink_settings(smtp_sink)
    with_zip = build_streamed_email(
        completed,
        renderer.render(completed, attachment_name="férias.zip"),
        sender=s.email_from,
        attachment=zip_path,
        attachment_name="férias.zip",
    )
    without = build_streamed_email(failed, renderer.render(failed), sender=s.email_from)
    async with SmtpPool(s) as pool:
        await pool.send(with_zip)
        await pool.send(without)
    await idle(smtp_sink)
    assert [len(m.data) for m in smtp_sink.messages] == [with_zip.size, without.size]
    first, second = smtp_sink.parsed()
    [attachment] = first.iter_attachments()
    assert attachment.get_filename() == "férias.zip"
    assert attachment.get_content() == data
    text = second.get_body(preferencelist=("plain",))
    assert text is not None
    lines = text.get_content().splitlines()
    assert lines[lines.index("first line") : lines.index("last line") + 1] == [
        "first line",
        ".",
        "..two dots",
        ".",
        "last line",
    ]
    assert smtp_sink.connections_opened == 1


# --------------------------------------------------------------------------- TLS and AUTH


async def test_starttls_with_private_ca(tls_files: TlsFiles) -> None:
    with SmtpSink(tls=tls_files.server_context()) as sink:
        s = sink_settings(sink, SMTP_TLS="starttls", SMTP_CA_FILE=str(tls_files.ca))
        async with SmtpPool(s) as pool:
            for index in range(3):
                await pool.send(outgoing(index))
        await idle(sink)
        # The sink refuses MAIL before STARTTLS, so receiving them proves TLS was negotiated.
        assert subjects(sink) == expected_subjects(3)
        assert sink.connections_opened == 1  # STARTTLS once, then reused


async def test_starttls_without_the_ca_fails_verification(tls_files: TlsFiles) -> None:
    with SmtpSink(tls=tls_files.server_context()) as sink:
        async with SmtpPool(sink_settings(sink, SMTP_TLS="starttls")) as pool:
            with pytest.raises(SmtpUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await pool.send(outgoing(0))
        await idle(sink)
        assert sink.messages == []
        assert sink.connections_opened == 1


async def test_starttls_required_never_falls_back_to_plain_text(smtp_sink: SmtpSink) -> None:
    async with SmtpPool(sink_settings(smtp_sink, SMTP_TLS="starttls")) as pool:
        with pytest.raises(SmtpUnavailable, match="STARTTLS"):
            await pool.send(outgoing(0))
    await idle(smtp_sink)
    assert smtp_sink.messages == []
    assert smtp_sink.connections_opened == 1


async def test_auth_over_starttls(tls_files: TlsFiles) -> None:
    with SmtpSink(tls=tls_files.server_context(), auth=("mailer", PASSWORD)) as sink:
        s = sink_settings(
            sink,
            SMTP_TLS="starttls",
            SMTP_CA_FILE=str(tls_files.ca),
            SMTP_USER="mailer",
            SMTP_PASSWORD=PASSWORD,
        )
        async with SmtpPool(s) as pool:
            await asyncio.gather(*(pool.send(outgoing(i)) for i in range(4)))
        await idle(sink)
        assert subjects(sink) == expected_subjects(4)  # the sink requires AUTH for MAIL
        assert 1 <= sink.connections_opened <= 8


async def test_wrong_password_fails_without_leaking_it(tls_files: TlsFiles) -> None:
    with SmtpSink(tls=tls_files.server_context(), auth=("mailer", PASSWORD)) as sink:
        s = sink_settings(
            sink,
            SMTP_TLS="starttls",
            SMTP_CA_FILE=str(tls_files.ca),
            SMTP_USER="mailer",
            SMTP_PASSWORD="not-the-password",
        )
        async with SmtpPool(s) as pool:
            with pytest.raises(SmtpUnavailable) as caught:
                await pool.send(outgoing(0))
        await idle(sink)
        assert "535" in caught.value.reason
        assert "not-the-password" not in caught.value.reason
        assert sink.messages == []


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("pipelining", "setting", "most_turns"),
    [(True, "true", 12), (False, "true", 41), (True, "false", 41)],
    ids=["offered", "not-offered", "turned-off"],
)
async def test_with_pipelining_a_message_costs_one_round_trip(
    pipelining: bool, setting: str, most_turns: int
) -> None:
    """The next envelope leaves right behind the previous end-of-data, before its 250.

    Counted by the benchmark's delay relay as client turns (each burst the client sends
    after hearing from the server): EHLO, the first envelope, then one turn per message
    when the server offers PIPELINING; without it (or with SMTP_PIPELINING=false), each of
    MAIL, RCPT, DATA and the message waits for the reply before it.
    """
    with SmtpSink(pipelining=pipelining) as sink:
        route = Route(name="smtp", host=sink.host, port=sink.port, delay=0.1)
        relay = await start_route(route)
        try:
            port = relay.sockets[0].getsockname()[1]
            s = settings(LOOPBACK, port, SMTP_POOL_SIZE="1", SMTP_PIPELINING=setting)
            async with SmtpPool(s) as pool:
                await asyncio.gather(*(pool.send(outgoing(i)) for i in range(10)))
                turns = route.turns
                assert pool.connections_opened == 1
        finally:
            await stop_route(route, relay)
        assert subjects(sink) == expected_subjects(10)
    assert turns <= most_turns
    if most_turns < 41:
        assert turns < 2 * 10  # well under the lockstep count
    else:
        assert turns == most_turns  # one turn per command: EHLO, then 4 per message


async def test_cancelled_while_awaiting_the_verdict_keeps_the_connection() -> None:
    """Replies are matched to commands by order, so a caller that stops waiting for its 250
    neither closes the connection nor lets the next email take that 250 as its own."""
    with SmtpSink(pipelining=True, verdict_delay=0.5) as sink:
        async with SmtpPool(sink_settings(sink, SMTP_POOL_SIZE="1")) as pool:
            sending = await pool.transmit(outgoing(0))  # its end of data is written
            first = asyncio.create_task(sending.verdict())
            await asyncio.to_thread(sink.wait_for, 1)  # received; its 250 is held back
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert pool.check().idle == 1  # given back, not closed
            await pool.send(outgoing(1))  # its MAIL/RCPT/DATA replies queue after that 250
            await pool.send(outgoing(2))
            assert pool.connections_opened == 1
        assert subjects(sink) == expected_subjects(3)


async def test_a_batch_counts_the_connections_it_opened_warm_ups_included(
    smtp_sink: SmtpSink,
) -> None:
    """The statistics are the pool's own, per batch: a warm-up that finished before the
    first send (or after it) counts for the batch that started it, never for the next."""
    async with SmtpPool(sink_settings(smtp_sink, SMTP_POOL_SIZE="4")) as pool:
        pool.start_batch(3)
        await asyncio.to_thread(wait_until, lambda: smtp_sink.connections_open == 3)
        await until(lambda: pool.check().idle == 3)  # the handshakes are complete: no send yet
        await asyncio.gather(*(pool.send(outgoing(i)) for i in range(3)))
        first = await pool.finish_batch()
        assert first.connections_opened == 3
        pool.start_batch(3)  # warm already: nothing to open
        await asyncio.gather(*(pool.send(outgoing(i)) for i in range(3, 6)))
        second = await pool.finish_batch()
        assert second.connections_opened == 0
        assert pool.check().idle == 3
    assert smtp_sink.connections_opened == 3
