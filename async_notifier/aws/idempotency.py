"""At most one email per notification across redeliveries: a DynamoDB idempotency store.

SQS delivers at least once, so the worker needs its own memory of what it sent: an optional
DynamoDB table keyed by the notification's identity (video_id, status, recipient); within a
batch, `dedup.py` does the same in memory.

The DynamoDB protocol: a conditional put claims a key as IN_PROGRESS until the invocation's
deadline; after the SMTP server accepts the email the key becomes COMPLETED for a TTL. A
claim whose invocation died expires with its deadline and can be taken over. If the table
cannot be reached the record fails (transiently): sending without the check could send twice.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from ..errors import IdempotencyUnavailable
from ..logs import get_logger
from .tables import ConditionFailed, dynamodb_call

log = get_logger()

KEY_VERSION = "v1"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
BeginResult = Literal["new", "completed", "in_progress"]
_T = TypeVar("_T")


def idempotency_key(notification_identity: str) -> str:
    """The store key for a `Notification.identity`; versioned so the scheme can change."""
    if not notification_identity:
        raise ValueError("empty notification identity")
    return f"{KEY_VERSION}:{notification_identity}"


class DynamoIdempotencyStore:
    """Cross-invocation claims in a DynamoDB table (hash key `id`, TTL on `expires_at`)."""

    def __init__(
        self,
        client: Any,
        table: str,
        *,
        ttl_seconds: int = 86_400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self._client = client
        self._table = table
        self._ttl = ttl_seconds
        self._clock = clock

    async def begin(self, identity: str, in_progress_until: float) -> BeginResult:
        """Claim an email's `identity` until `in_progress_until` (epoch seconds).

        "new": the caller may send. "completed": already sent, acknowledge without sending.
        "in_progress": another invocation holds a live claim; fail the record so it retries.
        """
        key = idempotency_key(identity)
        for _ in range(3):
            now = self._clock()
            try:
                await self._call(
                    "PutItem",
                    self._client.put_item,
                    TableName=self._table,
                    Item=_item(key, IN_PROGRESS, in_progress_until),
                    # An expired IN_PROGRESS belongs to an invocation that is gone. An expired
                    # COMPLETED is kept until DynamoDB deletes it: erring towards not resending.
                    ConditionExpression=(
                        "attribute_not_exists(#id) OR (#status = :in_progress AND #expires < :now)"
                    ),
                    ExpressionAttributeNames={
                        "#id": "id",
                        "#status": "status",
                        "#expires": "expires_at",
                    },
                    ExpressionAttributeValues={
                        ":in_progress": {"S": IN_PROGRESS},
                        ":now": {"N": _number(now)},
                    },
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
            except ConditionFailed as failed:
                existing = failed.item
                if existing is None:  # an emulator that does not return the old item
                    existing = await self._get(key)
                if existing is None:  # deleted in between (released or expired): try again
                    continue
                status = existing.get("status", {}).get("S")
                return "completed" if status == COMPLETED else "in_progress"
            return "new"
        return "in_progress"  # the key keeps changing under us: let SQS retry later

    async def complete(self, identity: str) -> None:
        """Mark the email sent, remembered for the TTL. Unconditional: the email is out."""
        key = idempotency_key(identity)
        await self._call(
            "PutItem",
            self._client.put_item,
            TableName=self._table,
            Item=_item(key, COMPLETED, self._clock() + self._ttl),
        )

    async def release(self, identity: str) -> None:
        """Drop an IN_PROGRESS claim so the record can be retried at once.

        Only for failures where the server accepted nothing; a COMPLETED key stays. Callers
        bound it (`AfterCutoff`): a release that does not complete leaves the claim to expire.
        """
        key = idempotency_key(identity)
        # A failed condition: completed meanwhile, or already gone; nothing to release.
        with contextlib.suppress(ConditionFailed):
            await self._call(
                "DeleteItem",
                self._client.delete_item,
                TableName=self._table,
                Key={"id": {"S": key}},
                ConditionExpression="#status = :in_progress",
                ExpressionAttributeNames={"#status": "status"},
                ExpressionAttributeValues={":in_progress": {"S": IN_PROGRESS}},
            )

    async def _get(self, key: str) -> dict[str, Any] | None:
        response = await self._call(
            "GetItem",
            self._client.get_item,
            TableName=self._table,
            Key={"id": {"S": key}},
            ConsistentRead=True,
        )
        item = response.get("Item")
        return item if isinstance(item, dict) else None

    async def _call(
        self, operation: str, method: Callable[..., Awaitable[dict[str, Any]]], **kwargs: Any
    ) -> dict[str, Any]:
        """One DynamoDB call: a failed condition is an answer, any other error unavailability."""
        try:
            return await dynamodb_call(operation, method, IdempotencyUnavailable, **kwargs)
        except IdempotencyUnavailable as exc:
            log.warning(
                "idempotency store unavailable",
                extra={"operation": operation, "table": self._table, "error": str(exc)[:500]},
            )
            raise


def _number(value: float) -> str:
    return str(math.ceil(value))


def _item(key: str, status: str, expires_at: float) -> dict[str, Any]:
    # Whole epoch seconds: the TTL attribute must be a Number of seconds.
    return {
        "id": {"S": key},
        "status": {"S": status},
        "expires_at": {"N": _number(expires_at)},
    }
