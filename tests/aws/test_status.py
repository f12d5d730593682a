"""The delivery-status store (DynamoDB on moto), its reader, and the status topic (SNS on
moto, read back through a subscriber's SQS queue): precedence whatever the order of the
writes, idempotent events, the item's shape, and the published events' schema."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aioboto3
import pytest
from servers import REGION, MotoServer
from status_events import Subscriber, validator

from async_notifier.aws.status import (
    VIDEO_INDEX,
    DynamoStatusReader,
    DynamoStatusStore,
    create_status_table,
    tracking_id_from,
)
from async_notifier.aws.status_topic import SnsStatusTopic
from async_notifier.delivery_status import (
    RANK,
    STATES,
    TERMINAL,
    State,
    StatusChange,
    status_event,
    supersedes,
)
from async_notifier.errors import StatusUnavailable

TABLE = "notifier-status"
TRACKING = "0123456789abcdef0123456789abcdef01234567"
NOW = 1_800_000_000.0


@pytest.fixture
async def dynamodb(aws: MotoServer) -> AsyncIterator[Any]:
    async with aioboto3.Session().client(
        "dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION
    ) as client:
        await create_status_table(client, TABLE)
        yield client


@pytest.fixture
def store(dynamodb: Any) -> DynamoStatusStore:
    return DynamoStatusStore(dynamodb, TABLE, ttl_seconds=3600, clock=lambda: NOW)


@pytest.fixture
def reader(dynamodb: Any) -> DynamoStatusReader:
    return DynamoStatusReader(dynamodb, TABLE)


def change(state: State, at: float, *, source: str = "", **fields: Any) -> StatusChange:
    who = source or ("worker" if RANK[state] == 1 else "ses")
    return StatusChange(
        tracking_id=fields.pop("tracking_id", TRACKING),
        state=state,
        at_ms=round(at * 1000),
        source=who,  # type: ignore[arg-type]
        event_id=fields.pop("event_id", f"{state}:{at}"),
        **fields,
    )


ACCEPTED = change(
    "accepted", NOW - 10, video_id="v1", provider_id="ses-1", transport="smtp", attempt=1
)
DELIVERED = change("delivered", NOW - 5, video_id="v1", provider_id="ses-1")


# --------------------------------------------------------------------------- the rules


def test_precedence_ranks_ses_over_the_worker_and_ties_by_time() -> None:
    assert supersedes(RANK["delivered"], 1, RANK["accepted"], 2)  # a late accept loses
    assert not supersedes(RANK["accepted"], 2, RANK["delivered"], 1)
    assert not supersedes(RANK["delayed"], 9, RANK["delivered"], 1)
    assert supersedes(RANK["complained"], 9, RANK["delivered"], 1)
    assert supersedes(RANK["accepted"], 9, RANK["dead_lettered"], 1)  # redriven, then sent
    assert not supersedes(RANK["failed"], 1, RANK["accepted"], 9)
    assert supersedes(RANK["accepted"], 1, None, None)
    assert set(STATES) == set(RANK)
    assert "accepted" not in TERMINAL
    assert "delayed" not in TERMINAL


@pytest.mark.parametrize(
    "text",
    [TRACKING, TRACKING.upper(), f"<{TRACKING}@example.com>", f" {TRACKING}@example.com "],
)
def test_a_tracking_id_is_found_in_a_message_id(text: str) -> None:
    assert tracking_id_from(text) == TRACKING


@pytest.mark.parametrize("text", ["", "v1", TRACKING[:-1], f"<{TRACKING}0@x>", "ana@example.com"])
def test_anything_else_is_not_a_tracking_id(text: str) -> None:
    assert tracking_id_from(text) is None


# --------------------------------------------------------------------------- the store


async def test_create_table_makes_the_video_index_and_ttl(dynamodb: Any) -> None:
    await create_status_table(dynamodb, TABLE)  # again: idempotent
    table = (await dynamodb.describe_table(TableName=TABLE))["Table"]
    assert table["KeySchema"] == [
        {"AttributeName": "id", "KeyType": "HASH"},
        {"AttributeName": "event", "KeyType": "RANGE"},
    ]
    [index] = table["GlobalSecondaryIndexes"]
    assert index["IndexName"] == VIDEO_INDEX
    ttl = (await dynamodb.describe_time_to_live(TableName=TABLE))["TimeToLiveDescription"]
    assert ttl["AttributeName"] == "expires_at"


async def test_a_delivery_written_before_the_acceptance_is_not_overwritten(
    store: DynamoStatusStore, reader: DynamoStatusReader
) -> None:
    first = await store.write(DELIVERED)
    assert (first.result, first.known) == ("current", False)  # SES was quicker
    late = await store.write(ACCEPTED)
    assert late.result == "history"
    assert late.before is not None
    assert late.before.status == "delivered"

    record = await reader.get(TRACKING)
    assert record is not None
    assert (record.status, record.status_at_ms) == ("delivered", DELIVERED.at_ms)
    assert [e.state for e in record.history] == ["accepted", "delivered"]  # in time order
    # What the acceptance knew and SES did not is kept.
    assert (record.transport, record.attempts, record.provider_id) == ("smtp", 1, "ses-1")
    assert record.video_id == "v1"
    assert record.terminal


async def test_in_order_each_change_becomes_the_status(
    store: DynamoStatusStore, reader: DynamoStatusReader
) -> None:
    assert (await store.write(ACCEPTED)).result == "current"
    delayed = change("delayed", NOW - 8, reason="delay:MailboxFull")
    assert (await store.write(delayed)).result == "current"
    record = await reader.get(TRACKING)
    assert record is not None
    assert (record.status, record.reason) == ("delayed", "delay:MailboxFull")
    assert (await store.write(DELIVERED)).result == "current"
    record = await reader.get(TRACKING)
    assert record is not None
    assert (record.status, record.reason) == ("delivered", None)  # the delay's reason goes
    complaint = change("complained", NOW - 1, reason="complaint:abuse")
    assert (await store.write(complaint)).result == "current"
    # A delay SES reports late stays in the history only.
    assert (await store.write(change("delayed", NOW - 9))).result == "history"
    record = await reader.get(TRACKING)
    assert record is not None
    assert record.status == "complained"
    assert [e.state for e in record.history] == [  # in time order, not arrival order
        "accepted",
        "delayed",
        "delayed",
        "delivered",
        "complained",
    ]


async def test_the_same_event_twice_is_recorded_once(
    store: DynamoStatusStore, reader: DynamoStatusReader
) -> None:
    assert (await store.write(DELIVERED)).result == "current"
    again = await store.write(DELIVERED)
    assert again.result == "duplicate"
    assert (await store.write(ACCEPTED)).result == "history"
    assert (await store.write(ACCEPTED)).result == "duplicate"  # a duplicate that lost too
    record = await reader.get(TRACKING)
    assert record is not None
    assert len(record.history) == 2


async def test_the_latest_attempt_speaks_among_the_workers_verdicts(
    store: DynamoStatusStore, reader: DynamoStatusReader
) -> None:
    """Dead-lettered, then redriven and accepted: accepted (an older verdict loses)."""
    dead = change("dead_lettered", NOW - 100, reason="object_unavailable: no such key")
    await store.write(dead)
    await store.write(change("accepted", NOW - 50, attempt=1, transport="ses"))
    assert (await store.write(change("failed", NOW - 200))).result == "history"
    record = await reader.get(TRACKING)
    assert record is not None
    assert (record.status, record.transport, record.reason) == ("accepted", "ses", None)


async def test_each_change_is_an_item_holding_no_address_that_expires(
    store: DynamoStatusStore, dynamodb: Any
) -> None:
    await store.write(
        change("suppressed", NOW, reason="suppressed: addr-1234567890 is on the suppression list")
    )
    await store.write_batch([ACCEPTED])
    items = (await dynamodb.scan(TableName=TABLE))["Items"]
    assert sorted(item["event"]["S"] for item in items) == sorted(
        [f"suppressed:{NOW}", ACCEPTED.event_id]
    )
    assert "@" not in json.dumps(items)
    assert {item["expires_at"]["N"] for item in items} == {str(int(NOW) + 3600)}
    assert {item["id"]["S"] for item in items} == {TRACKING}


async def test_the_workers_verdicts_go_25_to_a_call_and_fold_like_single_writes(
    store: DynamoStatusStore, reader: DynamoStatusReader
) -> None:
    """60 verdicts of 60 notifications in 3 BatchWriteItem calls; each reads back as the
    same change written alone would (an SES change, written by `write`, shows it)."""
    verdicts = [
        change("accepted", NOW, tracking_id=f"{n:040x}", video_id="v9", provider_id=f"p-{n}",
               transport="smtp", attempt=1, notification_id=f"n-{n}")
        for n in range(60)
    ]  # fmt: skip
    calls = store.calls
    for start in range(0, 60, store.max_batch):
        assert await store.write_batch(verdicts[start : start + store.max_batch]) == []
    assert store.calls == calls + 3
    alone = replace(verdicts[0], tracking_id="f" * 40, source="ses")
    await store.write(alone)
    batched, single = await reader.get(f"{0:040x}"), await reader.get("f" * 40)
    assert batched is not None
    assert single is not None
    assert replace(batched, tracking_id="", created_at_ms=0, updated_at_ms=0, history=()) == (
        replace(single, tracking_id="", created_at_ms=0, updated_at_ms=0, history=())
    )
    assert [(e.state, e.at_ms, e.transport) for e in batched.history] == [
        (e.state, e.at_ms, e.transport) for e in single.history
    ]
    assert len(await reader.for_video("v9")) == 61
    # The same verdict again is the same item: nothing new.
    assert await store.write_batch([verdicts[0], verdicts[0]]) == []
    again = await reader.get(f"{0:040x}")
    assert again is not None
    assert len(again.history) == 1
    with pytest.raises(ValueError, match="at most 25"):
        await store.write_batch(verdicts[:26])


async def test_a_later_attempts_verdict_becomes_the_status_over_a_batched_one(
    store: DynamoStatusStore, reader: DynamoStatusReader
) -> None:
    await store.write_batch([change("accepted", NOW, attempt=1, transport="smtp")])
    again = await store.write(change("failed", NOW + 1, reason="bad_message: x", attempt=2))
    assert again.result == "current"
    assert again.before is not None
    assert again.before.status == "accepted"
    record = await reader.get(TRACKING)
    assert record is not None
    assert (record.status, record.reason, record.attempts) == ("failed", "bad_message: x", 2)
    assert record.transport == "smtp"  # the failed attempt did not say: the latest that did


async def test_a_video_lists_its_notifications_oldest_first(
    dynamodb: Any, reader: DynamoStatusReader
) -> None:
    for index, tracking in enumerate(("a" * 40, "b" * 40, "c" * 40)):
        clock_at = NOW + index
        store = DynamoStatusStore(dynamodb, TABLE, clock=lambda at=clock_at: at)
        video = "v2" if tracking == "b" * 40 else "v1"
        await store.write_batch(
            [change("accepted", clock_at, tracking_id=tracking, video_id=video)]
        )
        # SES's later word names no video: the notification is listed once, as it is now.
        await store.write(change("delivered", clock_at + 5, tracking_id=tracking))
    found = await reader.for_video("v1")
    assert [r.tracking_id for r in found] == ["a" * 40, "c" * 40]
    assert {r.status for r in found} == {"delivered"}
    assert [r.tracking_id for r in await reader.for_video("v2")] == ["b" * 40]
    assert await reader.for_video("nothing") == []
    assert await reader.get("d" * 40) is None
    with pytest.raises(ValueError, match="not a tracking id"):
        await reader.get("v1")


async def test_a_missing_table_is_unavailable(dynamodb: Any) -> None:
    store = DynamoStatusStore(dynamodb, "no-such-table")
    with pytest.raises(StatusUnavailable, match="ResourceNotFoundException"):
        await store.write(ACCEPTED)
    with pytest.raises(StatusUnavailable, match="ResourceNotFoundException"):
        await store.write_batch([ACCEPTED])
    with pytest.raises(StatusUnavailable):
        await DynamoStatusReader(dynamodb, "no-such-table").get(TRACKING)


# --------------------------------------------------------------------------- the topic


async def test_published_events_follow_the_schema_and_carry_filterable_attributes(
    aws: MotoServer,
) -> None:
    subscriber = Subscriber(aws.endpoint_url)
    events = [
        status_event(ACCEPTED),
        status_event(change("bounced", NOW, reason="bounce:Permanent:General")),
    ]
    async with aioboto3.Session().client(
        "sns", endpoint_url=aws.endpoint_url, region_name=REGION
    ) as sns:
        topic = SnsStatusTopic(sns, subscriber.topic_arn)
        assert await topic.publish(events) == 0
        with pytest.raises(ValueError, match="at most 10"):
            await topic.publish(events * 6)
        missing = SnsStatusTopic(sns, subscriber.topic_arn + "-gone")
        with pytest.raises(StatusUnavailable, match="PublishBatch"):
            await missing.publish(events)
    received = subscriber.events(expected=2)
    assert sorted(e["status"] for e in received) == ["accepted", "bounced"]
    bounced = next(e for e in received if e["status"] == "bounced")
    assert bounced["video_id"] is None  # SES's event said none, and nothing was known


def test_the_schema_refuses_what_it_should() -> None:
    good = status_event(ACCEPTED)
    validator().validate(good)
    for broken in (
        {**good, "status": "sent"},
        {**good, "tracking_id": "ana@example.com"},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "time"},
        {**good, "time": "yesterday"},
    ):
        assert not validator().is_valid(broken), broken


async def test_the_dynamodb_client_leaves_validation_to_dynamodb(aws: MotoServer) -> None:
    """The worker's DynamoDB client skips botocore's parameter check (DynamoDB validates
    each request; the check cost 40% of a status batch's CPU); a bad request is still
    refused, by the peer, as StatusUnavailable."""
    from botocore.validate import ParamValidationDecorator

    from async_notifier.aws.clients import aws_client
    from async_notifier.config import Settings

    settings = Settings.from_env(
        {"SUPPRESSION_TABLE": "s", "AWS_ENDPOINT_URL": aws.endpoint_url, "AWS_REGION": REGION},
        sending=False,
    )
    async with aws_client("dynamodb", settings) as client:
        assert not isinstance(client._serializer, ParamValidationDecorator)
        await create_status_table(client, TABLE)
        store = DynamoStatusStore(client, TABLE)
        bad = change("accepted", NOW, tracking_id="")  # an empty key: DynamoDB says no
        with pytest.raises(StatusUnavailable, match="ValidationException"):
            await store.write_batch([bad])
    async with aws_client("s3", settings) as s3:
        assert isinstance(s3._serializer, ParamValidationDecorator)
