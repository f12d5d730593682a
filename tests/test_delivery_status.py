"""Delivery status end to end: `handler.lambda_handler` sends (aiosmtpd), SES's events come
back through `handler.ses_events_handler`, and each notification's status lands in
STATUS_TABLE (DynamoDB on moto) and on STATUS_TOPIC_ARN (SNS on moto, read back from a
subscriber's SQS queue and checked against docs/status-event.schema.json).

SES itself has no local peer that publishes events, so each test writes the event SES would
publish for an email the sink received, with the tags SES reads from that email's
X-SES-MESSAGE-TAGS header.
"""

from __future__ import annotations

import asyncio
import json
import time
from email.message import EmailMessage
from typing import Any

import aioboto3
import boto3
import pytest
from servers import (
    REGION,
    FakeLambdaContext,
    MotoServer,
    SmtpSink,
    free_port,
    log_lines,
    make_zip,
    s3_client,
    seed_objects,
    sqs_event,
    sqs_record,
)
from status_events import Subscriber, create_status_table

import handler
from async_notifier.aws.status import DynamoStatusReader
from async_notifier.aws.tables import create_table
from async_notifier.batch import status
from async_notifier.delivery_status import StatusRecord, epoch_ms, iso_time
from async_notifier.messages import parse_body

STATUS_TABLE = "notifier-status"
SUPPRESSION_TABLE = "suppression"


