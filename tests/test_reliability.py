"""Issue 4 end to end: `handler.lambda_handler` on moto (S3, SQS, DynamoDB) and aiosmtpd.

Each test drives the real handler with Lambda-shaped events and reads the outcome back from
the peers (what the SMTP sink accepted, what sits in the dead-letter or source queue, what
the idempotency table holds), so it fails when the behaviour README's "Failure handling"
section promises is broken, not when an implementation detail changes.
"""

from __future__ import annotations

import html
import json
import re
import time
import urllib.request
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import boto3
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from queues import make_table
from servers import (
    LOOPBACK,
    REGION,
    FakeLambdaContext,
    MotoServer,
    SmtpSink,
    failed_ids,
    free_port,
    log_lines,
    make_zip,
    s3_client,
    seed_objects,
    sqs_record,
)

import handler
from async_notifier.aws.idempotency import idempotency_key
from async_notifier.batch import notifier
from async_notifier.batch.scratch import ByteBudget
from async_notifier.config import ConfigError, Settings
from async_notifier.errors import BadMessage
from async_notifier.messages import parse_body

Body = dict[str, Any]
ACCOUNT = "123456789012"  # moto's default account
SOURCE_ARN = f"arn:aws:sqs:{REGION}:{ACCOUNT}:notifications"
FIFO_ARN = f"arn:aws:sqs:{REGION}:{ACCOUNT}:notifications.fifo"
SENDER = "no-reply@example.com"
TABLE = "notifier-idempotency"
MIB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


def invoke(records: list[Any], context: Any = None) -> dict[str, Any]:
    # Not `sqs_event`: the property tests hand over records that are not even objects.
    result = handler.lambda_handler({"Records": list(records)}, context or FakeLambdaContext())
    assert isinstance(result, dict)
    return result


def completed(video_id: str, key: str, email: str, **extra: Any) -> Body:
    return {
        "video_id": video_id,
        "status": "COMPLETED",
        "bucket": "videos-zip",
        "key": key,
        "email": email,
        **extra,
    }


def failed(video_id: str, email: str, **extra: Any) -> Body:
    return {"video_id": video_id, "status": "FAILED", "email": email, "message": "boom", **extra}


def use_smtp(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    """Point the worker at another SMTP port; takes effect after `handler.reset()`."""
    monkeypatch.setenv("SMTP_SERVER", LOOPBACK)
    monkeypatch.setenv("SMTP_PORT", str(port))


def recipients(sink: SmtpSink) -> list[str]:
    return sorted(r.rcpt_tos[0] for r in sink.messages)


def video_ids(sink: SmtpSink) -> list[str]:
    """X-Video-Id of every accepted message, in the order the server accepted them."""
    return [str(m["X-Video-Id"]) for m in sink.parsed()]


def texts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html_part = message.get_body(preferencelist=("html",))
    assert text is not None
    assert html_part is not None
    return text.get_content(), html_part.get_content()


def attachments(message: EmailMessage) -> list[bytes]:
    found = []
    for part in message.iter_attachments():
        assert part.get_content_type() == "application/zip"
        payload = part.get_content()
        assert isinstance(payload, bytes)
        found.append(payload)
    return found


def error_classes(out: str) -> dict[str, str]:
    """messageId → error_class of every failed record in the captured JSON logs."""
    return {
        line["messageId"]: line["error_class"]
        for line in log_lines(out)
        if line.get("outcome") == "failed" and "messageId" in line
    }


def sqs_client(aws: MotoServer) -> Any:
    return boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name=REGION)


def create_queue(client: Any, name: str, **attributes: str) -> tuple[str, str]:
    url = client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    arn = client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return url, arn


def drain(client: Any, url: str) -> list[dict[str, Any]]:
    """Every message in the queue (received with a long visibility, so each comes once)."""
    messages: list[dict[str, Any]] = []
    while True:
        batch = client.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
            VisibilityTimeout=300,
        ).get("Messages", [])
        if not batch:
            return messages
        messages.extend(batch)


def visible_bodies(client: Any, url: str) -> list[str]:
    """Bodies a consumer could receive right now; the receive leaves them visible."""
    messages = client.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0
    ).get("Messages", [])
    return sorted(m["Body"] for m in messages)


def lambda_record(message: dict[str, Any], arn: str) -> dict[str, Any]:
    """The record Lambda's event source mapping builds from a received SQS message."""
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": message["Attributes"],
        "messageAttributes": {},
        "md5OfBody": message["MD5OfBody"],
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": REGION,
    }


def receive_all(client: Any, url: str, count: int, visibility: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while len(messages) < count:
        batch = client.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            MessageSystemAttributeNames=["All"],
            VisibilityTimeout=visibility,
        ).get("Messages", [])
        assert batch, f"expected {count} messages, got {len(messages)}"
        messages.extend(batch)
    return messages


# --------------------------------------------------------------------------- 1. dead letters


