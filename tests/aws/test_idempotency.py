"""Idempotency across deliveries: the DynamoDB store's claims, their expiry and release.

The DynamoDB store runs against moto in server mode (real DynamoDB JSON protocol), and the
"unreachable" case against a loopback port where nothing listens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import pytest
from aiobotocore.config import AioConfig
from servers import REGION, MotoServer, free_port

from async_notifier.aws.idempotency import DynamoIdempotencyStore, idempotency_key
from async_notifier.aws.tables import create_table
from async_notifier.errors import IdempotencyUnavailable

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
