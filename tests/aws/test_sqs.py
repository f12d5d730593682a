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


# --------------------------------------------------------------------------- attributes


def test_attribute_text_is_one_bounded_line() -> None:
    text = attribute_text("550 rejected\r\nX-Injected: yes\x00\x07" + "y" * 5000)
    assert "\r" not in text
    assert "\n" not in text
    assert "\x00" not in text
    assert len(text) == MAX_REASON_CHARS
    assert text.startswith("550 rejected X-Injected: yes")
    assert attribute_text("") == "-"  # SQS rejects empty string attributes


# --------------------------------------------------------------------------- dead letters


async def test_dead_letters_carry_original_body_and_reason(sqs: Any) -> None:
    dlq_url, _ = await _queue(sqs, "notifications-dlq")
    source_arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:notifications"
    bodies = {
        "id-1": json.dumps({"video_id": "v1", "email": "a@example.com", "nome": "José"}),
        "id-2": "not json at all \u2603",
    }
    items = [
        (
            _record("id-1", bodies["id-1"], receive_count=3, arn=source_arn),
            RecipientRejected("550 5.1.1 no such user\r\nsecond line " + "x" * 3000),
        ),
        (_record("id-2", bodies["id-2"], arn=None), BadMessage("body is not valid JSON")),
    ]

    routed = await DeadLetterRouter(sqs, dlq_url).route(items)

    assert routed == {"id-1", "id-2"}
    received = {
        m["MessageAttributes"]["original_message_id"]["StringValue"]: m
        for m in await _drain(sqs, dlq_url, 2)
    }
    assert set(received) == {"id-1", "id-2"}
    first = received["id-1"]
    assert first["Body"] == bodies["id-1"]
    attributes = first["MessageAttributes"]
    assert attributes["error_class"]["StringValue"] == "smtp_rejected"
    reason = attributes["error_reason"]["StringValue"]
    assert reason.startswith("550 5.1.1 no such user second line")
    assert "\r" not in reason
    assert "\n" not in reason
    assert len(reason) <= MAX_REASON_CHARS
    assert attributes["receive_count"] == {"DataType": "Number", "StringValue": "3"}
    assert attributes["source_queue_arn"]["StringValue"] == source_arn
    second = received["id-2"]
    assert second["Body"] == bodies["id-2"]
    assert second["MessageAttributes"]["error_class"]["StringValue"] == "bad_message"
    assert "source_queue_arn" not in second["MessageAttributes"]


async def test_dead_letters_are_sent_in_batches_of_ten(sqs: Any) -> None:
    dlq_url, _ = await _queue(sqs, "notifications-dlq")
    # messageIds with characters batch entry ids do not allow
    items = [(_record(f"msg/{i}:#", f"body {i}"), BadMessage("bad")) for i in range(23)]

    routed = await DeadLetterRouter(sqs, dlq_url).route(items)

    assert routed == {f"msg/{i}:#" for i in range(23)}
    received = await _drain(sqs, dlq_url, 23)
    assert sorted(m["Body"] for m in received) == sorted(f"body {i}" for i in range(23))


async def test_fifo_dead_letter_queue_gets_group_and_deduplication_ids(sqs: Any) -> None:
    dlq_url, _ = await _queue(sqs, "notifications-dlq.fifo", FifoQueue="true")
    items = [
        (_record("id-a", "body a", group="video-7"), BadMessage("bad")),
        (_record("id-b", "body b"), BadMessage("bad")),
    ]

    routed = await DeadLetterRouter(sqs, dlq_url).route(items)

    assert routed == {"id-a", "id-b"}
    received = {m["Body"]: m["Attributes"] for m in await _drain(sqs, dlq_url, 2)}
    assert received["body a"]["MessageGroupId"] == "video-7"
    assert received["body b"]["MessageGroupId"] == "dead-letter"
    assert received["body a"]["MessageDeduplicationId"] == hashlib.sha256(b"id-a").hexdigest()
    assert received["body b"]["MessageDeduplicationId"] == hashlib.sha256(b"id-b").hexdigest()


async def test_route_to_missing_queue_returns_nothing_and_logs(
    sqs: Any, captured: CapturedLogs
) -> None:
    url = f"{sqs.meta.endpoint_url}/{ACCOUNT}/no-such-dlq"
    items = [(_record("id-1", "b1"), BadMessage("bad")), (_record("id-2", "b2"), BadMessage("x"))]

    routed = await DeadLetterRouter(sqs, url).route(items)

    assert routed == set()
    logged = {r.messageId for r in captured.records if r.getMessage() == "dead-letter send failed"}
    assert logged == {"id-1", "id-2"}


async def test_a_chunk_that_fails_loses_only_its_own_records(sqs: Any) -> None:
    dlq_url, _ = await _queue(sqs, "notifications-dlq")
    huge = "x" * (1024 * 1024 + 1)  # over SQS's message size: its own batch, rejected whole
    items = [
        (_record("small-1", "s1"), BadMessage("bad")),
        (_record("huge", huge), BadMessage("bad")),
        (_record("small-2", "s2"), BadMessage("bad")),
    ]

    routed = await DeadLetterRouter(sqs, dlq_url).route(items)

    assert routed == {"small-1", "small-2"}
    assert sorted(m["Body"] for m in await _drain(sqs, dlq_url, 3)) == ["s1", "s2"]


class _FailingEntry:
    """Real moto client, except that SQS reports one entry as failed (moto never does)."""

    def __init__(self, client: Any, fail_id: str) -> None:
        self._client = client
        self._fail_id = fail_id

    async def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> Any:
        kept = [entry for entry in Entries if entry["Id"] != self._fail_id]
        response = await self._client.send_message_batch(QueueUrl=QueueUrl, Entries=kept)
        failed = {"Id": self._fail_id, "SenderFault": False, "Code": "InternalError"}
        return {**response, "Failed": [*response.get("Failed", []), failed]}


async def test_entry_reported_failed_is_not_routed(sqs: Any) -> None:
    dlq_url, _ = await _queue(sqs, "notifications-dlq")
    items = [(_record(f"id-{i}", f"b{i}"), BadMessage("bad")) for i in range(3)]

    routed = await DeadLetterRouter(_FailingEntry(sqs, "m1"), dlq_url).route(items)

    assert routed == {"id-0", "id-2"}
    assert sorted(m["Body"] for m in await _drain(sqs, dlq_url, 3)) == ["b0", "b2"]


# --------------------------------------------------------------------------- visibility


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
# The time a budget leaves the calls: enough for the client to prepare and send its
# requests (so that they reach the proxy) on a loaded machine too: 0.5 s was not, once.
WINDOW = 2.0


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
    ("grace", "call_timeout"), [(WINDOW, 30.0), (60.0, WINDOW)], ids=["until-the-end", "per-call"]
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
    budget = AfterCutoff(Deadline.after(0.0, grace=WINDOW))

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
