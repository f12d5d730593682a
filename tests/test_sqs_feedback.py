"""Dead-letter routing and retry back-off against a real SQS protocol peer (moto server)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import pytest
from servers import LOOPBACK, REGION, CapturedLogs, MotoServer

from async_notifier.after_cutoff import AfterCutoff
from async_notifier.aws.sqs import (
    MAX_REASON_CHARS,
    DeadLetterRouter,
    VisibilityBackoff,
    attribute_text,
    queue_url_from_arn,
)
from async_notifier.batch.disposition import backoff_seconds
from async_notifier.deadline import RETURN_RESERVE, Deadline
from async_notifier.errors import BadMessage, RecipientRejected
from async_notifier.messages import SqsRecord
from bench.proxy import Route, start_route, stop_route

ACCOUNT = "123456789012"  # moto's default account


def with_backoff(records: list[SqsRecord]) -> list[tuple[SqsRecord, int]]:
    """Each record with the visibility timeout its receive count earns (as `disposition`
    decides it for a retry)."""
    return [(record, backoff_seconds(record.receive_count)) for record in records]


@pytest.fixture
async def sqs(aws: MotoServer) -> AsyncIterator[Any]:
    async with aioboto3.Session().client(
        "sqs", endpoint_url=aws.endpoint_url, region_name=REGION
    ) as client:
        yield client


async def _queue(sqs: Any, name: str, **attributes: str) -> tuple[str, str]:
    url = (await sqs.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"]
    arn = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]))["Attributes"][
        "QueueArn"
    ]
    return url, arn


async def _drain(sqs: Any, url: str, expected: int) -> list[dict[str, Any]]:
    """Receive until `expected` messages arrived or the queue answers empty."""
    messages: list[dict[str, Any]] = []
    while len(messages) < expected:
        batch = (
            await sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["All"],
                VisibilityTimeout=300,
            )
        ).get("Messages", [])
        if not batch:
            break
        messages.extend(batch)
    return messages


def _record(
    message_id: str,
    body: str,
    *,
    receive_count: int = 1,
    arn: str | None = f"arn:aws:sqs:{REGION}:{ACCOUNT}:notifications",
    group: str | None = None,
    receipt_handle: str = "AQEBhandle",
) -> SqsRecord:
    attributes: dict[str, str] = {"ApproximateReceiveCount": str(receive_count)}
    if group is not None:
        attributes["MessageGroupId"] = group
    raw: dict[str, Any] = {
        "messageId": message_id,
        "receiptHandle": receipt_handle,
        "body": body,
        "attributes": attributes,
        "eventSource": "aws:sqs",
    }
    if arn is not None:
        raw["eventSourceARN"] = arn
    return SqsRecord.from_event(raw)


def _from_received(message: dict[str, Any], arn: str) -> SqsRecord:
    """A Lambda-shaped record for a message the test received itself (real receipt handle)."""
    return SqsRecord.from_event(
        {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": message.get("Attributes", {}),
            "eventSource": "aws:sqs",
            "eventSourceARN": arn,
        }
    )


# --------------------------------------------------------------------------- ARN → URL


def test_queue_url_for_aws_partition() -> None:
    arn = "arn:aws:sqs:sa-east-1:123456789012:notifications"
    assert queue_url_from_arn(arn, None) == (
        "https://sqs.sa-east-1.amazonaws.com/123456789012/notifications"
    )


def test_queue_url_for_china_partition() -> None:
    arn = "arn:aws-cn:sqs:cn-north-1:123456789012:jobs.fifo"
    assert queue_url_from_arn(arn, None) == (
        "https://sqs.cn-north-1.amazonaws.com.cn/123456789012/jobs.fifo"
    )


def test_queue_url_with_endpoint_uses_path_style() -> None:
    arn = "arn:aws:sqs:us-east-1:000000000000:notifications"
    assert queue_url_from_arn(arn, "http://localhost:4566/") == (
        "http://localhost:4566/000000000000/notifications"
    )


@pytest.mark.parametrize(
    "arn",
    [
        "",
        "notifications",
        "arn:aws:sns:us-east-1:123456789012:topic",
        "arn:aws:sqs:us-east-1:12345:notifications",
        "arn:aws:sqs:us-east-1:123456789012:",
        "arn:aws:sqs:us-east-1:123456789012:bad/name",
        "arn:aws:sqs::123456789012:notifications",
        "arn:aws-xyz:sqs:us-east-1:123456789012:notifications",
    ],
)
def test_malformed_arn_is_rejected(arn: str) -> None:
    with pytest.raises(ValueError, match=r"ARN|partition"):
        queue_url_from_arn(arn, None)


# --------------------------------------------------------------------------- back-off


async def test_backoff_hides_failed_records_from_the_next_receive(sqs: Any) -> None:
    url, arn = await _queue(sqs, "notifications")
    for i in range(3):
        await sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
    # VisibilityTimeout=0: without back-off every message is visible again at once.
    messages = (
        await sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=0,
            MessageSystemAttributeNames=["All"],
        )
    )["Messages"]
    assert len(messages) == 3
    records = {m["Body"]: _from_received(m, arn) for m in messages}
    assert {r.receive_count for r in records.values()} == {1}
    backoff = VisibilityBackoff(sqs, endpoint_url=sqs.meta.endpoint_url)

    changed = await backoff.apply(with_backoff([records["m0"], records["m1"]]))

    assert changed == 2
    assert backoff_seconds(records["m0"].receive_count) == 30
    again = (
        await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0)
    ).get("Messages", [])
    assert [m["Body"] for m in again] == ["m2"]


async def test_backoff_groups_records_by_queue_and_skips_unknown_ones(sqs: Any) -> None:
    records: list[SqsRecord] = []
    urls = []
    for name in ("queue-a", "queue-b"):
        url, arn = await _queue(sqs, name)
        urls.append(url)
        for i in range(12):  # more than one batch of ten per queue
            await sqs.send_message(QueueUrl=url, MessageBody=f"{name}-{i}")
        received = await _drain(sqs, url, 12)
        records.extend(_from_received(m, arn) for m in received)
    records.append(_record("no-arn", "x", arn=None))
    records.append(_record("bad-arn", "x", arn="arn:aws:sqs:nowhere"))

    changed = await VisibilityBackoff(sqs, endpoint_url=sqs.meta.endpoint_url).apply(
        with_backoff(records)
    )

    assert changed == 24


async def test_bad_receipt_handle_is_counted_as_failed(sqs: Any, captured: CapturedLogs) -> None:
    url, arn = await _queue(sqs, "notifications")
    await sqs.send_message(QueueUrl=url, MessageBody="good")
    [message] = (await sqs.receive_message(QueueUrl=url, VisibilityTimeout=0))["Messages"]
    good = _from_received(message, arn)
    bad = _record("bad", "x", arn=arn, receipt_handle="not-a-receipt-handle")

    changed = await VisibilityBackoff(sqs, endpoint_url=sqs.meta.endpoint_url).apply(
        with_backoff([bad, good])
    )

    assert changed == 1
    failed = [r for r in captured.records if r.getMessage() == "retry back-off failed"]
    assert [r.messageId for r in failed] == ["bad"]


async def test_backoff_on_missing_queue_does_not_raise(sqs: Any) -> None:
    arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:gone"
    records = [_record("id-1", "x", arn=arn), _record("id-2", "y", arn=arn, receive_count=4)]

    changed = await VisibilityBackoff(sqs, endpoint_url=sqs.meta.endpoint_url).apply(
        with_backoff(records)
    )

    assert changed == 0


async def test_a_visibility_timeout_must_fit_sqs_limit() -> None:
    with pytest.raises(ValueError, match="outside SQS's range"):
        await VisibilityBackoff(object(), endpoint_url=None).apply([(_record("a", "x"), 43_201)])


# --------------------------------------------------------------------------- within a budget

SLOW_SQS = 5.0  # seconds the delay proxy holds every request: far past any budget below


@pytest.fixture
async def slow_sqs(aws: MotoServer) -> AsyncIterator[tuple[Any, Route]]:
    """An SQS client whose every request reaches moto SLOW_SQS seconds late (the delay proxy
    the benchmark uses), and the proxy's route, which counts the connections."""
    route = Route(name="sqs", host=aws.host, port=aws.port, delay=SLOW_SQS)
    relay = await start_route(route)
    try:
        port = relay.sockets[0].getsockname()[1]
        async with aioboto3.Session().client(
            "sqs", endpoint_url=f"http://{LOOPBACK}:{port}", region_name=REGION
        ) as client:
            yield client, route
    finally:
        await stop_route(route, relay)  # requests still held are dropped, never delivered


