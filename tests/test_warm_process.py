"""Many invocations in one warm process, the way Lambda reuses a sandbox for hours.

A deadline that cuts sends off at the wrong moment, or a server that restarts, must cost
the records of that invocation at most: the next invocation of the same process, against
a healthy server, delivers everything. After every invocation the pool's invariant holds
(`SmtpPool.check`) and the server holds no more connections than SMTP_POOL_SIZE.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any

import pytest
from faults import FaultySmtp, SmtpFaults
from servers import FakeLambdaContext, sqs_record

import handler

POOL_SIZE = 2
pytestmark = pytest.mark.usefixtures("faulty_lambda_env")


def batch(tag: str, count: int) -> list[dict[str, Any]]:
    """FAILED-status notifications: an email each, no download (SMTP is what is tested)."""
    return [
        sqs_record(
            {
                "video_id": f"{tag}-{i}",
                "status": "FAILED",
                "email": f"user{i}@example.com",
                "message": "decoder error",
            },
            f"{tag}-{i}",
        )
        for i in range(count)
    ]


def invoke(records: list[dict[str, Any]], context: FakeLambdaContext) -> set[str]:
    result = handler.lambda_handler({"Records": records}, context)
    failed = {item["itemIdentifier"] for item in result["batchItemFailures"]}
    assert failed <= {r["messageId"] for r in records}
    check_pool()
    assert context.get_remaining_time_in_millis() > 0, "Lambda would have killed the batch"
    return failed


def check_pool() -> None:
    notifier = handler.process.notifier
    assert notifier is not None
    pool = notifier.backend.pool  # type: ignore[attr-defined]
    assert pool is not None
    state = pool.check()
    assert (state.busy, state.waiting, state.connecting) == (0, 0, 0), state
    assert state.places <= POOL_SIZE


def delivered(server: FaultySmtp, tag: str) -> Counter[str]:
    """How many times the server accepted each email of the batch `tag` (by X-Video-Id)."""
    ids = [str(m["X-Video-Id"]) for m in server.parsed()]
    return Counter(i for i in ids if i.startswith(f"{tag}-"))


def settled(server: FaultySmtp) -> int:
    """The server's open connections once it has seen the client's closes."""
    with contextlib.suppress(TimeoutError):  # the caller's assertion reports the count
        server.wait_open_at_most(POOL_SIZE, timeout=5)
    return server.connections_open


def test_deadline_storms_never_wedge_a_warm_process(
    faulty_smtp: FaultySmtp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Warm connections idle past SMTP_IDLE_CHECK_SECONDS, a provider that takes 4 s per
    NOOP and MAIL, and a 6 s invocation: the deadline cancels the sends mid-check. Then
    the provider is fast again, and the same process delivers the next batch in full.
    Three rounds in a row."""
    monkeypatch.setenv("SMTP_POOL_SIZE", str(POOL_SIZE))
    faulty_smtp.pipelining = True
    handler_env = {"SMTP_IDLE_CHECK_SECONDS": "0", "SMTP_TIMEOUT": "30"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in handler_env.items():
            patch.setenv(name, value)
        for round_ in range(3):
            faulty_smtp.faults = SmtpFaults()
            assert invoke(batch(f"warm{round_}", 4), FakeLambdaContext()) == set()

            faulty_smtp.faults = SmtpFaults(reply_delay=4.0, delay_on={"NOOP", "MAIL"})
            slow = batch(f"slow{round_}", 6)
            failed = invoke(slow, FakeLambdaContext(remaining_ms=6_000))
            sent = delivered(faulty_smtp, f"slow{round_}")
            assert failed | set(sent) == {r["messageId"] for r in slow}
            assert not failed & set(sent), "a record both delivered and reported failed"

            faulty_smtp.faults = SmtpFaults()
            fast = batch(f"fast{round_}", 20)
            assert invoke(fast, FakeLambdaContext(remaining_ms=30_000)) == set()
            assert delivered(faulty_smtp, f"fast{round_}") == Counter(r["messageId"] for r in fast)
            assert settled(faulty_smtp) <= POOL_SIZE


def test_a_restarted_smtp_server_costs_no_record(
    faulty_smtp: FaultySmtp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server restarts between invocations (every pooled connection dropped): the
    next invocation notices, replaces them, and delivers every record."""
    monkeypatch.setenv("SMTP_POOL_SIZE", str(POOL_SIZE))
    faulty_smtp.pipelining = True
    for round_ in range(3):
        records = batch(f"r{round_}", 6)
        assert invoke(records, FakeLambdaContext()) == set()
        assert delivered(faulty_smtp, f"r{round_}") == Counter(r["messageId"] for r in records)
        faulty_smtp.restart()
    assert faulty_smtp.connections_open == 0
