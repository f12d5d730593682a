"""Bounces and complaints: SES notifications through SNS and SQS (moto) into the suppression
table (DynamoDB on moto), and the worker that never mails a suppressed address again."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest
from servers import (
    REGION,
    FakeLambdaContext,
    MotoServer,
    SmtpSink,
    log_lines,
    sqs_event,
    sqs_record,
)

import handler
from async_notifier.aws.suppression import suppression_key
from async_notifier.errors import BadMessage
from async_notifier.runner import QueueInfo, lambda_record
from async_notifier.ses_events import AddressEvent, parse_ses_event

TABLE = "suppression"


def ses(event_type: str, **detail: Any) -> dict[str, Any]:
    """An SES event as configuration-set event publishing writes it (trimmed to what matters,
    with the shape and names of the real thing)."""
    mail = {
        "timestamp": "2026-12-05T10:00:00.000Z",
        "source": "no-reply@example.com",
        "sourceArn": "arn:aws:ses:us-east-1:123456789012:identity/example.com",
        "messageId": "0100018c1c2d3e4f-abcdefab-1234-5678-9abc-def012345678-000000",
        "destination": ["ana@example.com"],
        "headersTruncated": False,
        "tags": {"ses:configuration-set": ["notifier-events"]},
    }
    return {"eventType": event_type, "mail": mail, **detail}


def bounce(kind: str, sub_type: str, *addresses: str) -> dict[str, Any]:
    return ses(
        "Bounce",
        bounce={
            "feedbackId": "0100018c-bounce",
            "bounceType": kind,
            "bounceSubType": sub_type,
            "bouncedRecipients": [
                {"emailAddress": a, "action": "failed", "status": "5.1.1"} for a in addresses
            ],
            "timestamp": "2026-12-05T10:00:01.000Z",
            "reportingMTA": "dns; smtp.example.net",
        },
    )


def complaint(*addresses: str) -> dict[str, Any]:
    return ses(
        "Complaint",
        complaint={
            "feedbackId": "0100018c-complaint",
            "complaintSubType": None,
            "complainedRecipients": [{"emailAddress": a} for a in addresses],
            "timestamp": "2026-12-05T10:00:02.000Z",
            "userAgent": "Mozilla/5.0",
            "complaintFeedbackType": "abuse",
            "arrivalDate": "2026-12-05T10:00:02.000Z",
        },
    )


def delivery() -> dict[str, Any]:
    return ses(
        "Delivery",
        delivery={
            "timestamp": "2026-12-05T10:00:01.000Z",
            "processingTimeMillis": 546,
            "recipients": ["ana@example.com"],
            "smtpResponse": "250 2.6.0 Message received",
        },
    )


def sns_envelope(message: dict[str, Any]) -> str:
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": "9e2b-4d5f",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:ses-events",
            "Message": json.dumps(message),
            "Timestamp": "2026-12-05T10:00:03.000Z",
        }
    )


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("wrap", [json.dumps, sns_envelope], ids=["raw", "sns-envelope"])
def test_ses_shapes_become_address_events(wrap: Any) -> None:
    assert parse_ses_event(wrap(bounce("Permanent", "General", "Ana@Example.com"))) == [
        AddressEvent("ana@example.com", "bounce", True, "bounce:Permanent:General")
    ]
    assert parse_ses_event(wrap(bounce("Transient", "MailboxFull", "b@example.com"))) == [
        AddressEvent("b@example.com", "bounce", False, "bounce:Transient:MailboxFull")
    ]
    assert parse_ses_event(wrap(complaint("c@example.com", "d@example.com"))) == [
        AddressEvent("c@example.com", "complaint", True, "complaint:abuse"),
        AddressEvent("d@example.com", "complaint", True, "complaint:abuse"),
    ]
    assert parse_ses_event(wrap(delivery())) == []
    # Identity feedback notifications say notificationType instead of eventType.
    legacy = bounce("Permanent", "General", "e@example.com")
    legacy["notificationType"] = legacy.pop("eventType")
    assert parse_ses_event(wrap(legacy))[0].hard


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        json.dumps({"video_id": "v1", "email": "a@example.com"}),  # a notification, not SES
        json.dumps(ses("Bounce")),  # no bounce object
        json.dumps(bounce("Permanent", "General")),  # no recipients
        json.dumps(bounce("Permanent", "General", "not an address")),
        json.dumps(ses("SomethingNew")),
        sns_envelope({"Type": "SubscriptionConfirmation"}),
    ],
)
def test_malformed_or_foreign_notifications_are_bad_messages(body: str) -> None:
    with pytest.raises(BadMessage):
        parse_ses_event(body)


# --------------------------------------------------------------------------- recording


@pytest.fixture
def dynamodb(aws: MotoServer) -> Any:
    client = boto3.client("dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION)
    client.create_table(
        TableName=TABLE,
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return client


@pytest.fixture
def events_env(
    aws: MotoServer, dynamodb: Any, monkeypatch: pytest.MonkeyPatch, fresh_handler: None
) -> None:
    """The SES events function's settings: no SMTP, no sender, the suppression table."""
    for name in ("SMTP_SERVER", "EMAIL_FROM", "ALLOWED_BUCKETS", "DEAD_LETTER_QUEUE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUPPRESSION_TABLE", TABLE)
    monkeypatch.setenv("RETRY_BACKOFF", "false")


