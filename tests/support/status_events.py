"""The delivery-status peers the tests share: the table (made as the template makes it), a
subscriber's SQS queue on the status topic (moto), and the published events read back and
checked against the schema in docs/."""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path
from typing import Any

import boto3
import jsonschema

REGION = "us-east-1"
SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "status-event.schema.json"


@cache
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def create_status_table(endpoint_url: str, name: str) -> Any:
    """The table (key `id`, the video index, TTL), through the package's own function."""
    import asyncio

    import aioboto3

    from async_notifier.aws.status import create_status_table as create

    async def make() -> None:
        async with aioboto3.Session().client(
            "dynamodb", endpoint_url=endpoint_url, region_name=REGION
        ) as client:
            await create(client, name)

    asyncio.run(make())
    return boto3.client("dynamodb", endpoint_url=endpoint_url, region_name=REGION)


class Subscriber:
    """An SQS queue subscribed to a topic with raw message delivery: the pattern the docs
    give a service that must lose no event while it is down."""

    def __init__(self, endpoint_url: str, topic_name: str = "notification-status") -> None:
        self.sns = boto3.client("sns", endpoint_url=endpoint_url, region_name=REGION)
        self.sqs = boto3.client("sqs", endpoint_url=endpoint_url, region_name=REGION)
        self.topic_arn: str = self.sns.create_topic(Name=topic_name)["TopicArn"]
        self.queue_url: str = self.sqs.create_queue(QueueName=f"{topic_name}-subscriber")[
            "QueueUrl"
        ]
        queue_arn = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]
        self.sns.subscribe(
            TopicArn=self.topic_arn,
            Protocol="sqs",
            Endpoint=queue_arn,
            Attributes={"RawMessageDelivery": "true"},
        )

    def events(self, expected: int | None = None, *, wait: float = 10.0) -> list[dict[str, Any]]:
        """Every event waiting in the queue (deleted once read), each checked against the
        schema and its message attributes against its body. With `expected`, keep reading
        until that many have come (or `wait` seconds went by)."""
        found: list[dict[str, Any]] = []
        give_up = time.monotonic() + wait
        while True:
            messages = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=10,
                MessageAttributeNames=["All"],
                WaitTimeSeconds=0,
            ).get("Messages", [])
            for message in messages:
                event = json.loads(message["Body"])
                validator().validate(event)
                attributes = {
                    name: value["StringValue"]
                    for name, value in message.get("MessageAttributes", {}).items()
                }
                assert attributes["status"] == event["status"]
                assert attributes["current_status"] == event["current_status"]
                assert attributes.get("video_id") == event["video_id"]
                found.append(event)
                self.sqs.delete_message(
                    QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"]
                )
            if messages:
                continue
            if expected is None or len(found) >= expected or time.monotonic() > give_up:
                return found
            time.sleep(0.05)
