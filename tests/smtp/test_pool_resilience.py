"""The SMTP pool under slow servers, silent servers and cancellation, against real aiosmtpd.

The invariant every scenario ends with (`SmtpPool.check`): each place in the pool is one
listed connection that is connecting, idle, busy or closing; never more places than
SMTP_POOL_SIZE; no closed connection listed. Once nothing runs, nothing is busy or
waiting either, and the server sees no more connections than the pool counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conditions import until
from faults import FaultySmtp, SmtpFault, SmtpFaults
from pool_emails import expected_subjects, outgoing, settings, subjects

from async_notifier.config import Settings
from async_notifier.errors import AttachmentUnreadable, DeliveryUnknown, RecipientRejected
from async_notifier.mail.mime import StreamedEmail
from async_notifier.smtp.pool import SmtpPool

pytestmark = pytest.mark.usefixtures("faulty_smtp")


def server_settings(server: FaultySmtp, **extra: str) -> Settings:
    return settings(server.host, server.port, **extra)


async def assert_quiet(pool: SmtpPool, server: FaultySmtp) -> None:
    """The invariant, plus: nothing busy or waiting once the sends are over; nothing
    connecting either once the batch is finished, and the server, once it has seen the
    closes (it notices them a moment later), holds no more connections than the pool counts.

    A connection opened for a send that another one served meanwhile goes on connecting in
    the background (it is kept for the next send): only `finish_batch`, which ends every
    invocation, promises that nothing the batch started is still running.
    """
    state = pool.check()
    assert (state.busy, state.waiting) == (0, 0), state
    await pool.finish_batch()
    state = pool.check()
    assert (state.busy, state.waiting, state.connecting) == (0, 0, 0), state
    await asyncio.to_thread(server.wait_open_at_most, state.places, 5.0)
    assert server.connections_open <= state.places


@contextlib.asynccontextmanager
async def checked_pool(s: Settings, server: FaultySmtp) -> AsyncIterator[SmtpPool]:
    pool = SmtpPool(s)
    try:
        yield pool
        await assert_quiet(pool, server)
    finally:
        await pool.aclose()
    assert pool.check().places == 0
    await server.wait_idle_async()


def with_attachment(index: int, path: Path, size: int) -> StreamedEmail:
    email = outgoing(index)
    return StreamedEmail(
        sender=email.sender,
        recipient=email.recipient,
        message_id=email.message_id,
        head=email.head,
        attachment=path,
        attachment_size=size,
        tail=b"\r\n",
    )


# --------------------------------------------------------------------------- retiring


async def test_retiring_a_pipelined_connection_keeps_its_verdict(faulty_smtp: FaultySmtp) -> None:
    """One message per connection, and a server that takes 3 s for its verdict.

    A connection is retired after its message; the verdict must be read before QUIT goes
    out (a QUIT timing out behind a pending 250 would close the socket, and the server
    would drop the message it had not yet accepted).
    """
    faulty_smtp.pipelining = True
    faulty_smtp.faults = SmtpFaults(reply_delay=3.0, delay_on={"MESSAGE"})
    s = server_settings(faulty_smtp, SMTP_POOL_SIZE="4", SMTP_MAX_MESSAGES_PER_CONNECTION="1")
    async with checked_pool(s, faulty_smtp) as pool:
        await asyncio.gather(*(pool.send(outgoing(i)) for i in range(8)))
        stats = await pool.finish_batch()
        assert stats.connections_opened == 8
    assert subjects(faulty_smtp) == expected_subjects(8)
    assert faulty_smtp.quit_count == 8  # every retired connection said goodbye properly


async def test_a_verdict_timeout_fails_only_its_own_message(faulty_smtp: FaultySmtp) -> None:
    """The first message's verdict comes after SMTP_DATA_TIMEOUT; the second, pipelined
    behind it on the same connection, is still delivered there, not resent elsewhere."""
    faulty_smtp.pipelining = True
    faulty_smtp.faults = SmtpFaults(verdict_delays=(2.0,))
    s = server_settings(faulty_smtp, SMTP_POOL_SIZE="1", SMTP_DATA_TIMEOUT="1")
    async with checked_pool(s, faulty_smtp) as pool:
        # The second waits for the connection and writes behind the first's end of data.
        results = await asyncio.gather(
            pool.send(outgoing(0)), pool.send(outgoing(1)), return_exceptions=True
        )
        assert isinstance(results[0], DeliveryUnknown)
        assert results[1] is None
        assert pool.connections_opened == 1
    assert subjects(faulty_smtp) == expected_subjects(2)  # each accepted exactly once


async def test_the_verdict_may_take_longer_than_smtp_timeout(faulty_smtp: FaultySmtp) -> None:
    """SMTP_TIMEOUT bounds commands; the end-of-data verdict has SMTP_DATA_TIMEOUT.

    (The issue's case is a 40 s verdict against the 30 s default; the same relation at a
    thirtieth of the scale keeps the suite fast: a 2.5 s verdict against SMTP_TIMEOUT=1.)
    """
    faulty_smtp.pipelining = True
    faulty_smtp.faults = SmtpFaults(reply_delay=2.5, delay_on={"MESSAGE"})
    s = server_settings(faulty_smtp, SMTP_TIMEOUT="1", SMTP_DATA_TIMEOUT="20")
    async with checked_pool(s, faulty_smtp) as pool:
        await asyncio.gather(*(pool.send(outgoing(i)) for i in range(3)))
    assert subjects(faulty_smtp) == expected_subjects(3)


# --------------------------------------------------------------------------- silence


async def test_rset_never_answered_fails_the_record_and_frees_the_place(
    faulty_smtp: FaultySmtp,
) -> None:
    refused = "gone@example.com"
    faulty_smtp.faults = SmtpFaults(reject={refused}, never_answer={"RSET"})
    s = server_settings(faulty_smtp, SMTP_POOL_SIZE="1", SMTP_TIMEOUT="0.5")
    async with checked_pool(s, faulty_smtp) as pool:
        with pytest.raises(RecipientRejected):
            await pool.send(outgoing(0, recipient=refused))
        assert faulty_smtp.counts[SmtpFault.SILENT] == 1
        await pool.send(outgoing(1))  # the silent connection was given up; a new one works
        assert pool.connections_opened == 2
    assert subjects(faulty_smtp) == ["message 1"]


async def test_a_noop_never_answered_is_given_up_and_the_email_goes_out(
    faulty_smtp: FaultySmtp,
) -> None:
    s = server_settings(
        faulty_smtp, SMTP_POOL_SIZE="1", SMTP_TIMEOUT="0.5", SMTP_IDLE_CHECK_SECONDS="0"
    )
    async with checked_pool(s, faulty_smtp) as pool:
        await pool.send(outgoing(0))
        faulty_smtp.faults = SmtpFaults(never_answer={"NOOP"})
        await pool.send(outgoing(1))  # the idle check timed out: a fresh connection
        assert pool.connections_opened == 2
    assert subjects(faulty_smtp) == expected_subjects(2)


# --------------------------------------------------------------------------- local errors


async def test_a_deleted_attachment_is_the_records_error_not_the_connections(
    faulty_smtp: FaultySmtp, tmp_path: Path
) -> None:
    path = tmp_path / "frames.zip"
    path.write_bytes(b"x" * 1000)
    gone = with_attachment(0, path, 1000)
    path.unlink()
    s = server_settings(faulty_smtp, SMTP_POOL_SIZE="2")
    async with checked_pool(s, faulty_smtp) as pool:
        await pool.send(outgoing(1))
        with pytest.raises(AttachmentUnreadable, match="FileNotFoundError"):
            await pool.send(gone)
        await pool.send(outgoing(2))
        assert pool.connections_opened == 1  # the connection was never blamed
        assert pool.check().idle == 1
    assert subjects(faulty_smtp) == ["message 1", "message 2"]


async def test_an_attachment_failing_mid_data_spoils_only_its_connection(
    faulty_smtp: FaultySmtp, tmp_path: Path
) -> None:
    path = tmp_path / "frames.zip"
    path.write_bytes(b"x" * 500_000)
    shrinking = with_attachment(0, path, 500_000)
    s = server_settings(faulty_smtp, SMTP_POOL_SIZE="2", SMTP_CHUNK_BYTES="8192")
    async with checked_pool(s, faulty_smtp) as pool:
        path.write_bytes(b"x" * 100_000)  # shorter than the size the message was built for
        with pytest.raises(AttachmentUnreadable, match="AttachmentChanged"):
            await pool.send(shrinking)
        await pool.send(outgoing(1))
        assert pool.connections_opened == 2  # the half-sent message's connection was closed
    assert subjects(faulty_smtp) == ["message 1"]  # the partial message was never accepted


# --------------------------------------------------------------------------- cancellation


async def test_cancellation_at_any_moment_leaves_the_pool_consistent(
    faulty_smtp: FaultySmtp,
) -> None:
    """1,000 sends, each cancelled at a random moment (connecting, waiting for a place,
    NOOP, envelope, data, verdict, QUIT), against a server with random delays on every
    reply; after each one the invariant holds, and then 100 sends all succeed."""
    faulty_smtp.pipelining = True
    faulty_smtp.faults = SmtpFaults(reply_jitter=0.02, rng_seed=7)
    s = server_settings(
        faulty_smtp,
        SMTP_POOL_SIZE="4",
        SMTP_MAX_MESSAGES_PER_CONNECTION="5",
        SMTP_IDLE_CHECK_SECONDS="0.05",
        SMTP_TIMEOUT="2",
    )
    rng = random.Random(1234)
    async with checked_pool(s, faulty_smtp) as pool:

        async def cancelled_send(index: int) -> None:
            task = asyncio.create_task(pool.send(outgoing(index)))
            await asyncio.sleep(rng.uniform(0, 0.08))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            pool.check()

        for wave in range(50):
            await asyncio.gather(*(cancelled_send(wave * 20 + i) for i in range(20)))
            state = pool.check()
            assert state.busy == state.waiting == 0, state
            assert state.places <= 4
            await pool.finish_batch()
            await asyncio.to_thread(faulty_smtp.wait_open_at_most, 4)  # it sees closes late
            assert faulty_smtp.connections_open <= 4
        await assert_quiet(pool, faulty_smtp)
        faulty_smtp.clear()
        faulty_smtp.faults = SmtpFaults()
        await asyncio.gather(*(pool.send(outgoing(i)) for i in range(100)))
    assert subjects(faulty_smtp) == expected_subjects(100)


async def test_a_send_cancelled_while_waiting_for_a_place_takes_none(
    faulty_smtp: FaultySmtp,
) -> None:
    # The one place stays taken until the holder's verdict, a second after its data.
    faulty_smtp.faults = SmtpFaults(reply_delay=1.0, delay_on={"MESSAGE"})
    s = server_settings(faulty_smtp, SMTP_POOL_SIZE="1")
    async with checked_pool(s, faulty_smtp) as pool:
        holder = asyncio.create_task(pool.send(outgoing(0)))
        waiters = [asyncio.create_task(pool.send(outgoing(i))) for i in range(1, 6)]
        await until(lambda: pool.check().waiting == 5)
        assert not holder.done()
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert pool.check().waiting == 0
        await holder
        await pool.send(outgoing(6))
        assert pool.connections_opened == 1
    assert subjects(faulty_smtp) == ["message 0", "message 6"]
