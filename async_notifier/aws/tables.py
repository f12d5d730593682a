"""The DynamoDB tables the worker writes: the idempotency store, the suppression list and
the delivery statuses.

All are keyed by a string `id` and expire their items through TTL on `expires_at`, so one
function makes any of them (local runs, tests; the SAM template makes them in AWS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import aws_error


async def create_table(
    client: Any,
    table: str,
    *,
    attributes: Sequence[dict[str, str]] = (),
    indexes: Sequence[dict[str, Any]] = (),
) -> None:
    """Create the table (on-demand, keyed by `id`) with TTL on `expires_at`; idempotent.
    `indexes` are global secondary indexes over `attributes` (the status table's)."""
    extra: dict[str, Any] = {"GlobalSecondaryIndexes": list(indexes)} if indexes else {}
    try:
        await client.create_table(
            TableName=table,
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}, *attributes],
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
            **extra,
        )
    except Exception as exc:
        if aws_error(exc).code != "ResourceInUseException":
            raise
    waiter = client.get_waiter("table_exists")
    await waiter.wait(TableName=table, WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    described = await client.describe_time_to_live(TableName=table)
    status = described.get("TimeToLiveDescription", {}).get("TimeToLiveStatus")
    if status not in ("ENABLED", "ENABLING"):
        await client.update_time_to_live(
            TableName=table,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"},
        )