def item(dynamodb: Any, address: str) -> dict[str, Any] | None:
    response = dynamodb.get_item(TableName=TABLE, Key={"id": {"S": suppression_key(address)}})
    found: dict[str, Any] | None = response.get("Item")
    return found


@pytest.mark.parametrize("raw_delivery", [False, True], ids=["sns-envelope", "raw-delivery"])
def test_ses_events_arrive_through_sns_and_sqs_and_are_recorded(
    raw_delivery: bool, aws: MotoServer, dynamodb: Any, events_env: None
) -> None:
    sns = boto3.client("sns", endpoint_url=aws.endpoint_url, region_name=REGION)
    sqs = boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name=REGION)
    topic = sns.create_topic(Name="ses-events")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="ses-events")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(
        TopicArn=topic,
        Protocol="sqs",
        Endpoint=queue_arn,
        Attributes={"RawMessageDelivery": "true" if raw_delivery else "false"},
    )
    for event in (
        bounce("Permanent", "General", "hard@example.com"),
        bounce("Transient", "MailboxFull", "soft@example.com"),
        complaint("angry@example.com"),
        delivery(),
    ):
        sns.publish(TopicArn=topic, Message=json.dumps(event))
    messages = sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, AttributeNames=["All"]
    )["Messages"]
    assert len(messages) == 4
    queue = QueueInfo(queue_url, queue_arn)
    records = [lambda_record(m, queue) for m in messages]
    records.append(sqs_record("not an SES notification", "foreign"))
    result = handler.ses_events_handler(sqs_event(records), FakeLambdaContext())
    assert result == {"batchItemFailures": [{"itemIdentifier": "foreign"}]}

    hard = item(dynamodb, "hard@example.com")
    assert hard is not None
    assert hard["suppressed"] == {"BOOL": True}
    assert hard["reason"] == {"S": "bounce:Permanent:General"}
    assert "expires_at" not in hard  # for good
    soft = item(dynamodb, "soft@example.com")
    assert soft is not None
    assert soft["suppressed"] == {"BOOL": False}  # counted, not suppressed
    assert "expires_at" in soft
    angry = item(dynamodb, "angry@example.com")
    assert angry is not None
    assert angry["suppressed"] == {"BOOL": True}
    # The table holds hashes, never an address.
    scanned = json.dumps(dynamodb.scan(TableName=TABLE)["Items"])
    for address in ("hard@example.com", "soft@example.com", "angry@example.com"):
        assert address not in scanned


def test_events_add_up_and_a_hard_one_wins(dynamodb: Any, events_env: None) -> None:
    # One invocation each: two records of one batch update the item concurrently, which
    # DynamoDB's ADD counts twice and moto's server, not atomic across its threads, may not.
    for message_id in ("1", "2"):
        soft = [sqs_record(json.dumps(bounce("Transient", "General", "x@example.com")), message_id)]
        assert handler.ses_events_handler(sqs_event(soft), FakeLambdaContext()) == {
            "batchItemFailures": []
        }
    first = item(dynamodb, "x@example.com")
    assert first is not None
    assert first["event_count"] == {"N": "2"}
    assert first["suppressed"] == {"BOOL": False}
    hard = [sqs_record(json.dumps(bounce("Permanent", "General", "x@example.com")), "3")]
    handler.ses_events_handler(sqs_event(hard), FakeLambdaContext())
    later_soft = [sqs_record(json.dumps(bounce("Transient", "General", "x@example.com")), "4")]
    handler.ses_events_handler(sqs_event(later_soft), FakeLambdaContext())
    final = item(dynamodb, "x@example.com")
    assert final is not None
    assert final["suppressed"] == {"BOOL": True}  # a soft event never undoes it
    assert final["event_count"] == {"N": "4"}
    assert "expires_at" not in final


# --------------------------------------------------------------------------- the worker


@pytest.fixture
def worker(
    worker_env: dict[str, str],
    dynamodb: Any,
    monkeypatch: pytest.MonkeyPatch,
    fresh_handler: None,
) -> dict[str, str]:
    monkeypatch.setenv("ALLOWED_BUCKETS", "*")
    monkeypatch.setenv("SUPPRESSION_TABLE", TABLE)
    monkeypatch.setenv("RETRY_BACKOFF", "false")
    return worker_env