def _left_undone(captured: CapturedLogs) -> list[tuple[str, list[str]]]:
    return [(r.step, r.messageIds) for r in captured.named("work after the cutoff left undone")]


@pytest.mark.parametrize(
    ("grace", "call_timeout"), [(0.5, 30.0), (60.0, 0.5)], ids=["until-the-end", "per-call"]
)
async def test_dead_letters_that_do_not_fit_are_not_routed_and_logged_once(
    sqs: Any,
    slow_sqs: tuple[Any, Route],
    captured: CapturedLogs,
    grace: float,
    call_timeout: float,
) -> None:
    dlq_url, _ = await _queue(sqs, "notifications-dlq")
    items = [(_record(f"id-{i}", f"b{i}"), BadMessage("bad")) for i in range(12)]  # 2 calls
    client, route = slow_sqs
    budget = AfterCutoff(Deadline.after(0.0, grace=grace), call_timeout=call_timeout)
    due = min(budget.end, time.monotonic() + call_timeout)

    routed = await DeadLetterRouter(client, dlq_url).route(items, budget)

    assert time.monotonic() < due + RETURN_RESERVE  # back in time: within the reserve
    assert routed == set()
    assert route.connections == 2
    assert _left_undone(captured) == [("dead_letter", sorted(f"id-{i}" for i in range(12)))]
    assert captured.named("dead-letter send failed") == []


