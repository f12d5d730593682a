"""events/: the sample events for `sam local invoke -e` read by the code's own parsers.

Each file is the event Lambda hands a function, an SQS batch: events/notifications.json for
the notifier (a COMPLETED and a FAILED notification, in docs/message.md's shape),
events/ses-events.json for the SES events function (a bounce as raw delivery sends it and a
complaint inside SNS's envelope). Parsed here record by record, as the worker parses them,
so that a change to the message format or to the parsers cannot leave them behind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from async_notifier.messages import SqsRecord, parse_body
from async_notifier.ses_events import AddressEvent, parse_ses_event

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "events"
NOTIFICATIONS = EVENTS / "notifications.json"
SES_EVENTS = EVENTS / "ses-events.json"


def _records(path: Path) -> list[SqsRecord]:
    event: dict[str, Any] = json.loads(path.read_text())
    assert set(event) == {"Records"}
    records = [SqsRecord.from_event(raw) for raw in event["Records"]]
    assert len({record.message_id for record in records}) == len(records)
    return records


def test_every_file_is_a_sample() -> None:
    assert sorted(path.name for path in EVENTS.iterdir()) == sorted(
        [NOTIFICATIONS.name, SES_EVENTS.name]
    )


@pytest.mark.parametrize("path", [NOTIFICATIONS, SES_EVENTS], ids=lambda path: path.name)
def test_records_are_what_sqs_hands_lambda(path: Path) -> None:
    for record in _records(path):
        assert record.raw["eventSource"] == "aws:sqs"
        assert record.event_source_arn is not None
        assert record.event_source_arn.startswith("arn:aws:sqs:")
        assert record.raw["md5OfBody"] == hashlib.md5(record.body.encode()).hexdigest()  # noqa: S324
        assert record.receive_count == 1
        assert record.sent_at is not None
        assert record.message_group_id is None


def test_notifications_are_a_completed_and_a_failed_video() -> None:
    notifications = [parse_body(record.body) for record in _records(NOTIFICATIONS)]
    by_status = {notification.status: notification for notification in notifications}
    assert sorted(by_status) == ["COMPLETED", "FAILED"]
    completed, failed = by_status["COMPLETED"], by_status["FAILED"]
    assert (completed.bucket, completed.key) == ("videos-zip", "298ce197/298ce197.zip")
    assert completed.email == "maria@example.com"
    assert completed.locale == "pt-BR"
    assert failed.bucket is None
    assert failed.message
    assert failed.locale == "en"
    # The COMPLETED body is the example of the README and of docs/message.md.
    body = json.loads(next(r.body for r in _records(NOTIFICATIONS) if "COMPLETED" in r.body))
    for document in (ROOT / "README.md", ROOT / "docs" / "message.md"):
        text = document.read_text()
        for key, value in body.items():
            assert f'"{key}": {json.dumps(value)}' in text, (document.name, key)


def test_ses_events_are_a_hard_bounce_and_a_complaint_raw_and_wrapped() -> None:
    records = _records(SES_EVENTS)
    wrapped = [json.loads(record.body).get("Type") == "Notification" for record in records]
    assert sorted(wrapped) == [False, True]
    events = [event for record in records for event in parse_ses_event(record.body)]
    assert events == [
        AddressEvent("bounce@simulator.amazonses.com", "bounce", True, "bounce:Permanent:General"),
        AddressEvent("complaint@simulator.amazonses.com", "complaint", True, "complaint:abuse"),
    ]
