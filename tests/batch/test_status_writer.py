"""`StatusWriter`'s batching of the worker's verdicts, against a scripted store.

The store here is a stand-in only because no real peer can be made to do what these tests
need: DynamoDB (and moto) never leaves items of a BatchWriteItem unprocessed on demand. The
store itself is tested against moto in tests/aws/test_status.py, and the writer end to end
in tests/test_delivery_status.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from async_notifier.batch.status import StatusWriter
from async_notifier.delivery_status import State, StatusChange, StatusWrite


def verdict(n: int, state: State = "accepted", source: str = "worker") -> StatusChange:
    return StatusChange(
        tracking_id=f"{n:040x}",
        state=state,
        at_ms=1_800_000_000_000 + n,
        source=source,  # type: ignore[arg-type]
        event_id=f"{state}:m{n}:1",
    )


class ScriptedStore:
    """Records each call; leaves the first `unprocessed` changes of each of the first
    `stingy_calls` batch calls unwritten, as DynamoDB does under load."""

    max_batch = 25

    def __init__(self, *, unprocessed: int = 0, stingy_calls: int = 0) -> None:
        self.batches: list[list[str]] = []
        self.singles: list[str] = []
        self.stored: set[str] = set()
        self.called = asyncio.Event()
        self._unprocessed = unprocessed
        self._stingy_calls = stingy_calls

    async def write(self, change: StatusChange) -> StatusWrite:
        await asyncio.sleep(0)
        self.singles.append(change.event_id)
        self.stored.add(change.event_id)
        return StatusWrite("current", None)

    async def write_batch(self, changes: Sequence[StatusChange]) -> list[StatusChange]:
        await asyncio.sleep(0)
        assert len(changes) <= self.max_batch
        self.batches.append([c.event_id for c in changes])
        self.called.set()
        left = list(changes[: self._unprocessed]) if len(self.batches) <= self._stingy_calls else []
        self.stored.update(c.event_id for c in changes if c not in left)
        return left


async def test_verdicts_queued_during_a_batch_go_25_to_a_call() -> None:
    store = ScriptedStore()
    writer = StatusWriter(store, None, None, linger=0.2)
    for n in range(60):
        writer.add(verdict(n))
    await writer.close()
    assert [len(batch) for batch in store.batches] == [25, 25, 10]
    assert store.singles == []
    assert (writer.counts.written, writer.counts.failed) == (60, 0)
    assert len(store.stored) == 60


async def test_a_verdict_alone_waits_no_longer_than_the_linger() -> None:
    store = ScriptedStore()
    writer = StatusWriter(store, None, None, linger=0.05)
    writer.add(verdict(1))
    async with asyncio.timeout(30):  # written without close(): the linger ran out
        await store.called.wait()
    assert store.batches == [["accepted:m1:1"]]
    writer.add(verdict(2))
    await writer.close()
    assert store.batches[-1] == ["accepted:m2:1"]
    assert writer.counts.written == 2


async def test_unprocessed_verdicts_are_tried_again() -> None:
    store = ScriptedStore(unprocessed=5, stingy_calls=1)
    writer = StatusWriter(store, None, None, retry_delay=0.001)
    for n in range(25):
        writer.add(verdict(n))
    await writer.close()
    assert [len(batch) for batch in store.batches] == [25, 5]
    assert store.batches[1] == store.batches[0][:5]
    assert (writer.counts.written, writer.counts.failed) == (25, 0)
    assert len(store.stored) == 25


async def test_verdicts_still_unprocessed_after_every_try_are_counted_failed() -> None:
    store = ScriptedStore(unprocessed=3, stingy_calls=99)
    writer = StatusWriter(store, None, None, attempts=3, retry_delay=0.001)
    for n in range(10):
        writer.add(verdict(n))
    await writer.close()
    assert [len(batch) for batch in store.batches] == [10, 3, 3]
    assert (writer.counts.written, writer.counts.failed) == (7, 3)
    assert len(store.stored) == 7


async def test_ses_changes_go_one_by_one() -> None:
    store = ScriptedStore()
    writer = StatusWriter(store, None, None, linger=0.2)
    writer.add(verdict(1, "delivered", source="ses"))
    writer.add(verdict(2, "delivered", source="ses"))
    await writer.close()
    assert store.singles == ["delivered:m1:1", "delivered:m2:1"]
    assert store.batches == []
    assert writer.counts.written == 2


async def test_a_short_tail_waits_for_more_while_the_batch_runs() -> None:
    """30 queued: 25 go at once, the other 5 wait (a long linger) for 20 more to fill a
    second full call, rather than going as a call of 5."""
    store = ScriptedStore()
    writer = StatusWriter(store, None, None, linger=60)
    for n in range(30):
        writer.add(verdict(n))
    async with asyncio.timeout(30):
        await store.called.wait()
    store.called.clear()
    for n in range(30, 50):
        writer.add(verdict(n))
    async with asyncio.timeout(30):
        await store.called.wait()
    assert [len(batch) for batch in store.batches] == [25, 25]
    await writer.close()
    assert writer.counts.written == 50
