"""The DynamoDB tables the worker writes (the idempotency store, the suppression list and
the delivery statuses), and the one way their adapters call DynamoDB.

All are keyed by a string `id` (the statuses also by a sort key) and expire their items
through TTL on `expires_at`, so one function makes any of them (local runs, tests; the SAM
template makes them in AWS).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .errors import aws_error


async def create_table(
    client: Any,
    table: str,
    *,
    sort_key: str | None = None,
    attributes: Sequence[dict[str, str]] = (),
    indexes: Sequence[dict[str, Any]] = (),
) -> None:
    """Create the table (on-demand, keyed by `id` and the string `sort_key` if given) with
    TTL on `expires_at`; idempotent. `indexes` are global secondary indexes over
    `attributes` (the status table's)."""
    extra: dict[str, Any] = {"GlobalSecondaryIndexes": list(indexes)} if indexes else {}
    keys = [("id", "HASH"), *([(sort_key, "RANGE")] if sort_key else [])]
    try:
        await client.create_table(
            TableName=table,
            AttributeDefinitions=[
                *({"AttributeName": name, "AttributeType": "S"} for name, _ in keys),
                *attributes,
            ],
            KeySchema=[{"AttributeName": name, "KeyType": kind} for name, kind in keys],
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


class ConditionFailed(Exception):
    """A write's condition did not hold: an answer, not a failure. `item` is the item as it
    was, when the call asked for it (ReturnValuesOnConditionCheckFailure)."""

    def __init__(self, item: dict[str, Any] | None) -> None:
        super().__init__("conditional check failed")
        self.item = item


async def dynamodb_call(
    operation: str,
    method: Callable[..., Awaitable[dict[str, Any]]],
    unavailable: Callable[[str], Exception],
    **kwargs: Any,
) -> dict[str, Any]:
    """One DynamoDB call: a failed condition raises `ConditionFailed`, any other error
    `unavailable` (the caller's error class) with the operation and AWS's code."""
    try:
        return await method(**kwargs)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        error = aws_error(exc)
        if error.code == "ConditionalCheckFailedException":
            item = error.response.get("Item")
            raise ConditionFailed(item if isinstance(item, dict) else None) from None
        detail = error.describe() if error.code else f"{error.type_name}: {str(exc)[:300]}"
        raise unavailable(f"DynamoDB {operation} failed: {detail}") from exc
