"""Delivery statuses in DynamoDB (STATUS_TABLE): every change one item, folded when read.

A notification's changes share its `tracking_id` (the partition key `id`: a hash, so no
address is stored); each is an item of its own under its `event_id` (the sort key `event`),
holding the change (`state`, `at`, `source`, `reason`, `provider_id`, `transport`,
`attempt`, and `video_id`/`notification_id` when the writer knows them), when it was
written (`created_at`, epoch ms) and its TTL (`expires_at`, epoch s). A global secondary
index (`VIDEO_INDEX`: `video_id`, `created_at`) finds a video's notifications.

Items are never updated, so writes cannot race: the current status is not stored but folded
when read (`fold`), by the rule `delivery_status` states, whatever order the changes landed
in (SES may report a delivery before the worker's acceptance lands). Writing the same event
again writes the same key: idempotent by construction. This is what lets the worker's
verdicts go by `BatchWriteItem`, 25 unconditional puts per call (`write_batch`): a batch of
2,000 records costs 80 requests, where conditional updates cost 2,000. A change from SES
(`write`) is a put that must be new (a failed condition is a duplicate event), then a
consistent Query of the notification's items, which says whether it became the status and
what was known before it, for the event told back.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..delivery_status import (
    RANK,
    STATES,
    TRACKING_ID_LENGTH,
    HistoryEntry,
    State,
    StatusChange,
    StatusRecord,
    StatusWrite,
    epoch_ms,
    is_tracking_id,
    supersedes,
)
from ..errors import StatusUnavailable
from .tables import ConditionFailed, create_table, dynamodb_call

VIDEO_INDEX = "video_id-created_at"
DEFAULT_TTL = 90 * 24 * 3600
#: Puts per BatchWriteItem call: DynamoDB's limit.
MAX_BATCH = 25
_MESSAGE_ID = re.compile(f"<?([0-9a-f]{{{TRACKING_ID_LENGTH}}})@[^>]*>?")


def tracking_id_from(text: str) -> str | None:
    """A tracking id from what a person may have at hand: the id itself, or the email's
    Message-ID (`<id@domain>`, whose local part it is for a message naming an address)."""
    text = text.strip().lower()
    if is_tracking_id(text):
        return text
    match = _MESSAGE_ID.fullmatch(text)
    return match.group(1) if match else None


async def create_status_table(client: Any, table: str) -> None:
    """The table as the template makes it (`id` and `event`, TTL on `expires_at`, and the
    video index), for local runs and tests; idempotent."""
    await create_table(
        client,
        table,
        sort_key="event",
        attributes=[
            {"AttributeName": "video_id", "AttributeType": "S"},
            {"AttributeName": "created_at", "AttributeType": "N"},
        ],
        indexes=[
            {
                "IndexName": VIDEO_INDEX,
                "KeySchema": [
                    {"AttributeName": "video_id", "KeyType": "HASH"},
                    {"AttributeName": "created_at", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
        ],
    )


class DynamoStatusStore:
    """`ports.StatusStore` over one DynamoDB table (see the module's docstring)."""

    max_batch = MAX_BATCH

    def __init__(
        self,
        client: Any,
        table: str,
        *,
        ttl_seconds: int = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self._client = client
        self._table = table
        self._ttl = ttl_seconds
        self._clock = clock
        self.calls = 0  # DynamoDB requests made

    async def write(self, change: StatusChange) -> StatusWrite:
        item = self._item(change, self._clock())
        try:
            await self._call(
                "PutItem",
                self._client.put_item,
                TableName=self._table,
                Item=item,
                ConditionExpression="attribute_not_exists(#event)",
                ExpressionAttributeNames={"#event": "event"},
            )
            duplicate = False
        except ConditionFailed:
            duplicate = True
        others = [
            found
            for found in await _query_items(
                self._call, self._client.query, self._table, change.tracking_id
            )
            if found.get("event", {}).get("S") != change.event_id
        ]
        before = fold(others) if others else None
        if duplicate:
            return StatusWrite("duplicate", before)
        if before is None or supersedes(
            change.rank, change.at_ms, RANK[before.status], before.status_at_ms
        ):
            return StatusWrite("current", before)
        return StatusWrite("history", before)

    async def write_batch(self, changes: Sequence[StatusChange]) -> list[StatusChange]:
        """Put up to `max_batch` changes in one call, unconditionally (a change written
        twice is the same item); return those DynamoDB left unprocessed, to try again."""
        if len(changes) > self.max_batch:
            raise ValueError(f"at most {self.max_batch} changes per call")
        now = self._clock()
        by_key = {(c.tracking_id, c.event_id): c for c in changes}  # a key once per call
        response = await self._call(
            "BatchWriteItem",
            self._client.batch_write_item,
            RequestItems={
                self._table: [
                    {"PutRequest": {"Item": self._item(change, now)}} for change in by_key.values()
                ]
            },
        )
        left = response.get("UnprocessedItems", {}).get(self._table, [])
        keys = (_key_of(request.get("PutRequest", {}).get("Item", {})) for request in left)
        return [by_key[key] for key in keys if key in by_key]

    def _item(self, change: StatusChange, now: float) -> dict[str, Any]:
        item: dict[str, Any] = {
            "id": {"S": change.tracking_id},
            "event": {"S": change.event_id},
            "state": {"S": change.state},
            "at": {"N": str(change.at_ms)},
            "source": {"S": change.source},
            "created_at": {"N": str(epoch_ms(now))},
            "expires_at": {"N": str(math.ceil(now) + self._ttl)},
        }
        for name, text in (
            ("reason", change.reason),
            ("video_id", change.video_id),
            ("notification_id", change.notification_id),
            ("provider_id", change.provider_id),
            ("transport", change.transport),
        ):
            if text is not None:
                item[name] = {"S": text}
        if change.attempt is not None:
            item["attempt"] = {"N": str(change.attempt)}
        return item

    async def _call(self, operation: str, method: Any, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        return await dynamodb_call(operation, method, StatusUnavailable, **kwargs)


class DynamoStatusReader:
    """Reads what `DynamoStatusStore` wrote: one notification's status, or a video's.

    `get` takes a tracking id (or the email's Message-ID, see `tracking_id_from`);
    `for_video` lists every notification of a video, oldest first. Both return
    `delivery_status.StatusRecord`s, their history oldest first, and raise
    `StatusUnavailable` when the table cannot be read.
    """

    def __init__(self, client: Any, table: str) -> None:
        self._client = client
        self._table = table

    async def get(self, tracking_id: str) -> StatusRecord | None:
        key = tracking_id_from(tracking_id)
        if key is None:
            raise ValueError(f"not a tracking id or Message-ID: {tracking_id[:80]!r}")
        items = await _query_items(self._call, self._client.query, self._table, key)
        return fold(items) if items else None

    async def for_video(self, video_id: str, *, limit: int = 1000) -> list[StatusRecord]:
        """The video's notifications in the order they were first written (the index holds
        the changes that name the video: the worker's)."""
        tracking_ids: dict[str, None] = {}
        request: dict[str, Any] = {
            "TableName": self._table,
            "IndexName": VIDEO_INDEX,
            "KeyConditionExpression": "#video_id = :video_id",
            "ExpressionAttributeNames": {"#video_id": "video_id", "#id": "id"},
            "ExpressionAttributeValues": {":video_id": {"S": video_id}},
            "ProjectionExpression": "#id",
        }
        while len(tracking_ids) < limit:
            response = await self._call("Query", self._client.query, **request)
            for item in response.get("Items", []):
                tracking_ids.setdefault(item.get("id", {}).get("S", ""), None)
            last = response.get("LastEvaluatedKey")
            if not last:
                break
            request["ExclusiveStartKey"] = last
        found = []
        for key in list(tracking_ids)[:limit]:
            items = await _query_items(self._call, self._client.query, self._table, key)
            if items:  # expired between the two reads
                found.append(fold(items))
        return found

    async def _call(self, operation: str, method: Any, **kwargs: Any) -> dict[str, Any]:
        return await dynamodb_call(operation, method, StatusUnavailable, **kwargs)


async def _query_items(
    call: Callable[..., Any], query: Any, table: str, tracking_id: str
) -> list[dict[str, Any]]:
    """Every item of one notification, read consistently."""
    items: list[dict[str, Any]] = []
    request: dict[str, Any] = {
        "TableName": table,
        "KeyConditionExpression": "#id = :id",
        "ExpressionAttributeNames": {"#id": "id"},
        "ExpressionAttributeValues": {":id": {"S": tracking_id}},
        "ConsistentRead": True,
    }
    while True:
        response = await call("Query", query, **request)
        items += response.get("Items", [])
        last = response.get("LastEvaluatedKey")
        if not last:
            return items
        request["ExclusiveStartKey"] = last


def fold(items: Iterable[dict[str, Any]]) -> StatusRecord:
    """A notification's items (at least one) as its `StatusRecord`: the history in time
    order, and as the status the change that wins by `delivery_status.supersedes` taken in
    that order. What the notification is (video, notification and provider ids) is what
    the first change to know it said; what its latest attempt was (transport, attempts)
    comes with the status it goes with, or from any change when that one does not say."""
    changes = sorted(
        (_Stored.of(item) for item in items), key=lambda c: (c.entry.at_ms, c.written, c.event)
    )
    if not changes:
        raise ValueError("a notification has at least one change")
    current = changes[0]
    for change in changes[1:]:
        if supersedes(
            RANK[change.entry.state], change.entry.at_ms, RANK[current.entry.state],
            current.entry.at_ms,
        ):  # fmt: skip
            current = change

    def first(values: Iterable[Any]) -> Any:
        return next((value for value in values if value is not None), None)

    latest = [current, *reversed(changes)]
    return StatusRecord(
        tracking_id=changes[0].tracking_id,
        status=current.entry.state,
        status_at_ms=current.entry.at_ms,
        history=tuple(change.entry for change in changes),
        video_id=first(c.video_id for c in changes),
        notification_id=first(c.notification_id for c in changes),
        reason=current.entry.reason,
        provider_id=first(c.entry.provider_id for c in changes),
        transport=first(c.entry.transport for c in latest),
        attempts=first(c.entry.attempt for c in latest),
        created_at_ms=min(c.written for c in changes),
        updated_at_ms=max(c.written for c in changes),
    )


@dataclass(frozen=True, slots=True)
class _Stored:
    """One item as read: the change it records and what the history entry leaves out."""

    tracking_id: str
    event: str
    written: int
    entry: HistoryEntry
    video_id: str | None
    notification_id: str | None

    @classmethod
    def of(cls, item: dict[str, Any]) -> _Stored:
        def text(name: str) -> str | None:
            value = item.get(name, {}).get("S")
            return value if isinstance(value, str) else None

        def number(name: str) -> int | None:
            value = item.get(name, {}).get("N")
            return int(value) if isinstance(value, str) else None

        return cls(
            tracking_id=text("id") or "",
            event=text("event") or "",
            written=number("created_at") or 0,
            entry=HistoryEntry(
                state=_state(text("state")),
                at_ms=number("at") or 0,
                source="ses" if text("source") == "ses" else "worker",
                reason=text("reason"),
                provider_id=text("provider_id"),
                transport=text("transport"),
                attempt=number("attempt"),
            ),
            video_id=text("video_id"),
            notification_id=text("notification_id"),
        )


def _key_of(item: dict[str, Any]) -> tuple[str, str]:
    return item.get("id", {}).get("S", ""), item.get("event", {}).get("S", "")


def _state(value: str | None) -> State:
    for state in STATES:
        if value == state:
            return state
    raise StatusUnavailable(f"the table holds an unknown state {str(value)[:40]!r}")
