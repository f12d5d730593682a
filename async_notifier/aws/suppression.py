"""The suppression list in DynamoDB (SUPPRESSION_TABLE): what SES said about each address.

One item per address, keyed by a hash of it (the table never holds an address): the
latest reason, the first and last time, how many events, and whether it is suppressed.
A permanent bounce or a complaint suppresses the address for good; a soft event (a
transient or undetermined bounce) is counted, and its item expires after a while
(`expires_at`, the table's TTL) unless a hard one came. The worker checks a whole batch's
recipients in BatchGetItem calls of up to 100 keys, all at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from ..errors import SuppressionUnavailable
from ..logs import get_logger
from ..ses_events import AddressEvent
from .errors import aws_error

log = get_logger()

KEY_VERSION = "v1"
MAX_KEYS_PER_CALL = 100  # BatchGetItem's limit
_UNPROCESSED_ROUNDS = 5


def suppression_key(address: str) -> str:
    """The item's id for an address: a hash of its lower-case form, versioned."""
    digest = hashlib.sha256(address.strip().lower().encode("utf-8", "surrogatepass"))
    return f"{KEY_VERSION}:{digest.hexdigest()}"


class DynamoSuppressionList:
    """`ports.SuppressionList` over one DynamoDB table (hash key `id`, TTL `expires_at`)."""

    def __init__(
        self,
        client: Any,
        table: str,
        *,
        soft_ttl: int = 30 * 24 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._table = table
        self._soft_ttl = soft_ttl
        self._clock = clock
        self.calls = 0  # DynamoDB requests made

    async def suppressed(self, addresses: Collection[str]) -> dict[str, str]:
        by_key = {suppression_key(a): a for a in {a.lower() for a in addresses}}
        keys = list(by_key)
        chunks = [keys[i : i + MAX_KEYS_PER_CALL] for i in range(0, len(keys), MAX_KEYS_PER_CALL)]
        found: dict[str, str] = {}
        for items in await asyncio.gather(*(self._get(chunk) for chunk in chunks)):
            for item in items:
                if item.get("suppressed", {}).get("BOOL"):
                    address = by_key[item["id"]["S"]]
                    found[address] = item.get("reason", {}).get("S", "suppressed")
        return found

    async def record(self, events: Sequence[AddressEvent]) -> None:
        """Count each event against its address (in order: the last reason wins)."""
        for event in events:
            await self._update(event)

    async def _get(self, keys: list[str]) -> list[dict[str, Any]]:
        request: dict[str, Any] = {
            self._table: {
                "Keys": [{"id": {"S": key}} for key in keys],
                "ProjectionExpression": "#id, suppressed, reason",
                "ExpressionAttributeNames": {"#id": "id"},
            }
        }
        items: list[dict[str, Any]] = []
        for _ in range(_UNPROCESSED_ROUNDS):
            response = await self._call("BatchGetItem", RequestItems=request)
            items += response.get("Responses", {}).get(self._table, [])
            request = response.get("UnprocessedKeys") or {}
            if not request:
                return items
        raise SuppressionUnavailable("DynamoDB BatchGetItem left keys unprocessed (throttled)")

    async def _update(self, event: AddressEvent) -> None:
        now = math.floor(self._clock())
        values: dict[str, Any] = {
            ":one": {"N": "1"},
            ":now": {"N": str(now)},
            ":reason": {"S": event.reason},
            ":kind": {"S": event.kind},
        }
        sets = [
            "first_seen = if_not_exists(first_seen, :now)",
            "last_seen = :now",
            "reason = :reason",
            "kind = :kind",
        ]
        if event.hard:
            sets.append("suppressed = :yes")
            values[":yes"] = {"BOOL": True}
            update = f"SET {', '.join(sets)} ADD event_count :one REMOVE expires_at"
            await self._call(
                "UpdateItem",
                TableName=self._table,
                Key={"id": {"S": suppression_key(event.address)}},
                UpdateExpression=update,
                ExpressionAttributeValues=values,
            )
            return
        # Soft: counted; it expires unless the address is (or becomes) suppressed.
        sets.append("suppressed = if_not_exists(suppressed, :no)")
        values[":no"] = {"BOOL": False}
        values[":expires"] = {"N": str(now + self._soft_ttl)}
        update = f"SET {', '.join(sets)}, expires_at = :expires ADD event_count :one"
        try:
            await self._call(
                "UpdateItem",
                TableName=self._table,
                Key={"id": {"S": suppression_key(event.address)}},
                UpdateExpression=update,
                ConditionExpression="attribute_not_exists(suppressed) OR suppressed = :no",
                ExpressionAttributeValues=values,
            )
        except _AlreadySuppressed:  # a hard event came first: keep the item for good
            await self._call(
                "UpdateItem",
                TableName=self._table,
                Key={"id": {"S": suppression_key(event.address)}},
                UpdateExpression="SET last_seen = :now ADD event_count :one",
                ExpressionAttributeValues={":now": values[":now"], ":one": values[":one"]},
            )

    async def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        method = {
            "BatchGetItem": self._client.batch_get_item,
            "UpdateItem": self._client.update_item,
        }[operation]
        try:
            response: dict[str, Any] = await method(**kwargs)
            return response
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = aws_error(exc)
            if error.code == "ConditionalCheckFailedException":
                raise _AlreadySuppressed from None
            log.warning(
                "suppression list unavailable",
                extra={"operation": operation, "table": self._table, "error": error.describe()},
            )
            raise SuppressionUnavailable(
                f"DynamoDB {operation} failed: {error.describe()}"
            ) from None


class _AlreadySuppressed(Exception):
    pass