def suppress(*addresses: str) -> None:
    records = [
        sqs_record(json.dumps(bounce("Permanent", "General", a)), f"b-{i}")
        for i, a in enumerate(addresses)
    ]
    assert handler.ses_events_handler(sqs_event(records), FakeLambdaContext()) == {
        "batchItemFailures": []
    }


def test_a_suppressed_recipient_is_never_mailed_or_retried(
    worker: dict[str, str],
    aws: MotoServer,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sqs = boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name=REGION)
    dlq_url = sqs.create_queue(QueueName="notifier-dlq")["QueueUrl"]
    monkeypatch.setenv("DEAD_LETTER_QUEUE_URL", dlq_url)
    suppress("gone@example.com")
    records = [
        sqs_record({"video_id": "v1", "status": "FAILED", "email": "GONE@example.com"}, "m1"),
        sqs_record({"video_id": "v2", "status": "FAILED", "email": "here@example.com"}, "m2"),
    ]
    result = handler.lambda_handler(sqs_event(records), FakeLambdaContext())
    assert result == {"batchItemFailures": []}  # m1 dead-lettered: never retried
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["here@example.com"]]
    out = capsys.readouterr().out
    [failure] = [e for e in log_lines(out) if e.get("outcome") == "failed"]
    assert (failure["error_class"], failure["transient"]) == ("suppressed", False)
    assert "bounce:Permanent:General" in failure["reason"]
    [metrics] = [e for e in log_lines(out) if "RecordsSuppressed" in e]
    assert metrics["RecordsSuppressed"] == 1
    [dead] = sqs.receive_message(QueueUrl=dlq_url, MessageAttributeNames=["All"])["Messages"]
    assert dead["MessageAttributes"]["error_class"]["StringValue"] == "suppressed"
    assert "bounce:Permanent" in dead["MessageAttributes"]["error_reason"]["StringValue"]


def suppress_many(dynamodb: Any, addresses: list[str]) -> None:
    """`suppress` for hundreds of addresses: the first through the SES events handler, the
    others as copies of the item it wrote, each under its own address's key, 25 a request
    (BatchWriteItem) instead of an UpdateItem each."""
    first, *others = addresses
    suppress(first)
    written = item(dynamodb, first)
    assert written is not None
    for start in range(0, len(others), 25):
        puts = [
            {"PutRequest": {"Item": {**written, "id": {"S": suppression_key(address)}}}}
            for address in others[start : start + 25]
        ]
        assert dynamodb.batch_write_item(RequestItems={TABLE: puts})["UnprocessedItems"] == {}


def test_a_batch_of_1000_recipients_is_checked_in_a_handful_of_calls(
    worker: dict[str, str], dynamodb: Any, smtp_sink: SmtpSink
) -> None:
    """One read for the whole batch: BatchGetItem takes 100 keys, so 1,000 distinct
    recipients cost 10 requests (sent at once), not 1,000."""
    addresses = [f"user{i}@example.com" for i in range(1000)]
    suppress_many(dynamodb, addresses[:990])  # all but ten are suppressed: the test stays quick
    records = [
        sqs_record({"video_id": f"v{i}", "status": "FAILED", "email": a}, f"m{i}")
        for i, a in enumerate(addresses)
    ]
    result = handler.lambda_handler(sqs_event(records), FakeLambdaContext())
    assert len(result["batchItemFailures"]) == 990  # no dead-letter queue: reported failed
    store = handler.process.notifier.backend._adapters.suppression  # type: ignore[union-attr]
    assert store.calls == 10
    assert len(smtp_sink.messages) == 10


def test_a_recipient_found_in_cognito_is_checked_too(
    worker: dict[str, str], aws: MotoServer, smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    cognito = boto3.client("cognito-idp", endpoint_url=aws.endpoint_url, region_name=REGION)
    pool = cognito.create_user_pool(PoolName="users")["UserPool"]["Id"]
    for name in ("bouncer", "fine"):
        cognito.admin_create_user(
            UserPoolId=pool,
            Username=name,
            UserAttributes=[
                {"Name": "email", "Value": f"{name}@example.com"},
                {"Name": "email_verified", "Value": "true"},
            ],
            MessageAction="SUPPRESS",
        )
    monkeypatch.setenv("COGNITO_USER_POOL_ID", pool)
    suppress("bouncer@example.com")
    records = [
        sqs_record({"video_id": "v1", "status": "FAILED", "cognito_user_id": "bouncer"}, "m1"),
        sqs_record({"video_id": "v2", "status": "FAILED", "cognito_user_id": "fine"}, "m2"),
    ]
    result = handler.lambda_handler(sqs_event(records), FakeLambdaContext())
    assert result == {"batchItemFailures": [{"itemIdentifier": "m1"}]}
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["fine@example.com"]]