def test_permanent_failures_are_dead_lettered_and_acknowledged(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sqs = sqs_client(aws)
    dlq_url, _ = create_queue(sqs, "notifications-dlq")
    monkeypatch.setenv("DEAD_LETTER_QUEUE_URL", dlq_url)
    data = make_zip(8_000, seed=1)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"good/good.zip": data})
    bodies: dict[str, str] = {
        "good-completed": json.dumps(completed("v-good", "good/good.zip", "ok1@example.com")),
        "good-failed": json.dumps(failed("v-failed", "ok2@example.com")),
        "bad-json": '{"video_id": "v-x", "email": ',
        "bad-missing-object": json.dumps(completed("v-gone", "gone.zip", "gone@example.com")),
        "bad-550": json.dumps(failed("v-bounce", "bounce@example.com")),
    }
    receive_counts = {"bad-json": 1, "bad-missing-object": 2, "bad-550": 4}

    with SmtpSink(reject={"bounce@example.com"}) as sink:
        use_smtp(monkeypatch, sink.port)
        result = invoke(
            [
                sqs_record(body, mid, receive_count=receive_counts.get(mid, 1))
                for mid, body in bodies.items()
            ]
        )
        assert recipients(sink) == ["ok1@example.com", "ok2@example.com"]

    # Dead-lettered records are acknowledged: SQS deletes them from the source queue.
    assert failed_ids(result) == []
    dead = {
        m["MessageAttributes"]["original_message_id"]["StringValue"]: m for m in drain(sqs, dlq_url)
    }
    assert sorted(dead) == ["bad-550", "bad-json", "bad-missing-object"]
    expected_class = {
        "bad-json": "bad_message",
        "bad-missing-object": "object_unavailable",
        "bad-550": "smtp_rejected",
    }
    expected_reason = {"bad-json": "JSON", "bad-missing-object": "NoSuchKey", "bad-550": "550"}
    for mid, message in dead.items():
        assert message["Body"] == bodies[mid]
        attributes = message["MessageAttributes"]
        assert attributes["error_class"]["StringValue"] == expected_class[mid]
        assert expected_reason[mid] in attributes["error_reason"]["StringValue"]
        assert attributes["receive_count"]["StringValue"] == str(receive_counts[mid])
        assert attributes["source_queue_arn"]["StringValue"] == SOURCE_ARN
    assert error_classes(capsys.readouterr().out) == expected_class

    # Second invocation, SMTP unreachable: transient failures are retried by SQS, never
    # dead-lettered; a permanent failure in the same batch still is.
    handler.reset()
    use_smtp(monkeypatch, free_port())
    transient = {
        "down-failed": failed("v-down-1", "down1@example.com"),
        "down-completed": completed("v-down-2", "good/good.zip", "down2@example.com"),
    }
    result = invoke(
        [sqs_record(body, mid) for mid, body in transient.items()]
        + [sqs_record("not json", "bad-again")]
    )

    assert failed_ids(result) == ["down-completed", "down-failed"]
    dead_again = drain(sqs, dlq_url)
    assert [m["MessageAttributes"]["original_message_id"]["StringValue"] for m in dead_again] == [
        "bad-again"
    ]
    classes = error_classes(capsys.readouterr().out)
    assert classes["down-failed"] == "smtp_unavailable"
    assert classes["down-completed"] == "smtp_unavailable"