@pytest.fixture
def status_env(
    lambda_env: dict[str, str], aws: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> Subscriber:
    """Both functions' settings with the status table and topic (and the suppression list,
    which the SES events function needs); returns the topic's subscriber."""
    import asyncio

    import aioboto3

    async def suppression_table() -> None:
        async with aioboto3.Session().client(
            "dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION
        ) as client:
            await create_table(client, SUPPRESSION_TABLE)

    asyncio.run(suppression_table())
    create_status_table(aws.endpoint_url, STATUS_TABLE)
    subscriber = Subscriber(aws.endpoint_url)
    monkeypatch.setenv("STATUS_TABLE", STATUS_TABLE)
    monkeypatch.setenv("STATUS_TOPIC_ARN", subscriber.topic_arn)
    monkeypatch.setenv("SUPPRESSION_TABLE", SUPPRESSION_TABLE)
    monkeypatch.setenv("RETRY_BACKOFF", "false")
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v1/v1.zip": make_zip(2_000, seed=1)})
    return subscriber


def completed(video_id: str, recipient: str, **extra: Any) -> dict[str, Any]:
    return {
        "video_id": video_id,
        "status": "COMPLETED",
        "bucket": "videos-zip",
        "key": "v1/v1.zip",
        "email": recipient,
        **extra,
    }


def send(records: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """One invocation of the notifier; its response and its metrics line."""
    response = handler.lambda_handler(sqs_event(records), FakeLambdaContext())
    return {"response": response, "metrics": metrics(capsys, "RecordsReceived")}


def record_ses(events: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """One invocation of the SES events function, each event one SQS record."""
    records = [sqs_record(json.dumps(e), f"ses-{i}") for i, e in enumerate(events)]
    response = handler.ses_events_handler(sqs_event(records), FakeLambdaContext())
    assert response == {"batchItemFailures": []}
    return metrics(capsys, "SesEventsReceived")


def metrics(capsys: pytest.CaptureFixture[str], name: str) -> dict[str, Any]:
    [line] = [e for e in log_lines(capsys.readouterr().out) if name in e]
    return line


def item(aws: MotoServer, tracking_id: str) -> StatusRecord | None:
    """The notification as the status reader folds it from the table."""

    async def read() -> StatusRecord | None:
        async with aioboto3.Session().client(
            "dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION
        ) as client:
            return await DynamoStatusReader(client, STATUS_TABLE).get(tracking_id)

    return asyncio.run(read())


def stored_items(aws: MotoServer) -> list[dict[str, Any]]:
    client = boto3.client("dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION)
    items: list[dict[str, Any]] = client.scan(TableName=STATUS_TABLE)["Items"]
    return items


def status_of(aws: MotoServer, tracking_id: str) -> tuple[str, list[str]]:
    """The notification's status and its history's states, in time order."""
    found = item(aws, tracking_id)
    assert found is not None
    return found.status, [entry.state for entry in found.history]


def tags(message: EmailMessage) -> dict[str, list[str]]:
    """`mail.tags` as SES builds it from the email's X-SES-MESSAGE-TAGS header."""
    raw = " ".join(str(message["X-SES-MESSAGE-TAGS"]).split())
    return {name: [value] for name, value in (p.split("=", 1) for p in raw.split(", "))}


def ses_event(
    event_type: str,
    message: EmailMessage | None,
    *,
    tracking: dict[str, list[str]] | None = None,
    at: str | None = None,
    **detail: Any,
) -> dict[str, Any]:
    """The event SES publishes for `message` (configuration-set event publishing), as
    happening `at` (now, by default: after the email was accepted)."""
    at = at or iso_time(epoch_ms(time.time()))
    mail_tags = {"ses:configuration-set": ["notifier-events"]}
    if message is not None:
        mail_tags |= tags(message)
    if tracking is not None:
        mail_tags |= tracking
    mail = {
        "timestamp": at,
        "source": "no-reply@example.com",
        "messageId": "0100018c1c2d3e4f-abcdefab-1234-5678-9abc-def012345678-000000",
        "destination": ["ana@example.com"],
        "tags": mail_tags,
    }
    name = {"Delivery": "delivery", "Bounce": "bounce", "DeliveryDelay": "deliveryDelay"}
    body = {**detail}
    if event_type in name:
        body = {name[event_type]: {"timestamp": at, **detail}}
    return {"eventType": event_type, "mail": mail, **body}


def delivery(message: EmailMessage | None, **kwargs: Any) -> dict[str, Any]:
    return ses_event(
        "Delivery",
        message,
        recipients=["ana@example.com"],
        smtpResponse="250 2.6.0 Message received",
        **kwargs,
    )


def hard_bounce(message: EmailMessage) -> dict[str, Any]:
    return ses_event(
        "Bounce",
        message,
        bounceType="Permanent",
        bounceSubType="General",
        bouncedRecipients=[{"emailAddress": "ana@example.com", "status": "5.1.1"}],
    )


def tracking_id(body: dict[str, Any]) -> str:
    return parse_body(json.dumps(body)).tracking_id


# --------------------------------------------------------------------------- a whole life


def test_accepted_then_delivered_and_told_back(
    status_env: Subscriber,
    aws: MotoServer,
    smtp_sink: SmtpSink,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = completed("v1", "ana@example.com", notification_id="n-1")
    sent = send([sqs_record(body, "m1")], capsys)
    assert sent["response"] == {"batchItemFailures": []}
    assert (sent["metrics"]["StatusWritten"], sent["metrics"]["StatusPublished"]) == (1, 1)
    assert sent["metrics"]["StatusWriteFailed"] == 0
    [message] = smtp_sink.parsed()
    key = tracking_id(body)
    assert tags(message)["tracking_id"] == [key]
    assert str(message["Message-ID"]).startswith(f"<{key}@")
    assert status_of(aws, key) == ("accepted", ["accepted"])
    stored = item(aws, key)
    assert stored is not None
    assert (stored.video_id, stored.notification_id) == ("v1", "n-1")
    assert (stored.transport, stored.attempts) == ("smtp", 1)
    assert "ana@example.com" not in json.dumps(stored_items(aws))  # no address is stored

    counted = record_ses([delivery(message)], capsys)
    assert (counted["StatusWritten"], counted["StatusEventsUntracked"]) == (1, 0)
    assert status_of(aws, key) == ("delivered", ["accepted", "delivered"])

    accepted, delivered = status_env.events(expected=2)
    assert (accepted["status"], accepted["current_status"]) == ("accepted", "accepted")
    assert (accepted["source"], accepted["transport"], accepted["attempt"]) == ("worker", "smtp", 1)
    assert (delivered["status"], delivered["current_status"]) == ("delivered", "delivered")
    # What SES did not say, the table knew.
    assert (delivered["transport"], delivered["attempt"]) == ("smtp", 1)
    assert delivered["provider_message_id"].startswith("0100018c")
    assert {accepted["notification_id"], delivered["notification_id"]} == {"n-1"}
    assert {accepted["tracking_id"], delivered["tracking_id"]} == {key}
    assert delivered["time"].endswith("Z")


def test_accepted_then_bounced_then_suppressed_on_the_next_send(
    status_env: Subscriber,
    aws: MotoServer,
    smtp_sink: SmtpSink,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dlq_url = boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name=REGION).create_queue(
        QueueName="notifier-dlq"
    )["QueueUrl"]
    monkeypatch.setenv("DEAD_LETTER_QUEUE_URL", dlq_url)
    first = completed("v1", "ana@example.com")
    send([sqs_record(first, "m1")], capsys)
    [message] = smtp_sink.parsed()
    record_ses([hard_bounce(message)], capsys)
    assert status_of(aws, tracking_id(first)) == ("bounced", ["accepted", "bounced"])
    stored = item(aws, tracking_id(first))
    assert stored is not None
    assert stored.reason == "bounce:Permanent:General"

    second = {"video_id": "v2", "status": "FAILED", "email": "Ana@example.com"}
    sent = send([sqs_record(second, "m2")], capsys)
    assert sent["response"] == {"batchItemFailures": []}  # dead-lettered
    assert len(smtp_sink.messages) == 1  # never mailed again
    assert status_of(aws, tracking_id(second)) == ("suppressed", ["suppressed"])
    events = status_env.events(expected=3)
    assert [e["status"] for e in events] == ["accepted", "bounced", "suppressed"]
    assert events[1]["reason"] == "bounce:Permanent:General"
    assert events[2]["reason"].startswith("suppressed: ")
    assert "ana@example.com" not in json.dumps(events).lower()


def test_permanent_failures_are_failed_or_dead_lettered(
    status_env: Subscriber,
    aws: MotoServer,
    smtp_sink: SmtpSink,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No dead-letter queue: reported failed (the queue's redrive policy takes it), `failed`.
    monkeypatch.setenv("ALLOWED_BUCKETS", "other-bucket")
    refused = completed("v1", "ana@example.com")
    sent = send([sqs_record(refused, "m1", receive_count=2)], capsys)
    assert sent["response"] == {"batchItemFailures": [{"itemIdentifier": "m1"}]}
    assert status_of(aws, tracking_id(refused)) == ("failed", ["failed"])
    stored = item(aws, tracking_id(refused))
    assert stored is not None
    assert stored.reason is not None
    assert stored.reason.startswith("bucket_not_allowed: ")
    assert stored.attempts == 2

    # With one: copied there with the reason, `dead_lettered`.
    handler.reset()
    monkeypatch.setenv("ALLOWED_BUCKETS", "*")
    sqs = boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name=REGION)
    monkeypatch.setenv(
        "DEAD_LETTER_QUEUE_URL", sqs.create_queue(QueueName="notifier-dlq")["QueueUrl"]
    )
    missing = {**completed("v9", "ana@example.com"), "key": "v9/none.zip"}
    sent = send([sqs_record(missing, "m2")], capsys)
    assert sent["response"] == {"batchItemFailures": []}
    assert status_of(aws, tracking_id(missing)) == ("dead_lettered", ["dead_lettered"])
    assert smtp_sink.messages == []
    events = status_env.events(expected=2)
    assert [e["status"] for e in events] == ["failed", "dead_lettered"]
    assert events[1]["reason"].startswith("object_unavailable: ")


def test_a_notification_failing_past_its_age_is_expired(
    status_env: Subscriber,
    aws: MotoServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sqs = boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name=REGION)
    monkeypatch.setenv(
        "DEAD_LETTER_QUEUE_URL", sqs.create_queue(QueueName="notifier-dlq")["QueueUrl"]
    )
    monkeypatch.setenv("MAX_DELIVERY_AGE", "60")
    monkeypatch.setenv("RETRY_ATTEMPTS", "1")
    monkeypatch.setenv("SMTP_PORT", str(free_port()))  # nothing listens: transient
    body = {"video_id": "v3", "status": "FAILED", "email": "ana@example.com"}
    young = sqs_record(body, "young")
    old = sqs_record({**body, "video_id": "v4"}, "old", receive_count=7)
    old["attributes"]["SentTimestamp"] = str(int((time.time() - 120) * 1000))
    sent = send([young, old], capsys)
    assert sent["response"] == {"batchItemFailures": [{"itemIdentifier": "young"}]}
    # The young one will be retried: nothing to say yet.
    assert item(aws, tracking_id(body)) is None
    assert status_of(aws, tracking_id({**body, "video_id": "v4"})) == ("expired", ["expired"])
    [event] = status_env.events(expected=1)
    assert (event["status"], event["attempt"]) == ("expired", 7)
    assert event["reason"].startswith("expired: ")


# --------------------------------------------------------------------------- order, repeats


def test_a_delivery_recorded_before_the_acceptance_lands_stays(
    status_env: Subscriber,
    aws: MotoServer,
    smtp_sink: SmtpSink,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = completed("v1", "ana@example.com")
    key = tracking_id(body)
    # SES delivered it a moment after accepting it; its event is recorded before the
    # worker's write of the acceptance lands.
    later = iso_time(epoch_ms(time.time() + 5))
    early = delivery(None, tracking={"tracking_id": [key], "video_id": ["v1"]}, at=later)
    counted = record_ses([early], capsys)
    assert counted["StatusEventsUnknown"] == 1  # not in the table yet: counted, kept
    sent = send([sqs_record(body, "m1")], capsys)
    assert sent["metrics"]["StatusWritten"] == 1
    assert status_of(aws, key) == ("delivered", ["accepted", "delivered"])
    stored = item(aws, key)
    assert stored is not None
    assert stored.transport == "smtp"  # the acceptance still adds what it knew
    delivered, accepted = status_env.events(expected=2)
    assert (delivered["status"], delivered["transport"]) == ("delivered", None)
    # The worker's verdicts are written without reading the table: the event says its own
    # state; the table's fold and the delivery's event say delivered.
    assert (accepted["status"], accepted["current_status"]) == ("accepted", "accepted")


def test_a_repeated_event_is_recorded_and_told_once(
    status_env: Subscriber,
    aws: MotoServer,
    smtp_sink: SmtpSink,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = completed("v1", "ana@example.com")
    send([sqs_record(body, "m1")], capsys)
    [message] = smtp_sink.parsed()
    event = delivery(message)
    record_ses([event], capsys)
    again = record_ses([event], capsys)  # SNS and SQS deliver at least once
    assert (again["StatusWritten"], again["StatusDuplicates"], again["StatusPublished"]) == (
        0,
        1,
        0,
    )
    assert status_of(aws, tracking_id(body)) == ("delivered", ["accepted", "delivered"])
    assert [e["status"] for e in status_env.events(expected=2)] == ["accepted", "delivered"]


def test_events_for_no_tracked_notification_are_counted_not_failed(
    status_env: Subscriber,
    aws: MotoServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    untagged = delivery(None)  # sent without the tag (by another sender, or before it)
    counted = record_ses([untagged], capsys)
    assert (counted["StatusEventsUntracked"], counted["StatusWritten"]) == (1, 0)
    client = boto3.client("dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION)
    assert client.scan(TableName=STATUS_TABLE)["Items"] == []
    assert status_env.events() == []


def test_a_status_store_that_is_down_costs_no_email(
    status_env: Subscriber,
    aws: MotoServer,
    smtp_sink: SmtpSink,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STATUS_TABLE", "no-such-table")
    records = [sqs_record(completed(f"v{i}", f"u{i}@example.com"), f"m{i}") for i in range(8)]
    sent = send(records, capsys)
    assert sent["response"] == {"batchItemFailures": []}
    assert len(smtp_sink.messages) == 8  # every email went
    assert (sent["metrics"]["StatusWriteFailed"], sent["metrics"]["StatusWritten"]) == (8, 0)
    assert sent["metrics"]["RecordsSent"] == 8
    store = handler.process.notifier.backend._adapters.status_store  # type: ignore[union-attr]
    # A few changes tried a few times, then the writer gives up for the batch.
    assert store.calls <= (status.GIVE_UP_AFTER - 1 + status.CONCURRENCY) * status.ATTEMPTS
    assert store.calls < 8 * status.ATTEMPTS
    assert status_env.events() == []  # nothing recorded, nothing told


# --------------------------------------------------------------------------- the mapping


TAGGED = {"tracking_id": ["ab" * 20], "video_id": ["v1"], "notification_id": ["n-1"]}


@pytest.mark.parametrize(
    ("event", "state", "reason"),
    [
        (delivery(None, tracking=TAGGED), "delivered", None),
        (
            ses_event("DeliveryDelay", None, tracking=TAGGED, delayType="MailboxFull"),
            "delayed",
            "delay:MailboxFull",
        ),
        (
            ses_event(
                "Bounce",
                None,
                tracking=TAGGED,
                bounceType="Transient",
                bounceSubType="MailboxFull",
                bouncedRecipients=[{"emailAddress": "ana@example.com"}],
            ),
            "bounced",
            "bounce:Transient:MailboxFull",
        ),
        (
            {
                **ses_event("Complaint", None, tracking=TAGGED),
                "complaint": {
                    "timestamp": "2026-12-05T10:00:02.000Z",
                    "complaintFeedbackType": "abuse",
                    "complainedRecipients": [{"emailAddress": "ana@example.com"}],
                },
            },
            "complained",
            "complaint:abuse",
        ),
        (
            ses_event("Reject", None, tracking=TAGGED, reject={"reason": "Bad content"}),
            "rejected",
            "reject:Bad content",
        ),
    ],
    ids=["delivery", "delay", "bounce", "complaint", "reject"],
)
def test_each_ses_event_is_a_status_of_the_tagged_notification(
    event: dict[str, Any], state: str, reason: str | None
) -> None:
    from async_notifier.ses_events import parse_ses_notification

    parsed = parse_ses_notification(json.dumps(event))
    assert parsed.status is not None
    assert not parsed.untracked
    change = parsed.status
    assert (change.state, change.reason, change.source) == (state, reason, "ses")
    assert (change.tracking_id, change.video_id, change.notification_id) == ("ab" * 20, "v1", "n-1")
    assert change.provider_id == event["mail"]["messageId"]
    assert change.event_id.startswith(f"ses:{event['eventType']}:")
    # Without the tag (or with one that is not a tracking id) there is nobody to tell.
    for tracking in ({}, {"tracking_id": ["ana@example.com"]}):
        untagged = {**event, "mail": {**event["mail"], "tags": tracking}}
        assert parse_ses_notification(json.dumps(untagged)).untracked
    # Sends, opens and the like say nothing about the status.
    assert parse_ses_notification(json.dumps({**event, "eventType": "Send"})).status is None


def test_each_fate_is_one_status() -> None:
    """`status_of` reads the decided fate: the same error means `failed` left in the queue
    and `dead_lettered` once copied; a retry says nothing yet."""
    from async_notifier.batch.outcome import Ack, DeadLetter, Outcome, Retry
    from async_notifier.batch.status import status_of
    from async_notifier.errors import (
        BucketNotAllowed,
        Expired,
        RecipientSuppressed,
        SmtpUnavailable,
    )
    from async_notifier.ports import Receipt

    def outcome(error: Any = None, receipt: Receipt | None = None) -> Outcome:
        return Outcome(
            "m1", error=error, tracking_id="ab" * 20, video_id="v1", receipt=receipt, attempt=3
        )

    def state(o: Outcome, fate: Any) -> str | None:
        change = status_of(o, fate, now=1_800_000_000.0)
        return change.state if change is not None else None

    sent = outcome(receipt=Receipt("ses", "0100-id"))
    change = status_of(sent, Ack(), now=1_800_000_000.0)
    assert change is not None
    assert (change.state, change.provider_id, change.transport, change.attempt) == (
        "accepted",
        "0100-id",
        "ses",
        3,
    )
    assert change.event_id == "accepted:m1:3"
    assert state(outcome(), Ack()) is None  # a duplicate, or delivered before
    refused = outcome(BucketNotAllowed("bucket x"))
    assert state(refused, Retry()) == "failed"
    assert state(refused, DeadLetter("bucket_not_allowed: bucket x")) == "dead_lettered"
    gone = outcome(RecipientSuppressed("addr-1 is suppressed"))
    assert state(gone, Retry()) == "suppressed"
    assert state(gone, DeadLetter("suppressed: addr-1")) == "suppressed"
    down = outcome(SmtpUnavailable("refused"))
    assert state(down, Retry(30)) is None
    assert state(down, DeadLetter("expired: old", Expired("old"))) == "expired"
    assert state(Outcome("m2", error=BucketNotAllowed("x")), Retry()) is None  # no notification


def test_a_status_store_that_never_answers_holds_no_send_back(
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    s3_proxy: Any,
    faulty_smtp: SmtpSink,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every status write hangs (the proxy takes DynamoDB's BatchWriteItem, with which the
    worker writes its verdicts, and never answers):
    the emails still go, each record succeeds, and the writes are counted as failed once the
    batch gives them their few seconds."""
    from faults import S3Action, S3Rule

    create_status_table(aws.endpoint_url, STATUS_TABLE)
    monkeypatch.setenv("STATUS_TABLE", STATUS_TABLE)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v1/v1.zip": make_zip(2_000, seed=1)})
    s3_proxy.set_rules(S3Rule(S3Action.STALL, target="DynamoDB_20120810.BatchWriteItem"))
    records = [sqs_record(completed(f"v{i}", f"u{i}@example.com"), f"m{i}") for i in range(4)]
    sent = send(records, capsys)
    assert sent["response"] == {"batchItemFailures": []}
    assert len(faulty_smtp.messages) == 4
    assert (sent["metrics"]["StatusWriteFailed"], sent["metrics"]["StatusWritten"]) == (4, 0)
    stalled = [r for r in s3_proxy.requests if r.target == "DynamoDB_20120810.BatchWriteItem"]
    assert stalled
    assert {r.action for r in stalled} == {S3Action.STALL}


def test_a_topic_without_a_table_tells_every_change(
    status_env: Subscriber,
    aws: MotoServer,
    smtp_sink: SmtpSink,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("STATUS_TABLE")
    body = completed("v1", "ana@example.com")
    sent = send([sqs_record(body, "m1")], capsys)
    assert (sent["metrics"]["StatusPublished"], sent["metrics"]["StatusWritten"]) == (1, 0)
    assert item(aws, tracking_id(body)) is None
    [event] = status_env.events(expected=1)
    assert (event["status"], event["current_status"]) == ("accepted", "accepted")
    assert event["tracking_id"] == tracking_id(body)
