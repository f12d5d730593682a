"""run_batch (the processor's records) on its own: outcomes, order, and what a big batch keeps.

The delivery here is the test's own function (the real one's peers are covered by the
end-to-end tests); what is under test is the batch runner's bookkeeping.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import tracemalloc
from typing import Any

import pytest

from async_notifier.batch.outcome import BatchResult, DeadLetter, Outcome, Retry
from async_notifier.batch.processor import Batch, run_batch
from async_notifier.errors import BadMessage, DownloadFailed
from async_notifier.logs import LOGGER_NAME
from async_notifier.messages import SqsRecord


def record(n: int) -> dict[str, Any]:
    return {"messageId": f"m{n}", "body": json.dumps({"n": n}), "attributes": {}}


async def deliver(rec: SqsRecord) -> Outcome:
    n = json.loads(rec.body)["n"]
    await asyncio.sleep(0.001 * (n % 3))  # finish out of order
    if n % 10 == 3:
        return Outcome(rec.message_id, error=BadMessage(f"bad {n}"), record=rec, bytes=100)
    if n % 10 == 7:
        error = DownloadFailed(f"reset {n}")
        return Outcome(rec.message_id, error=error, record=rec, bytes=100, retries=2)
    if n % 10 == 5:
        return Outcome(rec.message_id, action="sent_link", bytes=100, retries=1)
    return Outcome(rec.message_id, action="sent", bytes=100)


async def test_failures_in_batch_order_and_a_tally_of_the_rest() -> None:
    result = await run_batch(Batch.parse([record(n) for n in range(1000)]), deliver, concurrency=32)
    failed = [n for n in range(1000) if n % 10 in (3, 7)]
    assert [o.message_id for o in result.errors] == [f"m{n}" for n in failed]
    assert result.response() == {"batchItemFailures": [{"itemIdentifier": f"m{n}"} for n in failed]}
    assert result.records == 1000
    delivered = result.delivered
    assert delivered.count == 800
    assert delivered.actions == {"sent": 700, "sent_link": 100}
    assert delivered.bytes_attached == 700 * 100  # links are not attachments
    assert (delivered.retried, delivered.retries) == (100, 100)
    # A failure keeps its record (dead-letter queue, retry back-off need it); nothing else does.
    assert all(o.record is not None and o.record.message_id == o.message_id for o in result.errors)


async def test_successes_keep_no_per_record_state(caplog: pytest.LogCaptureFixture) -> None:
    """10,000 good records: what the batch still holds when it returns is counts, not
    10,000 outcomes (they took about 400 bytes a record before).

    Logging stays at WARNING here, whatever earlier tests left: pytest keeps every record
    logged during a test (14 MB of "record done" lines), and that memory is not the batch's.
    """
    caplog.set_level(logging.WARNING, logger=LOGGER_NAME)
    records = [record(n * 10) for n in range(10_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        result = await run_batch(Batch.parse(records), deliver, concurrency=64)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert result.errors == []
    assert result.delivered.count == 10_000
    assert held < 10_000 * 20, f"{held} bytes held after the batch"


def test_of_sorts_outcomes_into_failures_and_tally() -> None:
    ok = Outcome("a", action="sent", bytes=5)
    bad = Outcome("b", error=BadMessage("x"))
    worse = Outcome("c", error=DownloadFailed("y"))
    result = BatchResult.of([ok, bad, worse])
    assert result.records == 3
    assert result.errors == [bad, worse]
    assert result.failures == [bad, worse]  # before the fates are settled: every failure
    result.fates = [DeadLetter("bad_message: x"), Retry(30)]
    assert result.failures == [worse]  # dead-lettered counts as acknowledged
    assert result.dead_lettered == [bad]
    assert result.delivered.bytes_attached == 5


async def test_a_delivery_that_raises_fails_only_its_record() -> None:
    async def flaky(rec: SqsRecord) -> Outcome:
        if rec.message_id == "m1":
            raise KeyError("a bug")
        return Outcome(rec.message_id, action="sent")

    result = await run_batch(Batch.parse([record(n) for n in range(3)]), flaky, concurrency=2)
    [failed] = result.errors
    assert (failed.message_id, failed.error and failed.error.kind) == ("m1", "internal")
    assert failed.record is not None  # kept for the back-off
    assert result.delivered.count == 2