async def test_a_back_off_that_does_not_fit_is_skipped_and_logged_once(
    slow_sqs: tuple[Any, Route], captured: CapturedLogs
) -> None:
    client, route = slow_sqs
    records = [_record(f"id-{i}", "x", receive_count=i + 1) for i in range(3)]
    budget = AfterCutoff(Deadline.after(0.0, grace=0.5))

    changed = await VisibilityBackoff(client, endpoint_url=None).apply(
        with_backoff(records), budget
    )

    assert time.monotonic() < budget.end + RETURN_RESERVE
    assert changed == 0
    assert route.connections == 1
    assert _left_undone(captured) == [("retry_backoff", ["id-0", "id-1", "id-2"])]
    assert captured.named("retry back-off failed") == []


async def test_without_time_left_nothing_is_sent(
    slow_sqs: tuple[Any, Route], captured: CapturedLogs
) -> None:
    client, route = slow_sqs
    budget = AfterCutoff(Deadline.after(0.0))  # the end is now
    records = [_record("id-1", "x"), _record("id-2", "y")]

    routed = await DeadLetterRouter(client, "http://127.0.0.1:1/1/dlq").route(
        [(record, BadMessage("bad")) for record in records], budget
    )
    changed = await VisibilityBackoff(client, endpoint_url=None).apply(
        with_backoff(records), budget
    )

    assert (routed, changed) == (set(), 0)
    assert route.connections == 0
    assert _left_undone(captured) == [
        ("dead_letter", ["id-1", "id-2"]),
        ("retry_backoff", ["id-1", "id-2"]),
    ]
