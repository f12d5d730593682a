"""Delivery statuses in DynamoDB (STATUS_TABLE): one item per notification, and its reader.

The item is keyed by the notification's `tracking_id` (a hash: no address is stored) and
holds its current status (`status`, `rank`, `status_at`, `reason`), what is known of it
(`video_id`, `notification_id`, `provider_id`, `transport`, `attempts`), its `history` (a
list of every change, in the order written), the `events` recorded (a string set of
`event_id`s, which makes every write idempotent), times in epoch milliseconds
(`created_at`, `updated_at`) and the TTL (`expires_at`, epoch seconds, pushed on every
write). A global secondary index (`VIDEO_INDEX`: `video_id`, `created_at`) lists a video's
notifications.

Every write is one conditional `UpdateItem` (`delivery_status` states the rule): it sets
the status when the change outranks the current one (or ties and is not older) and its
event is new, and appends it to the history either way. When the condition fails the old
item says why (ReturnValuesOnConditionCheckFailure): an event already there is a duplicate,
anything else a change that lost on precedence, appended by a second `UpdateItem` that
leaves the status alone. No state can go by `BatchWriteItem`, which only puts whole items
unconditionally: any change may race another for the same notification (SES may report a
delivery before the worker's acceptance lands), and a put would overwrite it. Nor by
`TransactWriteItems`: one failed condition would cancel the whole batch's writes. So a
batch's writes are single `UpdateItem`s, a few in flight at once (`batch/status.py`).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable
from typing import Any, cast

from ..delivery_status import (
    STATES,
    TRACKING_ID_LENGTH,
    HistoryEntry,
    State,
    StatusChange,
    StatusRecord,
    StatusWrite,
    epoch_ms,
    is_tracking_id,
)
from ..errors import StatusUnavailable
from ..logs import get_logger
from .errors import aws_error
from .tables import create_table

log = get_logger()

VIDEO_INDEX = "video_id-created_at"
DEFAULT_TTL = 90 * 24 * 3600
_MESSAGE_ID = re.compile(f"<?([0-9a-f]{{{TRACKING_ID_LENGTH}}})@[^>]*>?")
_PLACEHOLDER = re.compile(r"[:#][A-Za-z_]+")
# Every attribute the expressions name goes through a placeholder (`status` and others are
# DynamoDB reserved words).
_NAMES = {
    f"#{name}": name
    for name in (
        "status", "rank", "status_at", "reason", "video_id", "notification_id", "provider_id",
        "transport", "attempts", "history", "events", "created_at", "updated_at", "expires_at",
    )
}  # fmt: skip


def tracking_id_from(text: str) -> str | None:
    """A tracking id from what a person may have at hand: the id itself, or the email's
    Message-ID (`<id@domain>`, whose local part it is for a message naming an address)."""
    text = text.strip().lower()
    if is_tracking_id(text):
        return text
    match = _MESSAGE_ID.fullmatch(text)
    return match.group(1) if match else None


async def create_status_table(client: Any, table: str) -> None:
    """The table as the template makes it (keyed by `id`, TTL on `expires_at`, and the
    video index), for local runs and tests; idempotent."""
    await create_table(
        client,
        table,
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
        now = self._clock()
        if change.source == "worker":
            # The worker's verdict is almost always a notification's first change: a put
            # that only creates the item (attribute_not_exists) says the same as the update
            # below on a missing item, and costs DynamoDB (and moto: a seventh of the CPU)
            # less to evaluate. An item that exists falls through to the full rules.
            try:
                await self._call(
                    "PutItem",
                    self._client.put_item,
                    TableName=self._table,
                    Item=self._new_item(change, now),
                    ConditionExpression="attribute_not_exists(#id)",
                    ExpressionAttributeNames={"#id": "id"},
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
                return StatusWrite("current", None)
            except _ConditionFailed:
                pass
        values: dict[str, Any] = {
            ":state": {"S": change.state},
            ":rank": {"N": str(change.rank)},
            ":at": {"N": str(change.at_ms)},
            ":now": {"N": str(epoch_ms(now))},
            ":expires": {"N": str(math.ceil(now) + self._ttl)},
            ":empty": {"L": []},
            ":entry": {"L": [{"M": _entry(change)}]},
            ":event": {"SS": [change.event_id]},
            ":event_id": {"S": change.event_id},
        }
        common = [
            "#updated_at = :now",
            "#expires_at = :expires",
            "#created_at = if_not_exists(#created_at, :now)",
            "#history = list_append(if_not_exists(#history, :empty), :entry)",
        ]
        # What the notification is: the first writer to know says it.
        first_known = {
            "video_id": change.video_id,
            "notification_id": change.notification_id,
            "provider_id": change.provider_id,
        }
        # What its latest attempt was: set with the status it goes with.
        latest: dict[str, dict[str, str] | None] = {
            "transport": None if change.transport is None else {"S": change.transport},
            "attempts": None if change.attempt is None else {"N": str(change.attempt)},
        }
        for name, text in first_known.items():
            if text is not None:
                values[f":{name}"] = {"S": text}
                common.append(f"#{name} = if_not_exists(#{name}, :{name})")
        for name, value in latest.items():
            if value is not None:
                values[f":{name}"] = value
        current = [
            *common,
            "#status = :state",
            "#rank = :rank",
            "#status_at = :at",
            *(f"#{name} = :{name}" for name, value in latest.items() if value is not None),
        ]
        remove = ""
        if change.reason is not None:
            values[":reason"] = {"S": change.reason}
            current.append("#reason = :reason")
        else:
            remove = " REMOVE #reason"
        try:
            response = await self._update(
                change,
                f"SET {', '.join(current)}{remove} ADD #events :event",
                "(attribute_not_exists(#rank) OR #rank < :rank OR "
                "(#rank = :rank AND #status_at <= :at)) AND NOT contains(#events, :event_id)",
                values,
            )
        except _ConditionFailed as failed:
            old = failed.item if failed.item is not None else await self._get(change.tracking_id)
            if old is None:  # expired (TTL) between the two: the next try creates it
                raise StatusUnavailable("the item vanished during a conditional write") from None
            before = record_of(old)
            if change.event_id in old.get("events", {}).get("SS", []):
                return StatusWrite("duplicate", before)
            # A higher or newer status stands: only the history and what was unknown.
            history = [
                *common,
                *(
                    f"#{name} = if_not_exists(#{name}, :{name})"
                    for name, value in latest.items()
                    if value is not None
                ),
            ]
            values = {k: v for k, v in values.items() if k not in (":state", ":rank", ":at")}
            values.pop(":reason", None)
            try:
                await self._update(
                    change,
                    f"SET {', '.join(history)} ADD #events :event",
                    "attribute_exists(#rank) AND NOT contains(#events, :event_id)",
                    values,
                )
            except _ConditionFailed:  # the same event, written meanwhile
                return StatusWrite("duplicate", before)
            return StatusWrite("history", before)
        old = response.get("Attributes")
        return StatusWrite("current", record_of(old) if old else None)

    def _new_item(self, change: StatusChange, now: float) -> dict[str, Any]:
        """The item `write`'s update makes of a missing one, whole."""
        item: dict[str, Any] = {
            "id": {"S": change.tracking_id},
            "status": {"S": change.state},
            "rank": {"N": str(change.rank)},
            "status_at": {"N": str(change.at_ms)},
            "history": {"L": [{"M": _entry(change)}]},
            "events": {"SS": [change.event_id]},
            "created_at": {"N": str(epoch_ms(now))},
            "updated_at": {"N": str(epoch_ms(now))},
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
            item["attempts"] = {"N": str(change.attempt)}
        return item

    async def _update(
        self, change: StatusChange, update: str, condition: str, values: dict[str, Any]
    ) -> dict[str, Any]:
        used = set(_PLACEHOLDER.findall(f"{update} {condition}"))
        return await self._call(
            "UpdateItem",
            self._client.update_item,
            TableName=self._table,
            Key={"id": {"S": change.tracking_id}},
            UpdateExpression=update,
            ConditionExpression=condition,
            ExpressionAttributeNames={k: v for k, v in _NAMES.items() if k in used},
            ExpressionAttributeValues={k: v for k, v in values.items() if k in used},
            ReturnValues="ALL_OLD",
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
        )

    async def _get(self, tracking_id: str) -> dict[str, Any] | None:
        response = await self._call(
            "GetItem",
            self._client.get_item,
            TableName=self._table,
            Key={"id": {"S": tracking_id}},
            ConsistentRead=True,
        )
        item = response.get("Item")
        return item if isinstance(item, dict) else None

    async def _call(self, operation: str, method: Any, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        try:
            return cast(dict[str, Any], await method(**kwargs))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = aws_error(exc)
            if error.code == "ConditionalCheckFailedException":
                item = error.response.get("Item")
                raise _ConditionFailed(item if isinstance(item, dict) else None) from None
            raise StatusUnavailable(f"DynamoDB {operation} failed: {error.describe()}") from None


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
        response = await self._call(
            "GetItem",
            self._client.get_item,
            TableName=self._table,
            Key={"id": {"S": key}},
            ConsistentRead=True,
        )
        item = response.get("Item")
        return record_of(item) if isinstance(item, dict) else None

    async def for_video(self, video_id: str, *, limit: int = 1000) -> list[StatusRecord]:
        found: list[StatusRecord] = []
        request: dict[str, Any] = {
            "TableName": self._table,
            "IndexName": VIDEO_INDEX,
            "KeyConditionExpression": "#video_id = :video_id",
            "ExpressionAttributeNames": {"#video_id": "video_id"},
            "ExpressionAttributeValues": {":video_id": {"S": video_id}},
        }
        while len(found) < limit:
            response = await self._call("Query", self._client.query, **request)
            found += [record_of(item) for item in response.get("Items", [])]
            last = response.get("LastEvaluatedKey")
            if not last:
                break
            request["ExclusiveStartKey"] = last
        return found[:limit]

    async def _call(self, operation: str, method: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return cast(dict[str, Any], await method(**kwargs))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = aws_error(exc)
            raise StatusUnavailable(f"DynamoDB {operation} failed: {error.describe()}") from None


class _ConditionFailed(Exception):
    def __init__(self, item: dict[str, Any] | None) -> None:
        super().__init__("conditional check failed")
        self.item = item


def _entry(change: StatusChange) -> dict[str, Any]:
    """A change as a history entry (a DynamoDB map)."""
    entry: dict[str, Any] = {
        "state": {"S": change.state},
        "at": {"N": str(change.at_ms)},
        "source": {"S": change.source},
    }
    for name, value in (
        ("reason", change.reason),
        ("provider_id", change.provider_id),
        ("transport", change.transport),
    ):
        if value is not None:
            entry[name] = {"S": value}
    if change.attempt is not None:
        entry["attempt"] = {"N": str(change.attempt)}
    return entry


def record_of(item: dict[str, Any]) -> StatusRecord:
    """A stored item as a `StatusRecord`."""

    def text(attributes: dict[str, Any], name: str) -> str | None:
        value = attributes.get(name, {}).get("S")
        return value if isinstance(value, str) else None

    def number(attributes: dict[str, Any], name: str) -> int | None:
        value = attributes.get(name, {}).get("N")
        return int(value) if isinstance(value, str) else None

    history = []
    for raw in item.get("history", {}).get("L", []):
        entry = raw.get("M", {})
        history.append(
            HistoryEntry(
                state=_state(text(entry, "state")),
                at_ms=number(entry, "at") or 0,
                source="ses" if text(entry, "source") == "ses" else "worker",
                reason=text(entry, "reason"),
                provider_id=text(entry, "provider_id"),
                transport=text(entry, "transport"),
                attempt=number(entry, "attempt"),
            )
        )
    history.sort(key=lambda e: e.at_ms)  # written in arrival order; read in time order
    return StatusRecord(
        tracking_id=text(item, "id") or "",
        status=_state(text(item, "status")),
        status_at_ms=number(item, "status_at") or 0,
        history=tuple(history),
        video_id=text(item, "video_id"),
        notification_id=text(item, "notification_id"),
        reason=text(item, "reason"),
        provider_id=text(item, "provider_id"),
        transport=text(item, "transport"),
        attempts=number(item, "attempts"),
        created_at_ms=number(item, "created_at"),
        updated_at_ms=number(item, "updated_at"),
    )


def _state(value: str | None) -> State:
    for state in STATES:
        if value == state:
            return state
    raise StatusUnavailable(f"the table holds an unknown state {str(value)[:40]!r}")
