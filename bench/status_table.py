"""The delivery-status table on the benchmark's moto (`--status-table`).

With it, the project writes one status per record (`accepted`) to STATUS_TABLE while it
sends, which is what the A/B against code from before the status work measures: that code
ignores the setting. The table is made as the template makes it (keys `id` and `event`,
the video index); each project run is checked to have written a status for every record,
so a run that dropped writes cannot look cheap.
"""

from __future__ import annotations

from typing import Any

import boto3

NAME = "bench-status"
REGION = "us-east-1"


def _client(endpoint_url: str) -> Any:
    return boto3.client(
        "dynamodb",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106 - moto's dummy credentials
    )


def create(endpoint_url: str) -> None:
    """The table, empty (after moto's reset)."""
    _client(endpoint_url).create_table(
        TableName=NAME,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[
            {"AttributeName": "id", "AttributeType": "S"},
            {"AttributeName": "event", "AttributeType": "S"},
            {"AttributeName": "video_id", "AttributeType": "S"},
            {"AttributeName": "created_at", "AttributeType": "N"},
        ],
        KeySchema=[
            {"AttributeName": "id", "KeyType": "HASH"},
            {"AttributeName": "event", "KeyType": "RANGE"},
        ],
        GlobalSecondaryIndexes=[
            {
                "IndexName": "video_id-created_at",
                "KeySchema": [
                    {"AttributeName": "video_id", "KeyType": "HASH"},
                    {"AttributeName": "created_at", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
        ],
    )


def clear(endpoint_url: str) -> None:
    """Drop every item (a run's count must be its own)."""
    client = _client(endpoint_url)
    request: dict[str, Any] = {
        "TableName": NAME,
        "ProjectionExpression": "#id, #event",
        "ExpressionAttributeNames": {"#id": "id", "#event": "event"},
    }
    while True:
        page = client.scan(**request)
        for item in page.get("Items", []):
            client.delete_item(TableName=NAME, Key={"id": item["id"], "event": item["event"]})
        if "LastEvaluatedKey" not in page:
            return
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def count(endpoint_url: str) -> int:
    """Items in the table: one per change (each record's `accepted`)."""
    client = _client(endpoint_url)
    request: dict[str, Any] = {"TableName": NAME, "Select": "COUNT"}
    total = 0
    while True:
        page = client.scan(**request)
        total += int(page.get("Count", 0))
        if "LastEvaluatedKey" not in page:
            return total
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]
