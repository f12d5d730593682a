"""SES event notifications: which addresses bounced or complained, and what that means.

SES publishes the events of a configuration set (`eventType`) or of an identity's feedback
notifications (`notificationType`) to SNS, and SNS to an SQS queue, either wrapped in its
envelope or, with raw message delivery, as the SES JSON itself. A permanent bounce or a
complaint means: never mail that address again (providers, SES above all, suspend senders
who keep trying). A transient or undetermined bounce is counted and remembered for a while,
not suppressed. Deliveries, sends and the rest carry nothing to remember. Anything else is
a bad message, reported like any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from .errors import BadMessage
from .messages import MAX_TEXT, validate_address

Kind = Literal["bounce", "complaint"]
# What the SES schema calls the events this module reads; the rest are acknowledged.
_IGNORED = frozenset(
    {"Delivery", "Send", "Reject", "Open", "Click", "Rendering Failure", "DeliveryDelay",
     "Subscription", "Received"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class AddressEvent:
    """One address's bounce or complaint. `hard`: suppress it from now on."""

    address: str
    kind: Kind
    hard: bool
    reason: str  # "bounce:Permanent:General", "complaint:abuse"...


def parse_ses_event(body: str) -> list[AddressEvent]:
    """The address events of one SQS record (none for a delivery); BadMessage otherwise."""
    data = _json(body, "body")
    if isinstance(data, dict) and data.get("Type") == "Notification" and "Message" in data:
        if not isinstance(data["Message"], str):
            raise BadMessage("SNS envelope Message is not a string")
        data = _json(data["Message"], "SNS Message")
    if not isinstance(data, dict):
        raise BadMessage("SES notification is not a JSON object")
    event_type = data.get("eventType") or data.get("notificationType")
    if not isinstance(event_type, str) or "mail" not in data:
        raise BadMessage("not an SES notification (no eventType or notificationType, no mail)")
    if event_type == "Bounce":
        return _bounce(data.get("bounce"))
    if event_type == "Complaint":
        return _complaint(data.get("complaint"))
    if event_type in _IGNORED:
        return []
    raise BadMessage(f"unknown SES event type {event_type[:40]!r}")


def _bounce(bounce: Any) -> list[AddressEvent]:
    if not isinstance(bounce, dict):
        raise BadMessage("SES Bounce without a 'bounce' object")
    bounce_type = _text(bounce.get("bounceType"), "bounceType")
    sub_type = _text(bounce.get("bounceSubType", "") or "-", "bounceSubType")
    hard = bounce_type == "Permanent"
    reason = f"bounce:{bounce_type}:{sub_type}"
    return [
        AddressEvent(address, "bounce", hard, reason)
        for address in _addresses(bounce.get("bouncedRecipients"), "bouncedRecipients")
    ]


def _complaint(complaint: Any) -> list[AddressEvent]:
    if not isinstance(complaint, dict):
        raise BadMessage("SES Complaint without a 'complaint' object")
    feedback = complaint.get("complaintFeedbackType") or "unspecified"
    reason = f"complaint:{_text(feedback, 'complaintFeedbackType')}"
    return [
        AddressEvent(address, "complaint", True, reason)
        for address in _addresses(complaint.get("complainedRecipients"), "complainedRecipients")
    ]


def _addresses(recipients: Any, field: str) -> list[str]:
    if not isinstance(recipients, list) or not recipients:
        raise BadMessage(f"SES notification has no {field}")
    found = []
    for recipient in recipients:
        raw = recipient.get("emailAddress") if isinstance(recipient, dict) else None
        if not isinstance(raw, str):
            raise BadMessage(f"an entry of {field} has no emailAddress")
        try:
            found.append(validate_address(raw).lower())
        except ValueError as exc:
            raise BadMessage(f"an emailAddress of {field} {exc}") from None
    return found


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise BadMessage(f"SES field {field!r} is missing or not a short string")
    if not value.isprintable():
        raise BadMessage(f"SES field {field!r} contains control characters")
    return value


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BadMessage(f"{what} is not valid JSON: {exc}") from None
