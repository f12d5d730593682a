"""A notification's delivery status: its states, which one wins, and the event told back.

The worker and the SES events function each learn part of a notification's fate: the
worker that its email was accepted (or why not), SES that it was delivered, delayed,
bounced, complained about or rejected. Both record what they learn as a `StatusChange`
keyed by the notification's `tracking_id` (`Notification.tracking_id`, which every email
carries as an SES message tag), and the store (`aws/status.py`) keeps the history of each
and, as its current status, the change that wins by the rules below. The same rules hold
however the writes interleave: SES may report a delivery before the worker's write of the
acceptance lands.

Precedence: a change replaces the current status when its rank is higher, or equal and not
older. The worker's verdicts on one attempt (`accepted`, `failed`, `dead_lettered`,
`expired`, `suppressed`) share the lowest rank, so the latest attempt speaks (an email
redriven from the dead-letter queue and then accepted is `accepted`); whatever SES says
about an accepted email outranks them all (`delayed` < `delivered` < `bounced`,
`complained`, `rejected`). A late `accepted` therefore never overwrites `delivered`, and
a `delayed` never overwrites `delivered`. Every change is kept in the history either way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

State = Literal[
    "accepted",
    "failed",
    "dead_lettered",
    "expired",
    "suppressed",
    "delayed",
    "delivered",
    "bounced",
    "complained",
    "rejected",
]
Source = Literal["worker", "ses"]

#: Each state's rank: a change replaces the current status when its rank is higher, or
#: equal and its time not older (see the module's docstring).
RANK: dict[State, int] = {
    "accepted": 1,
    "failed": 1,
    "dead_lettered": 1,
    "expired": 1,
    "suppressed": 1,
    "delayed": 2,
    "delivered": 3,
    "bounced": 4,
    "complained": 4,
    "rejected": 4,
}
STATES: tuple[State, ...] = tuple(RANK)
#: The states after which nothing more is expected (short of a redrive, or a complaint about
#: a delivered email): what a caller waiting for an answer waits for.
TERMINAL: frozenset[State] = frozenset(
    {"failed", "dead_lettered", "expired", "suppressed", "delivered", "bounced", "complained",
     "rejected"}
)  # fmt: skip
#: The version of the published event's shape (docs/status-event.schema.json).
EVENT_VERSION = 1
#: Hex digits of a tracking id (`Notification.tracking_id`: 160 bits, as the Message-ID's).
TRACKING_ID_LENGTH = 40
#: The SES message tag that carries it on every email (`mail.mime.message_tags`), so SES's
#: events (`mail.tags`) name their notification.
TRACKING_TAG = "tracking_id"
_TRACKING_ID = re.compile(f"[0-9a-f]{{{TRACKING_ID_LENGTH}}}")


def is_tracking_id(text: str) -> bool:
    return _TRACKING_ID.fullmatch(text) is not None


def supersedes(rank: int, at_ms: int, current_rank: int | None, current_at_ms: int | None) -> bool:
    """Whether a change (`rank`, `at_ms`) replaces the current status: the rule the store's
    condition expression states, here for the readers and the tests."""
    if current_rank is None or current_at_ms is None:
        return True
    return rank > current_rank or (rank == current_rank and at_ms >= current_at_ms)


def epoch_ms(when: float) -> int:
    """Epoch seconds as whole milliseconds, the store's unit of time."""
    return round(when * 1000)


def iso_time(at_ms: int) -> str:
    """Milliseconds since the epoch as ISO 8601 in UTC, `2026-12-05T10:00:01.000Z`."""
    moment = datetime.fromtimestamp(at_ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at_ms % 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class StatusChange:
    """One thing learnt about a notification. `event_id` makes it idempotent: the same
    change written twice (SES and SNS deliver at least once) is recorded once."""

    tracking_id: str
    state: State
    at_ms: int  # when it happened (the provider's time for SES's events)
    source: Source
    event_id: str
    video_id: str | None = None
    notification_id: str | None = None
    reason: str | None = None
    provider_id: str | None = None  # SES's MessageId, an SMTP relay's queue id
    transport: str | None = None
    attempt: int | None = None  # SQS's receive count of the record that was attempted

    @property
    def rank(self) -> int:
        return RANK[self.state]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One change as the store keeps it in a notification's history."""

    state: State
    at_ms: int
    source: Source
    reason: str | None = None
    provider_id: str | None = None
    transport: str | None = None
    attempt: int | None = None

    @property
    def time(self) -> str:
        return iso_time(self.at_ms)


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """A notification's delivery status as stored: what `DynamoStatusReader` returns."""

    tracking_id: str
    status: State
    status_at_ms: int
    history: tuple[HistoryEntry, ...]  # oldest first
    video_id: str | None = None
    notification_id: str | None = None
    reason: str | None = None  # the current status's
    provider_id: str | None = None
    transport: str | None = None
    attempts: int | None = None
    created_at_ms: int | None = None
    updated_at_ms: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


WriteResult = Literal["current", "history", "duplicate"]


@dataclass(frozen=True, slots=True)
class StatusWrite:
    """What writing one change did: it became the current status, was only added to the
    history (a higher or newer status stands), or was already recorded. `before` is the
    item as it was (None: the table did not know the notification)."""

    result: WriteResult
    before: StatusRecord | None = None

    @property
    def known(self) -> bool:
        return self.before is not None


def status_event(change: StatusChange, write: StatusWrite | None = None) -> dict[str, Any]:
    """The event published for a change (docs/status-event.schema.json): the change, with
    what the store already knew about the notification filled in, and the status it has
    now (`current_status`: the change's own, unless a higher or newer one stands)."""
    before = write.before if write is not None else None
    current = change.state
    if write is not None and write.result != "current" and before is not None:
        current = before.status

    def known(value: Any, stored: Any) -> Any:
        return value if value is not None else stored

    return {
        "version": EVENT_VERSION,
        "tracking_id": change.tracking_id,
        "notification_id": known(change.notification_id, before and before.notification_id),
        "video_id": known(change.video_id, before and before.video_id),
        "status": change.state,
        "current_status": current,
        "reason": change.reason,
        "time": iso_time(change.at_ms),
        "provider_message_id": known(change.provider_id, before and before.provider_id),
        "transport": known(change.transport, before and before.transport),
        "attempt": known(change.attempt, before and before.attempts),
        "source": change.source,
    }


def event_json(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), sort_keys=True)
