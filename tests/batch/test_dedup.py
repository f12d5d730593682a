"""Idempotency within a batch: a notification delivered twice in one batch is worked on once,
and every duplicate shares the first record's outcome (or its cancellation)."""

from __future__ import annotations

import asyncio

import pytest

from async_notifier.batch.dedup import InBatchDeduplicator
from async_notifier.errors import (
    DeliveryUnknown,
    NotifierError,
    OriginalCancelled,
    RecipientRejected,
    SmtpUnavailable,
    TransientError,
)


async def _owner_and_waiters(
    dedup: InBatchDeduplicator, identity: str, waiters: int
) -> list[asyncio.Future[NotifierError | None]]:
    assert dedup.claim(identity) is None
    futures = [dedup.claim(identity) for _ in range(waiters)]
    assert all(f is not None and not f.done() for f in futures)
    return [f for f in futures if f is not None]


async def test_duplicates_are_acknowledged_when_the_first_is_delivered() -> None:
    dedup = InBatchDeduplicator()
    futures = await _owner_and_waiters(dedup, "id-1", 3)
    assert dedup.claim("id-2") is None  # another notification is independent

    dedup.resolve("id-1", None)

    assert [await f for f in futures] == [None, None, None]
    late = dedup.claim("id-1")  # a duplicate that arrives after the first finished
    assert late is not None
    assert await late is None


async def test_duplicates_fail_like_the_first() -> None:
    dedup = InBatchDeduplicator()
    futures = await _owner_and_waiters(dedup, "id-1", 2)
    error = RecipientRejected("550 no such user")

    dedup.resolve("id-1", error)
    dedup.resolve("id-1", None)  # only the first outcome counts

    assert [await f for f in futures] == [error, error]


async def test_run_shares_the_outcome_and_does_the_work_once() -> None:
    dedup = InBatchDeduplicator()
    release = asyncio.Event()
    calls = 0

    async def send() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "sent"

    tasks = [asyncio.create_task(dedup.run("id-1", send)) for _ in range(4)]
    await asyncio.sleep(0)  # let every task claim before the first finishes
    release.set()

    assert await asyncio.gather(*tasks) == ["sent", None, None, None]
    assert calls == 1


async def test_run_raises_the_first_records_error_class_in_duplicates() -> None:
    dedup = InBatchDeduplicator()
    started = asyncio.Event()

    async def send() -> None:
        started.set()
        await asyncio.sleep(0)
        raise DeliveryUnknown("connection lost after DATA")

    owner = asyncio.create_task(dedup.run("id-1", send))
    await started.wait()
    duplicate = asyncio.create_task(dedup.run("id-1", send))

    with pytest.raises(DeliveryUnknown, match="after DATA") as first:
        await owner
    with pytest.raises(DeliveryUnknown, match="same notification") as second:
        await duplicate
    assert first.value is not second.value
    assert second.value.transient


async def test_cancelling_the_first_record_releases_its_duplicates() -> None:
    dedup = InBatchDeduplicator()
    started = asyncio.Event()

    async def stalls() -> None:
        started.set()
        await asyncio.Event().wait()  # like a stalled SMTP server

    owner = asyncio.create_task(dedup.run("id-1", stalls))
    await started.wait()
    duplicates = [asyncio.create_task(dedup.run("id-1", stalls)) for _ in range(2)]
    await asyncio.sleep(0)

    owner.cancel()  # the deadline cancels unfinished records

    with pytest.raises(asyncio.CancelledError):
        await owner
    results = await asyncio.gather(*duplicates, return_exceptions=True)
    assert all(isinstance(r, OriginalCancelled) for r in results)
    assert all(isinstance(r, TransientError) for r in results)


async def test_cancelling_one_waiter_leaves_the_others_waiting() -> None:
    dedup = InBatchDeduplicator()
    first, second = await _owner_and_waiters(dedup, "id-1", 2)

    async def wait(future: asyncio.Future[NotifierError | None]) -> NotifierError | None:
        return await future

    cancelled = asyncio.create_task(wait(first))
    waiting = asyncio.create_task(wait(second))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    dedup.resolve("id-1", None)

    assert await waiting is None
    assert cancelled.cancelled()


async def test_resolve_pending_unblocks_every_waiter() -> None:
    dedup = InBatchDeduplicator()
    futures = [
        *(await _owner_and_waiters(dedup, "id-1", 1)),
        *(await _owner_and_waiters(dedup, "id-2", 1)),
    ]
    dedup.resolve("id-2", None)

    dedup.resolve_pending(SmtpUnavailable("batch ended"))

    first, second = [await f for f in futures]
    assert isinstance(first, SmtpUnavailable)
    assert second is None
