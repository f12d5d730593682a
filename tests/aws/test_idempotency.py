"""Idempotency: one email per notification, within a batch and across deliveries.

The DynamoDB store runs against moto in server mode (real DynamoDB JSON protocol), and the
"unreachable" case against a loopback port where nothing listens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import pytest
from aiobotocore.config import AioConfig
from servers import REGION, MotoServer, free_port

from async_notifier.aws.idempotency import DynamoIdempotencyStore, create_table, idempotency_key
from async_notifier.batch.dedup import InBatchDeduplicator
from async_notifier.errors import (
    DeliveryUnknown,
    IdempotencyUnavailable,
    NotifierError,
    OriginalCancelled,
    RecipientRejected,
    SmtpUnavailable,
    TransientError,
)

TABLE = "notifier-idempotency"
IDENTITY = "ab" * 32
KEY = idempotency_key(IDENTITY)  # the item's id in the table


class Clock:
    """A settable clock for the store: expiry is tested without sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def dynamodb(aws: MotoServer) -> AsyncIterator[Any]:
    async with aioboto3.Session().client(
        "dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION
    ) as client:
        await create_table(client, TABLE)
        yield client


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(dynamodb: Any, clock: Clock) -> DynamoIdempotencyStore:
    return DynamoIdempotencyStore(dynamodb, TABLE, ttl_seconds=3600, clock=clock)


def test_key_is_versioned_identity() -> None:
    assert idempotency_key("0f" * 32) == "v1:" + "0f" * 32
    with pytest.raises(ValueError, match="empty"):
        idempotency_key("")


# --------------------------------------------------------------------------- in a batch


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


# --------------------------------------------------------------------------- DynamoDB


async def test_create_table_enables_ttl_and_is_idempotent(dynamodb: Any) -> None:
    await create_table(dynamodb, TABLE)  # the fixture created it already

    table = (await dynamodb.describe_table(TableName=TABLE))["Table"]
    assert table["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    ttl = (await dynamodb.describe_time_to_live(TableName=TABLE))["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}


async def test_second_begin_sees_the_claim_in_progress(
    store: DynamoIdempotencyStore, dynamodb: Any, clock: Clock
) -> None:
    assert await store.begin(IDENTITY, clock.now + 300) == "new"
    assert await store.begin(IDENTITY, clock.now + 300) == "in_progress"

    item = (await dynamodb.get_item(TableName=TABLE, Key={"id": {"S": KEY}}))["Item"]
    assert item["status"] == {"S": "IN_PROGRESS"}
    assert item["expires_at"] == {"N": str(int(clock.now + 300))}
    assert await store.begin("cd" * 32, clock.now + 300) == "new"


async def test_completed_key_is_remembered_for_the_ttl(
    store: DynamoIdempotencyStore, dynamodb: Any, clock: Clock
) -> None:
    assert await store.begin(IDENTITY, clock.now + 300) == "new"
    clock.now += 10

    await store.complete(IDENTITY)

    assert await store.begin(IDENTITY, clock.now + 300) == "completed"
    item = (await dynamodb.get_item(TableName=TABLE, Key={"id": {"S": KEY}}))["Item"]
    assert item["status"] == {"S": "COMPLETED"}
    assert item["expires_at"] == {"N": str(int(clock.now + 3600))}
    # Until DynamoDB's TTL sweep deletes it, an expired COMPLETED still prevents a resend.
    clock.now += 7200
    assert await store.begin(IDENTITY, clock.now + 300) == "completed"


async def test_expired_claim_can_be_taken_over(store: DynamoIdempotencyStore, clock: Clock) -> None:
    assert await store.begin(IDENTITY, clock.now + 300) == "new"
    clock.now += 299
    assert await store.begin(IDENTITY, clock.now + 300) == "in_progress"

    clock.now += 2  # the first invocation's deadline has passed: it is gone

    assert await store.begin(IDENTITY, clock.now + 300) == "new"
    assert await store.begin(IDENTITY, clock.now + 300) == "in_progress"


async def test_release_lets_the_record_retry_at_once(
    store: DynamoIdempotencyStore, clock: Clock
) -> None:
    assert await store.begin(IDENTITY, clock.now + 300) == "new"

    await store.release(IDENTITY)

    assert await store.begin(IDENTITY, clock.now + 300) == "new"
    await store.release("ef" * 32)  # nothing to release: no error


async def test_release_never_drops_a_completed_key(store: DynamoIdempotencyStore) -> None:
    assert await store.begin(IDENTITY, 2e9) == "new"
    await store.complete(IDENTITY)

    await store.release(IDENTITY)

    assert await store.begin(IDENTITY, 2e9) == "completed"


class _WithoutOldItem:
    """Real moto client, minus the old item on a failed condition (older DynamoDB emulators)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.get_item_calls = 0

    async def put_item(self, **kwargs: Any) -> Any:
        try:
            return await self._client.put_item(**kwargs)
        except Exception as exc:
            getattr(exc, "response", {}).pop("Item", None)
            raise

    async def get_item(self, **kwargs: Any) -> Any:
        assert kwargs["ConsistentRead"] is True
        self.get_item_calls += 1
        return await self._client.get_item(**kwargs)


async def test_begin_reads_the_item_when_the_failure_does_not_carry_it(
    dynamodb: Any, clock: Clock
) -> None:
    client = _WithoutOldItem(dynamodb)
    store = DynamoIdempotencyStore(client, TABLE, clock=clock)
    assert await store.begin(IDENTITY, clock.now + 300) == "new"
    assert await store.begin(IDENTITY, clock.now + 300) == "in_progress"
    await store.complete(IDENTITY)
    assert await store.begin(IDENTITY, clock.now + 300) == "completed"
    assert client.get_item_calls == 2


async def test_missing_table_is_unavailable(dynamodb: Any) -> None:
    store = DynamoIdempotencyStore(dynamodb, "no-such-table")
    with pytest.raises(IdempotencyUnavailable, match="ResourceNotFound") as caught:
        await store.begin(IDENTITY, 2e9)
    assert caught.value.transient
    assert caught.value.kind == "idempotency_unavailable"


async def test_unreachable_store_fails_every_operation(aws: MotoServer) -> None:
    config = AioConfig(
        connect_timeout=1, read_timeout=1, retries={"total_max_attempts": 1, "mode": "standard"}
    )
    async with aioboto3.Session().client(
        "dynamodb",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region_name=REGION,
        config=config,
    ) as client:
        store = DynamoIdempotencyStore(client, TABLE)
        with pytest.raises(IdempotencyUnavailable, match="PutItem"):
            await store.begin(IDENTITY, 2e9)
        with pytest.raises(IdempotencyUnavailable, match="PutItem"):
            await store.complete(IDENTITY)
        with pytest.raises(IdempotencyUnavailable, match="DeleteItem"):
            await store.release(IDENTITY)
