"""SQS set-up and inspection for the runner tests, against any real endpoint (moto, LocalStack)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import boto3

REGION = "us-east-1"
# What the runner must give the batch code for every record: Lambda's SQS record keys.
LAMBDA_RECORD_KEYS = {
    "messageId",
    "receiptHandle",
    "body",
    "attributes",
    "messageAttributes",
    "md5OfBody",
    "eventSource",
    "eventSourceARN",
    "awsRegion",
}
COUNT_ATTRIBUTES = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)


def client(service: str, endpoint_url: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@dataclass(frozen=True)
class Queues:
    url: str
    arn: str
    dlq_url: str
    dlq_arn: str


def create_queues(
    sqs: Any, *, visibility_timeout: int = 1, max_receive_count: int = 2, prefix: str = "runner"
) -> Queues:
    """A queue whose redrive policy moves a message to its DLQ after `max_receive_count`."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = arn_of(sqs, dlq_url)
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "VisibilityTimeout": str(visibility_timeout),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
            ),
        },
    )["QueueUrl"]
    return Queues(url, arn_of(sqs, url), dlq_url, dlq_arn)


def delete_queues(sqs: Any, queues: Queues) -> None:
    sqs.delete_queue(QueueUrl=queues.url)
    sqs.delete_queue(QueueUrl=queues.dlq_url)


def arn_of(sqs: Any, url: str) -> str:
    arn: str = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return arn


def send(sqs: Any, url: str, body: dict[str, Any] | str, **attributes: str | bytes) -> str:
    """Send one message (String/Binary attributes from keyword arguments); return its id."""
    message_attributes = {
        name: (
            {"DataType": "Binary", "BinaryValue": value}
            if isinstance(value, bytes)
            else {"DataType": "String", "StringValue": value}
        )
        for name, value in attributes.items()
    }
    response = sqs.send_message(
        QueueUrl=url,
        MessageBody=body if isinstance(body, str) else json.dumps(body),
        MessageAttributes=message_attributes,
    )
    message_id: str = response["MessageId"]
    return message_id


def counts(sqs: Any, url: str) -> dict[str, int]:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(COUNT_ATTRIBUTES))[
        "Attributes"
    ]
    return {name: int(attributes.get(name, 0)) for name in COUNT_ATTRIBUTES}


def receive_all(sqs: Any, url: str) -> list[dict[str, Any]]:
    """Every message currently visible in `url`, hidden for a minute after this call."""
    found: list[dict[str, Any]] = []
    while True:
        messages = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            VisibilityTimeout=60,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            return found
        found.extend(messages)


def notification(
    video_id: str,
    *,
    status: str = "COMPLETED",
    bucket: str | None = None,
    key: str | None = None,
    email: str | None = "user@example.com",
    locale: str = "en",
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "video_id": video_id,
        "status": status,
        "name": "Test User",
        "locale": locale,
    }
    if email is not None:
        body["email"] = email
    if status == "FAILED":
        body["message"] = "decoder error"
    if bucket is not None:
        body.update(bucket=bucket, key=key)
    return body


# Settings that make the redrive policy, not the worker, decide when a record gives up.
REDRIVE_ENV = {"RETRY_BACKOFF": "false"}
REDRIVE_UNSET = ("DEAD_LETTER_QUEUE_URL", "IDEMPOTENCY_TABLE")