def test_permanent_failures_are_reported_when_the_dead_letter_send_fails(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEAD_LETTER_QUEUE_URL", f"{aws.endpoint_url}/{ACCOUNT}/no-such-dlq")
    records = [
        sqs_record(failed("v-ok", "ok@example.com"), "good"),
        sqs_record("{broken", "bad-json"),
        sqs_record(completed("v-gone", "gone.zip", "gone@example.com"), "bad-missing-object"),
    ]

    result = invoke(records)

    # Not routed, so not acknowledged either: SQS keeps them (and its redrive policy applies).
    assert failed_ids(result) == ["bad-json", "bad-missing-object"]
    assert recipients(smtp_sink) == ["ok@example.com"]


def test_an_smtp_outage_fails_every_record_as_transient_without_starving_s3(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The S3 client's connection pool is MAX_CONCURRENCY connections. A ZIP bigger than the
    # socket buffers keeps its connection busy until the body is read or closed, so a record
    # that gives up without closing its open GET takes one connection with it.
    monkeypatch.setenv("MAX_CONCURRENCY", "2")
    monkeypatch.setenv("RETRY_BACKOFF", "false")
    monkeypatch.setenv("DEADLINE_MARGIN_SECONDS", "3")
    seed_objects(s3_client(aws.endpoint_url), bucket, {"big.zip": make_zip(6 * MIB, seed=3)})
    use_smtp(monkeypatch, free_port())
    records = [
        sqs_record(completed(f"v{i}", "big.zip", f"u{i}@example.com"), f"m{i}") for i in range(6)
    ]

    result = invoke(records, FakeLambdaContext(remaining_ms=8_000))

    assert failed_ids(result) == sorted(f"m{i}" for i in range(6))
    # Each record fails on SMTP. A record stuck waiting for an S3 connection until the
    # cutoff would say `deadline` instead (and the invocation would last until then).
    assert error_classes(capsys.readouterr().out) == {f"m{i}": "smtp_unavailable" for i in range(6)}
    assert list(Path(lambda_env["TMP_DIR"]).rglob("*")) == []


# --------------------------------------------------------------------------- 2. retry back-off


def test_failed_records_get_a_visibility_back_off(
    lambda_env: dict[str, str], aws: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqs = sqs_client(aws)
    url_on, arn_on = create_queue(sqs, "backoff-on")
    url_off, arn_off = create_queue(sqs, "backoff-off")
    bodies = {
        name: [json.dumps(failed(f"{name}-{i}", f"user{i}@example.com")) for i in range(3)]
        for name in ("on", "off")
    }
    for url, name in ((url_on, "on"), (url_off, "off")):
        for body in bodies[name]:
            sqs.send_message(QueueUrl=url, MessageBody=body)
    received_at = time.monotonic()
    # With a 1 s visibility, whatever the worker leaves alone is visible again after 1 s.
    on = [lambda_record(m, arn_on) for m in receive_all(sqs, url_on, 3, visibility=1)]
    off = [lambda_record(m, arn_off) for m in receive_all(sqs, url_off, 3, visibility=1)]
    assert {r["attributes"]["ApproximateReceiveCount"] for r in on + off} == {"1"}
    use_smtp(monkeypatch, free_port())  # nothing listens: every record fails transiently

    assert failed_ids(invoke(on)) == sorted(r["messageId"] for r in on)
    handler.reset()
    monkeypatch.setenv("RETRY_BACKOFF", "false")
    assert failed_ids(invoke(off)) == sorted(r["messageId"] for r in off)

    assert visible_bodies(sqs, url_on) == []
    time.sleep(max(0.0, received_at + 2.0 - time.monotonic()))
    # Back-off on: hidden for 30 s (first receive), well past the original 1 s.
    assert visible_bodies(sqs, url_on) == []
    # Back-off off: the original visibility expired and SQS hands them out again.
    assert visible_bodies(sqs, url_off) == sorted(bodies["off"])


def test_back_off_applies_only_to_the_failed_records(
    lambda_env: dict[str, str], aws: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqs = sqs_client(aws)
    url, arn = create_queue(sqs, "mixed")
    good = [json.dumps(failed(f"g-{i}", f"good{i}@example.com")) for i in range(2)]
    bad = [json.dumps(failed("b-1", "bounce@example.com")), "{not json"]
    for body in good + bad:
        sqs.send_message(QueueUrl=url, MessageBody=body)
    received_at = time.monotonic()
    records = [lambda_record(m, arn) for m in receive_all(sqs, url, 4, visibility=1)]
    by_body = {r["body"]: r["messageId"] for r in records}

    with SmtpSink(reject={"bounce@example.com"}) as sink:
        use_smtp(monkeypatch, sink.port)
        result = invoke(records)
        assert recipients(sink) == ["good0@example.com", "good1@example.com"]

    assert failed_ids(result) == sorted(by_body[b] for b in bad)
    time.sleep(max(0.0, received_at + 2.0 - time.monotonic()))
    # Nobody deleted the delivered ones (that is Lambda's job), so they reappear after their
    # original 1 s; the failed ones stay hidden by the back-off.
    assert visible_bodies(sqs, url) == sorted(good)


# --------------------------------------------------------------------------- 3. FIFO


def _group_record(body: Body, message_id: str, group: str, arn: str) -> dict[str, Any]:
    record = sqs_record(body, message_id, queue_arn=arn)
    record["attributes"]["MessageGroupId"] = group
    return record


@pytest.mark.parametrize("fifo", [True, False], ids=["fifo", "standard"])
def test_fifo_groups_stop_at_their_first_failure_and_keep_order(
    fifo: bool,
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SMTP_POOL_SIZE", "1")
    arn = FIFO_ARN if fifo else SOURCE_ARN
    # Group B's first ZIP is the biggest and its last the smallest: processed concurrently,
    # the later ones would be downloaded, and so sent, first.
    sizes = {"A1": 5_000, "A3": 5_000, "B1": 900_000, "B2": 300_000, "B3": 60_000, "B4": 2_000}
    seed_objects(
        s3_client(aws.endpoint_url),
        bucket,
        {f"{v}.zip": make_zip(size, seed=i) for i, (v, size) in enumerate(sizes.items())},
    )

    def body(video_id: str) -> Body:
        key = "missing.zip" if video_id == "A2" else f"{video_id}.zip"
        return completed(video_id, key, f"{video_id.lower()}@example.com")

    layout = [("A1", "A"), ("B1", "B"), ("A2", "A"), ("B2", "B"), ("A3", "A"), ("B3", "B")]
    layout.append(("B4", "B"))
    records = [_group_record(body(v), f"m-{v}", group, arn) for v, group in layout]

    result = invoke(records)

    sent = video_ids(smtp_sink)
    assert len(sent) == len(set(sent))
    if fifo:
        assert failed_ids(result) == ["m-A2", "m-A3"]
        assert "A3" not in sent
        assert sorted(sent) == ["A1", "B1", "B2", "B3", "B4"]
        assert [v for v in sent if v.startswith("B")] == ["B1", "B2", "B3", "B4"]
        classes = error_classes(capsys.readouterr().out)
        assert classes == {"m-A2": "object_unavailable", "m-A3": "fifo_group_blocked"}
    else:  # a standard queue has no groups: one failure blocks nothing
        assert failed_ids(result) == ["m-A2"]
        assert sorted(sent) == ["A1", "A3", "B1", "B2", "B3", "B4"]


# --------------------------------------------------------------------------- 4. in-batch duplicates


def test_in_batch_duplicates_send_one_email_and_are_all_acknowledged(
    lambda_env: dict[str, str], aws: MotoServer, bucket: str, smtp_sink: SmtpSink
) -> None:
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v/v.zip": make_zip(4_000, seed=4)})
    same = completed("vid-1", "v/v.zip", "maria@example.com", name="Maria")
    records = [
        sqs_record(same, "dup-1"),
        sqs_record(same, "dup-2"),
        sqs_record({**same, "name": "Maria S."}, "dup-3"),  # same video, status and address
        sqs_record(failed("vid-1", "maria@example.com"), "other-status"),
        sqs_record(failed("vid-2", "ana@example.com"), "f-1"),
        sqs_record(failed("vid-2", "ana@example.com"), "f-2"),
    ]

    result = invoke(records)

    assert failed_ids(result) == []
    messages = smtp_sink.parsed()
    assert len(messages) == 3
    sent = sorted((str(m["X-Video-Id"]), str(m["To"].addresses[0].addr_spec)) for m in messages)
    assert sent == [
        ("vid-1", "maria@example.com"),
        ("vid-1", "maria@example.com"),
        ("vid-2", "ana@example.com"),
    ]
    # The two emails for vid-1 are different emails: one COMPLETED (with the ZIP), one FAILED.
    maria = [m for m in messages if str(m["X-Video-Id"]) == "vid-1"]
    assert sorted(len(attachments(m)) for m in maria) == [0, 1]
    assert len({str(m["Message-ID"]) for m in messages}) == 3


def test_duplicates_of_a_failed_record_fail_with_it(
    lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = failed("vid-1", "bounce@example.com")
    with SmtpSink(reject={"bounce@example.com"}) as sink:
        use_smtp(monkeypatch, sink.port)
        result = invoke(
            [
                sqs_record(body, "a"),
                sqs_record(body, "b"),
                sqs_record(failed("vid-2", "ok@example.com"), "c"),
            ]
        )
        assert recipients(sink) == ["ok@example.com"]
    assert failed_ids(result) == ["a", "b"]


# --------------------------------------------------------------------------- 5. idempotency table


def _dynamodb(aws: MotoServer) -> Any:
    return boto3.client("dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION)


def _claim(body: Body) -> dict[str, Any]:
    return {"id": {"S": idempotency_key(parse_body(json.dumps(body)).identity)}}


@pytest.fixture
def idempotency_table(
    lambda_env: dict[str, str], aws: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> str:
    make_table(aws.endpoint_url, TABLE)
    monkeypatch.setenv("IDEMPOTENCY_TABLE", TABLE)
    return TABLE


def test_a_redelivered_notification_is_not_sent_again(
    idempotency_table: str,
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v/v.zip": make_zip(3_000, seed=5)})
    body = completed("vid-1", "v/v.zip", "maria@example.com")

    assert failed_ids(invoke([sqs_record(body, "first")])) == []
    assert recipients(smtp_sink) == ["maria@example.com"]
    item = _dynamodb(aws).get_item(TableName=idempotency_table, Key=_claim(body))["Item"]
    assert item["status"]["S"] == "COMPLETED"
    assert int(item["expires_at"]["N"]) > time.time() + 86_400 - 600

    # SQS delivers the same notification again (another messageId, as after a lost ack).
    assert failed_ids(invoke([sqs_record(body, "second")])) == []
    assert recipients(smtp_sink) == ["maria@example.com"]  # still exactly one email
    outcomes = {
        line["messageId"]: line["outcome"]
        for line in log_lines(capsys.readouterr().out)
        if "outcome" in line
    }
    assert outcomes == {"first": "sent", "second": "already_delivered"}


def test_a_live_in_progress_claim_fails_the_record_without_sending(
    idempotency_table: str,
    aws: MotoServer,
    smtp_sink: SmtpSink,
    capsys: pytest.CaptureFixture[str],
) -> None:
    busy = failed("vid-busy", "busy@example.com")
    stale = failed("vid-stale", "stale@example.com")
    dynamodb = _dynamodb(aws)
    for body, expires_at in ((busy, time.time() + 600), (stale, time.time() - 60)):
        dynamodb.put_item(
            TableName=idempotency_table,
            Item={
                **_claim(body),
                "status": {"S": "IN_PROGRESS"},
                "expires_at": {"N": str(int(expires_at))},
            },
        )

    result = invoke([sqs_record(busy, "busy"), sqs_record(stale, "stale")])

    # The live claim belongs to another invocation that may be sending right now; the
    # expired one belongs to an invocation that is gone, so it is taken over.
    assert failed_ids(result) == ["busy"]
    assert recipients(smtp_sink) == ["stale@example.com"]
    assert error_classes(capsys.readouterr().out) == {"busy": "in_progress_elsewhere"}
    items = {
        key: dynamodb.get_item(TableName=idempotency_table, Key=_claim(body))["Item"]["status"]["S"]
        for key, body in (("busy", busy), ("stale", stale))
    }
    assert items == {"busy": "IN_PROGRESS", "stale": "COMPLETED"}


def test_a_failed_send_releases_its_claim(
    idempotency_table: str, aws: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_smtp(monkeypatch, free_port())
    body = failed("vid-1", "maria@example.com")

    assert failed_ids(invoke([sqs_record(body, "m")])) == ["m"]

    # Nothing was accepted, so the retry must not have to wait for the claim to expire.
    assert "Item" not in _dynamodb(aws).get_item(TableName=idempotency_table, Key=_claim(body))


@pytest.mark.parametrize("problem", ["missing-table", "unreachable"])
def test_an_unusable_idempotency_table_never_sends_blindly(
    problem: str,
    lambda_env: dict[str, str],
    aws: MotoServer,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("IDEMPOTENCY_TABLE", "no-such-table")
    if problem == "unreachable":
        # Every AWS client shares the endpoint: only FAILED notifications (no S3) and no
        # back-off (no SQS), so DynamoDB is the one AWS call left.
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{LOOPBACK}:{free_port()}")
        monkeypatch.setenv("RETRY_BACKOFF", "false")

    result = invoke([sqs_record(failed("vid-1", "maria@example.com"), "m")])

    assert failed_ids(result) == ["m"]
    assert smtp_sink.messages == []
    assert error_classes(capsys.readouterr().out) == {"m": "idempotency_unavailable"}


# --------------------------------------------------------------------------- 6. large files


def _link(message: EmailMessage) -> str:
    """The download URL, which must be the same in the text and the HTML part."""
    text, html_body = texts(message)
    in_text = re.findall(r"https?://\S+", text)
    hrefs = {html.unescape(h) for h in re.findall(r'href="([^"]+)"', html_body)}
    assert len(set(in_text)) == 1, text
    assert hrefs == set(in_text), (hrefs, in_text)
    return in_text[0]


def _fetch(url: str) -> bytes:
    assert url.startswith("http://127.0.0.1:")  # moto, never the network
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
        data: bytes = response.read()
    return data


def test_a_zip_over_max_attachment_bytes_is_sent_as_a_working_link(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MAX_ATTACHMENT_BYTES", "1000")
    monkeypatch.setenv("LINK_EXPIRY_SECONDS", "3600")
    big, small = make_zip(5_000, seed=6), make_zip(600, seed=7)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"big.zip": big, "small.zip": small})

    result = invoke(
        [
            sqs_record(completed("v-big", "big.zip", "big@example.com", locale="en"), "big"),
            sqs_record(completed("v-small", "small.zip", "small@example.com"), "small"),
        ]
    )

    assert failed_ids(result) == []
    messages = {str(m["X-Video-Id"]): m for m in smtp_sink.parsed()}
    assert attachments(messages["v-small"]) == [small]
    linked = messages["v-big"]
    assert attachments(linked) == []
    assert "too large to send as an attachment" in texts(linked)[0]
    url = _link(linked)
    assert _fetch(url) == big
    outcomes = {
        line["messageId"]: line["outcome"]
        for line in log_lines(capsys.readouterr().out)
        if "outcome" in line
    }
    assert outcomes == {"big": "sent_link", "small": "sent"}
    # SigV4 (the README's 7-day limit is SigV4's): SigV2 links (`AWSAccessKeyId=...&
    # Signature=...&Expires=...`) are refused by buckets created since June 2020 and by every
    # region opened since 2014, and ignore the 7-day cap.
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url, url
    assert "X-Amz-Expires=3600" in url, url


def test_a_message_over_the_servers_size_limit_is_sent_as_a_link(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big, small = make_zip(350_000, seed=8), make_zip(20_000, seed=9)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"big.zip": big, "small.zip": small})
    # aiosmtpd advertises `SIZE 400000` in its EHLO reply and refuses larger messages.
    with SmtpSink(data_size_limit=400_000) as sink:
        use_smtp(monkeypatch, sink.port)
        result = invoke(
            [
                sqs_record(completed("v-big", "big.zip", "big@example.com"), "big"),
                sqs_record(completed("v-small", "small.zip", "small@example.com"), "small"),
            ]
        )
        messages = {str(m["X-Video-Id"]): m for m in sink.parsed()}

    assert failed_ids(result) == []
    assert attachments(messages["v-small"]) == [small]
    assert attachments(messages["v-big"]) == []
    assert _fetch(_link(messages["v-big"])) == big


def test_a_zip_that_can_never_fit_the_tmp_budget_is_sent_as_a_link(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAX_TMP_BYTES", str(MIB))
    data = make_zip(2 * MIB, seed=10)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"huge.zip": data})

    result = invoke([sqs_record(completed("v-huge", "huge.zip", "huge@example.com"), "huge")])

    assert failed_ids(result) == []
    [message] = smtp_sink.parsed()
    assert attachments(message) == []
    assert _fetch(_link(message)) == data
    assert list(Path(lambda_env["TMP_DIR"]).rglob("*")) == []


def test_zips_that_fit_one_at_a_time_wait_for_the_budget_and_are_all_attached(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAX_TMP_BYTES", str(MIB))
    budgets: list[ByteBudget] = []

    class SpyBudget(ByteBudget):
        def __init__(self, total: int) -> None:
            super().__init__(total)
            budgets.append(self)

    monkeypatch.setattr(notifier, "ByteBudget", SpyBudget)
    objects = {f"v{i}.zip": make_zip(300_000 + i * 1_000, seed=20 + i) for i in range(10)}
    assert sum(map(len, objects.values())) > 2 * MIB
    seed_objects(s3_client(aws.endpoint_url), bucket, objects)

    result = invoke(
        [
            sqs_record(completed(f"v{i}", f"v{i}.zip", f"u{i}@example.com"), f"m{i}")
            for i in range(10)
        ]
    )

    assert failed_ids(result) == []
    messages = {str(m["X-Video-Id"]): m for m in smtp_sink.parsed()}
    assert sorted(messages) == sorted(f"v{i}" for i in range(10))
    for i in range(10):
        assert attachments(messages[f"v{i}"]) == [objects[f"v{i}.zip"]]
    [budget] = budgets
    assert 0 < budget.peak <= MIB
    assert budget.in_use == 0
    assert list(Path(lambda_env["TMP_DIR"]).rglob("*")) == []


# --------------------------------------------------------------------------- 7. deadline


@pytest.mark.parametrize(("remaining_ms", "margin"), [(2_000, "3"), (2_500, None)])
def test_a_passed_cutoff_fails_every_record_without_sending(
    remaining_ms: int,
    margin: str | None,
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if margin is not None:
        monkeypatch.setenv("DEADLINE_MARGIN_SECONDS", margin)  # else the default: at least 3 s
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v.zip": make_zip(2_000, seed=11)})
    records = [
        sqs_record(completed("v1", "v.zip", "a@example.com"), "c1"),
        sqs_record(failed("v2", "b@example.com"), "f1"),
        sqs_record(failed("v3", "c@example.com"), "f2"),
    ]

    result = invoke(records, FakeLambdaContext(remaining_ms=remaining_ms))

    assert failed_ids(result) == ["c1", "f1", "f2"]
    assert smtp_sink.messages == []
    assert error_classes(capsys.readouterr().out) == {
        "c1": "deadline",
        "f1": "deadline",
        "f2": "deadline",
    }


def test_a_small_margin_lets_a_short_invocation_work(
    lambda_env: dict[str, str], smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Same 2 s as above, but a 0.5 s margin leaves 1.5 s: enough for two FAILED notices.
    monkeypatch.setenv("DEADLINE_MARGIN_SECONDS", "0.5")
    records = [sqs_record(failed(f"v{i}", f"u{i}@example.com"), f"m{i}") for i in range(2)]
    # A warm process, as Lambda's second invocation: the 1.5 s are the batch's, not the
    # cold start's (the worker's start-up is not what this margin is about).
    assert failed_ids(invoke([], FakeLambdaContext(remaining_ms=60_000))) == []

    result = invoke(records, FakeLambdaContext(remaining_ms=2_000))

    assert failed_ids(result) == []
    assert recipients(smtp_sink) == ["u0@example.com", "u1@example.com"]


@pytest.mark.parametrize(("raw", "expected"), [("", None), ("0", 0.0), ("2.5", 2.5), (" 7 ", 7.0)])
def test_deadline_margin_is_parsed(raw: str, expected: float | None) -> None:
    env = {
        "SMTP_SERVER": "smtp.example.com",
        "EMAIL_FROM": SENDER,
        "ALLOWED_BUCKETS": "*",
        "DEADLINE_MARGIN_SECONDS": raw,
    }
    assert Settings.from_env(env).deadline_margin == expected


@pytest.mark.parametrize("raw", ["abc", "-1", "nan", "1s"])
def test_invalid_deadline_margin_stops_the_handler(
    raw: str,
    lambda_env: dict[str, str],
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEADLINE_MARGIN_SECONDS", raw)
    with pytest.raises(ConfigError, match="DEADLINE_MARGIN_SECONDS"):
        invoke([sqs_record(failed("v", "a@example.com"), "m")])
    assert smtp_sink.connections_opened == 0


# --------------------------------------------------------------------------- 8. properties

SEED_KEY = "seed/ok.zip"
SEED_DATA = make_zip(1_500, seed=99)
SAFE_EMAILS = [
    "maria@example.com",
    "Joao.Silva@Example.COM",
    "a+tag@sub.example.org",
    "user@bücher.de",
]
HOSTILE_EMAILS = [
    "victim@example.com\r\nBcc: evil@example.org",
    "victim@example.com\nBcc: evil@example.org",
    "victim@example.com\rBcc: evil@example.org",
    "Maria <maria@example.com>",
    "maria@example.com, evil@example.org",
    "maria@example.com;evil@example.org",
    "josé@example.com",
    "maria@example.com\x00",
    "maria@exa\u200bmple.com",
    '"evil\\r\\n"@example.com',
    "maria@[127.0.0.1]",
    "=?utf-8?q?evil=0D=0ABcc:_x@example.org?=@example.com",
    "@example.com",
    "maria@",
    "maria",
    " ",
    "a" * 300 + "@example.com",
]
HOSTILE_TEXT = [
    "line\r\nBcc: evil@example.org",
    "a\nb",
    "a\rb",
    "tab\there",
    "nul\x00",
    "bell\x07",
    "del\x7f",
    "sep\u2028sep",
    "nel\x85",
    "\ud800",
    "é ü 日本語 🎬",
    "<script>alert(1)</script>",
    "=?utf-8?b?ZXZpbA==?=",
    "../../etc/passwd",
    "x" * 5_000,
    " ",
    "",
]
HUGE_MESSAGE = "y" * 12_000  # over the 10,000 characters kept of a FAILED message

wrong_types = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
texts_st = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=30))


def _hostile(*extra: Any) -> st.SearchStrategy[Any]:
    """Wrong for a field: the given values, arbitrary text (CR/LF, controls...), wrong types."""
    return st.one_of(st.sampled_from([*extra, ""]), texts_st, wrong_types)


FIELDS = (
    "status",
    "video_id",
    "email",
    "location",
    "name",
    "file_name",
    "message",
    "locale",
    "timestamp",
)
GOOD_LOCATIONS = [
    {"bucket": "videos-zip", "key": SEED_KEY},
    {"s3_bucket": "videos-zip", "s3_key": SEED_KEY},
    {"zip": {"bucket": "videos-zip", "key": SEED_KEY}},
]

OPTIONAL_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["Maria", "José da Silva", "O'Brien, Jr.", "Ana <b>"]),
    "file_name": st.sampled_from(["ferias.mp4", "férias de verão.mov", "a/b\\c.mp4", ".hidden"]),
    "message": st.sampled_from(["ffmpeg failed", "<b>x</b> & y", HUGE_MESSAGE]),
    "locale": st.sampled_from(["pt-BR", "en", "en_US", "pt", "fr", "zz-ZZ"]),
    "timestamp": st.sampled_from(["2025-06-19T19:46:37+00:00", "2025-06-19"]),
}


@st.composite
def notification_bodies(draw: st.DrawFn) -> str:
    """A record body: a notification whose fields are valid except a few hostile ones.

    Small pools of ids and addresses make in-batch duplicates likely; COMPLETED ones point
    at the one seeded ZIP, so delivered attachments can be compared byte for byte.
    """
    shape = draw(st.sampled_from(["object"] * 8 + ["sns", "text", "json-scalar"]))
    if shape == "text":
        return draw(st.text(max_size=60))
    if shape == "json-scalar":
        return json.dumps(draw(st.one_of(wrong_types, st.text(max_size=10))))
    hostile = draw(st.sets(st.sampled_from(FIELDS), max_size=3))

    def value(field: str, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
        return draw(bad if field in hostile else good)

    body: dict[str, Any] = {}
    status = value(
        "status",
        st.sampled_from(["COMPLETED", "FAILED", "completed", " failed ", None]),
        _hostile("PENDING", "FAILED\r\nX-Injected: 1", "COMPLETED\x00"),
    )
    if status is not None:
        body["status"] = status
    body["video_id"] = value(
        "video_id",
        st.one_of(
            st.sampled_from(["vid-1", "vid-2", "vídeo 3", "日本 4"]),
            st.text(st.characters(categories=["L", "N", "P", "S"]), min_size=1, max_size=30),
        ),
        _hostile(None, "a\r\nBcc: evil@example.org", "x" * 2_000),
    )
    body[draw(st.sampled_from(["email", "recipient_email"]))] = value(
        "email", st.sampled_from(SAFE_EMAILS), _hostile(*HOSTILE_EMAILS)
    )
    location = value(
        "location",
        st.sampled_from(GOOD_LOCATIONS),
        st.one_of(
            st.sampled_from(
                [
                    {"bucket": "videos-zip", "key": "missing.zip"},
                    {"bucket": "other-bucket", "key": SEED_KEY},
                    {"bucket": "videos-zip"},
                    {"bucket": "Bad_Bucket!", "key": SEED_KEY},
                    {},
                ]
            ),
            st.builds(lambda key: {"bucket": "videos-zip", "key": key}, _hostile()),
            st.builds(lambda bucket: {"bucket": bucket, "key": SEED_KEY}, _hostile()),
            st.builds(lambda ref: {"zip": ref}, _hostile()),
        ),
    )
    body.update(location)
    for field, good in OPTIONAL_FIELDS.items():
        if field in hostile or draw(st.booleans()):
            key = draw(st.sampled_from(["name", "recipient_name"])) if field == "name" else field
            body[key] = value(field, good, _hostile())
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=8))] = draw(texts_st)
    text = json.dumps(body)
    if shape == "sns":
        return json.dumps({"Type": "Notification", "Message": text})
    return text


def _validated_email(body: Any) -> str | None:
    """The address `messages` validates for a body, or None when the body is refused."""
    if not isinstance(body, str):
        return None
    try:
        return parse_body(body).email
    except BadMessage:
        return None


def _check_emails(sink: SmtpSink, bodies: list[Any]) -> set[str]:
    """Every accepted email went to one validated input address from EMAIL_FROM, headers
    unbroken; returns their Message-IDs."""
    validated = {e for e in map(_validated_email, bodies) if e is not None}
    message_ids: list[str] = []
    for received, message in zip(sink.messages, sink.parsed(), strict=True):
        assert received.mail_from == SENDER
        assert len(received.rcpt_tos) == 1
        [rcpt] = received.rcpt_tos
        assert rcpt in validated
        assert not re.search(r"[\s,;<>\x00-\x1f\x7f]", rcpt), rcpt
        assert rcpt.isascii()
        for name in ("From", "To", "Subject", "Message-ID", "X-Video-Id"):
            values = message.get_all(name) or []
            assert len(values) == 1, (name, values)
            assert not re.search(r"[\r\n]", str(values[0])), (name, values)
        for name in ("Cc", "Bcc", "Reply-To"):
            assert message.get_all(name) is None, name
        [sender] = message["From"].addresses
        assert (sender.display_name, sender.addr_spec) == ("Async Notifier", SENDER)
        [to] = message["To"].addresses
        assert to.addr_spec == rcpt
        for part in message.iter_attachments():
            assert part.get_content() == SEED_DATA
            filename = part.get_filename()
            assert filename is not None
            assert not re.search(r"[/\\\x00-\x1f\x7f]", filename), filename
        message_ids.append(str(message["Message-ID"]))
    assert len(message_ids) == len(set(message_ids)), "one email per notification"
    return set(message_ids)


def _identity_id(body: str) -> str | None:
    try:
        return f"<{parse_body(body).identity[:40]}@example.com>"
    except BadMessage:
        return None


@pytest.fixture
def property_env(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    seed_objects(s3_client(aws.endpoint_url), bucket, {SEED_KEY: SEED_DATA})
    monkeypatch.setenv("SMTP_POOL_SIZE", "2")
    monkeypatch.setenv("MAX_CONCURRENCY", "8")
    monkeypatch.setenv("RETRY_ATTEMPTS", "1")
    monkeypatch.setenv("LOG_LEVEL", "ERROR")
    return lambda_env


PROPERTY_SETTINGS = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_arbitrary_bodies_never_break_the_handler_or_the_headers(
    property_env: dict[str, str], smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RETRY_BACKOFF", "false")

    @PROPERTY_SETTINGS
    @given(st.lists(notification_bodies(), min_size=1, max_size=6))
    def check(bodies: list[str]) -> None:
        smtp_sink.clear()
        ids = [f"m{i}" for i in range(len(bodies))]
        records = [sqs_record(body, mid) for mid, body in zip(ids, bodies, strict=True)]

        result = invoke(records)

        failed_set = set(failed_ids(result))
        assert failed_set <= set(ids)
        delivered = _check_emails(smtp_sink, bodies)
        for mid, body in zip(ids, bodies, strict=True):
            expected = _identity_id(body)
            if mid in failed_set:
                # The sink is healthy, so a failed record was never (partly) delivered.
                assert expected is None or expected not in delivered
            else:
                # Acknowledged without a dead-letter queue: it must have been delivered.
                assert expected is not None, body
                assert expected in delivered

    check()


@st.composite
def raw_records(draw: st.DrawFn, index: int) -> Any:
    """A record as Lambda would hand it over, or broken in the ways a record can be."""
    message_id = f"r{index}"
    kind = draw(
        st.sampled_from(
            ["ok"] * 6
            + ["fifo", "no-id", "id-not-str", "empty-id", "no-body", "body-not-str"]
            + ["bad-attributes", "bad-arn", "not-a-dict"]
        )
    )
    if kind == "not-a-dict":
        return draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.none())))
    record = sqs_record(draw(notification_bodies()), message_id)
    if kind == "fifo":
        record["eventSourceARN"] = FIFO_ARN
        record["attributes"]["MessageGroupId"] = draw(
            st.one_of(st.sampled_from(["g1", "g2"]), wrong_types)
        )
    elif kind == "no-id":
        del record["messageId"]
    elif kind == "id-not-str":
        record["messageId"] = draw(st.one_of(st.integers(), st.none(), st.lists(st.integers())))
    elif kind == "empty-id":
        record["messageId"] = ""
    elif kind == "no-body":
        del record["body"]
    elif kind == "body-not-str":
        record["body"] = draw(wrong_types)
    elif kind == "bad-attributes":
        record["attributes"] = draw(
            st.one_of(wrong_types, st.just({"ApproximateReceiveCount": "many"}))
        )
    elif kind == "bad-arn":
        record["eventSourceARN"] = draw(st.one_of(texts_st, wrong_types))
    return record


def _message_id(record: Any) -> str | None:
    """The record's messageId when it has a usable one (what Lambda always sends)."""
    message_id = record.get("messageId") if isinstance(record, dict) else None
    return message_id if isinstance(message_id, str) and message_id else None


@st.composite
def record_batches(draw: st.DrawFn) -> list[Any]:
    count = draw(st.integers(1, 6))
    return [draw(raw_records(i)) for i in range(count)]


def test_arbitrary_records_are_each_accounted_for_exactly_once(
    property_env: dict[str, str],
    aws: MotoServer,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sqs = sqs_client(aws)
    dlq_url, _ = create_queue(sqs, "notifications-dlq")
    monkeypatch.setenv("DEAD_LETTER_QUEUE_URL", dlq_url)  # and RETRY_BACKOFF on (default)

    # Each example makes real SQS round trips (dead letters, back-off), so fewer of them, and
    # no shrinking: a failure is reported as generated (at most six records).
    @settings(
        PROPERTY_SETTINGS,
        max_examples=60,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    )
    @given(record_batches())
    def check(records: list[Any]) -> None:
        smtp_sink.clear()
        prefix = uuid.uuid4().hex[:8]  # ids unique across examples, so nothing carries over
        for record in records:
            if _message_id(record):
                record["messageId"] = f"{prefix}-{record['messageId']}"
        by_id = {_message_id(r): r for r in records if _message_id(r)}
        input_ids = set(by_id)

        result = invoke(records)
        dead = drain(sqs, dlq_url)
        for message in dead:
            sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=message["ReceiptHandle"])

        failed_set = set(failed_ids(result))
        assert failed_set <= input_ids, (
            "an itemIdentifier that is not a messageId fails the whole batch"
        )
        dead_ids = [m["MessageAttributes"]["original_message_id"]["StringValue"] for m in dead]
        assert len(dead_ids) == len(set(dead_ids))
        assert set(dead_ids) <= input_ids
        assert not set(dead_ids) & failed_set, "dead-lettered and retried"
        bodies = [r.get("body") if isinstance(r, dict) else None for r in records]
        delivered = _check_emails(smtp_sink, bodies)
        for message in dead:
            original = by_id[message["MessageAttributes"]["original_message_id"]["StringValue"]]
            assert message["Body"] == original["body"]
        for mid in input_ids - failed_set - set(dead_ids):
            # Acknowledged and not dead-lettered: its email went out.
            expected = _identity_id(by_id[mid]["body"])
            assert expected is not None
            assert expected in delivered

    check()


def test_records_without_a_usable_message_id_do_not_fail_the_whole_batch(
    lambda_env: dict[str, str], smtp_sink: SmtpSink
) -> None:
    # Lambda reads an empty (or unknown) itemIdentifier as "the whole batch failed" and
    # delivers every record again, the ones already emailed included.
    broken = [None, 42, {"body": "{}"}, {"messageId": 7, "body": "{}"}, {"messageId": ""}]
    records = [sqs_record(failed("v1", "ok@example.com"), "good"), *broken]

    result = invoke(records)

    assert recipients(smtp_sink) == ["ok@example.com"]
    identifiers = [item["itemIdentifier"] for item in result["batchItemFailures"]]
    assert identifiers == [], "only messageIds of the batch may be reported"


@pytest.mark.parametrize("event", [None, "x", [], {}, {"Records": None}, {"Records": "x"}])
def test_events_without_a_records_list_are_an_empty_success(
    event: Any, lambda_env: dict[str, str], smtp_sink: SmtpSink
) -> None:
    assert handler.lambda_handler(event, FakeLambdaContext()) == {"batchItemFailures": []}
    assert smtp_sink.connections_opened == 0
