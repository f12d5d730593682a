"""Delivery statuses as a person or a script reads them: `async-notifier status`'s output.

The text is for whoever asks "did Maria get the email?" at a terminal: one block per
notification, its current status first, then every change in time order. The JSON is for
scripts, with the field names of the published event (docs/status-event.schema.json) where
they mean the same thing, so one parser reads both.
"""

from __future__ import annotations

import json
from typing import Any

from .delivery_status import HistoryEntry, StatusRecord, iso_time


def record_json(record: StatusRecord) -> dict[str, Any]:
    """One notification's status and history as plain JSON values."""

    def when(at_ms: int | None) -> str | None:
        return None if at_ms is None else iso_time(at_ms)

    return {
        "tracking_id": record.tracking_id,
        "video_id": record.video_id,
        "notification_id": record.notification_id,
        "status": record.status,
        "terminal": record.terminal,
        "time": iso_time(record.status_at_ms),
        "reason": record.reason,
        "provider_message_id": record.provider_id,
        "transport": record.transport,
        "attempts": record.attempts,
        "created_at": when(record.created_at_ms),
        "updated_at": when(record.updated_at_ms),
        "history": [_entry_json(entry) for entry in record.history],
    }


def _entry_json(entry: HistoryEntry) -> dict[str, Any]:
    return {
        "state": entry.state,
        "time": entry.time,
        "source": entry.source,
        "reason": entry.reason,
        "provider_message_id": entry.provider_id,
        "transport": entry.transport,
        "attempt": entry.attempt,
    }


def records_json(records: list[StatusRecord]) -> str:
    """`status --json`: `{"notifications": [...]}`, oldest first, one document."""
    return json.dumps({"notifications": [record_json(r) for r in records]}, indent=2)


def records_text(records: list[StatusRecord]) -> str:
    """`status`'s readable output: a block per notification, a blank line between."""
    return "\n\n".join(record_text(record) for record in records)


def record_text(record: StatusRecord) -> str:
    head = f"notification {record.tracking_id}"
    if record.video_id:
        head += f"  video {record.video_id}"
    if record.notification_id:
        head += f"  notification_id {record.notification_id}"
    status = f"  status: {record.status} since {iso_time(record.status_at_ms)}"
    if record.reason:
        status += f" ({record.reason})"
    known = [
        f"{name} {value}"
        for name, value in (
            ("transport", record.transport),
            ("attempts", record.attempts),
            ("provider id", record.provider_id),
        )
        if value is not None
    ]
    lines = [head, status]
    if known:
        lines.append("  " + ", ".join(known))
    lines.append("  history:")
    width = max((len(entry.state) for entry in record.history), default=0)
    for entry in record.history:
        line = f"    {entry.time}  {entry.state:<{width}}  {entry.source:<6}"
        details = [
            text
            for text in (
                entry.transport,
                None if entry.attempt is None else f"attempt {entry.attempt}",
                None if entry.provider_id is None else f"provider id {entry.provider_id}",
                entry.reason,
            )
            if text
        ]
        if details:
            line += "  " + ", ".join(details)
        lines.append(line.rstrip())
    return "\n".join(lines)
