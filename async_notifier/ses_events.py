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
from datetime import UTC, datetime
from typing import Any, Literal

from .delivery_status import TRACKING_TAG, State, StatusChange, epoch_ms, is_tracking_id
from .errors import BadMessage, redact
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


@dataclass(frozen=True, slots=True)
class SesNotification:
    """What one SES notification says: its address events (for the suppression list) and
    the delivery status it reports, found through the email's `tracking_id` tag
    (`untracked`: it reports one, but carries no such tag)."""

    event_type: str
    addresses: list[AddressEvent]
    status: StatusChange | None = None
    untracked: bool = False


def parse_ses_event(body: str) -> list[AddressEvent]:
    """The address events of one SQS record (none for a delivery); BadMessage otherwise."""
    return parse_ses_notification(body).addresses


def parse_ses_notification(body: str) -> SesNotification:
    """One SQS record's SES notification; BadMessage when it is not one."""
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
    addresses: list[AddressEvent] = []
    if event_type == "Bounce":
        addresses = _bounce(data.get("bounce"))
    elif event_type == "Complaint":
        addresses = _complaint(data.get("complaint"))
    elif event_type not in _IGNORED:
        raise BadMessage(f"unknown SES event type {event_type[:40]!r}")
    if event_type not in _STATES:
        return SesNotification(event_type, addresses)
    status = _status(event_type, data, addresses)
    return SesNotification(event_type, addresses, status, untracked=status is None)


# The events that are a delivery status, and the object that holds each one's details.
_STATES: dict[str, tuple[State, str | None]] = {
    "Delivery": ("delivered", "delivery"),
    "DeliveryDelay": ("delayed", "deliveryDelay"),
    "Bounce": ("bounced", "bounce"),
    "Complaint": ("complained", "complaint"),
    "Reject": ("rejected", None),
}


def _status(
    event_type: str, data: dict[str, Any], addresses: list[AddressEvent]
) -> StatusChange | None:
    """The status an event reports, on the notification its email's tags name (None when
    they name none: an email sent without one, or an identity's feedback notification)."""
    mail = data.get("mail")
    if not isinstance(mail, dict):
        raise BadMessage("SES notification's 'mail' is not an object")
    tags = mail.get("tags")
    tags = tags if isinstance(tags, dict) else {}
    tracking_id = _tag(tags, TRACKING_TAG)
    if tracking_id is None or not is_tracking_id(tracking_id):
        return None
    state, detail_name = _STATES[event_type]
    detail = data.get(detail_name) if detail_name else None
    detail = detail if isinstance(detail, dict) else {}
    when = detail.get("timestamp") or mail.get("timestamp")
    at_ms = epoch_ms(_time(when))
    reason: str | None = None
    if event_type in ("Bounce", "Complaint"):
        reason = addresses[0].reason
    elif event_type == "DeliveryDelay":
        reason = f"delay:{_text(detail.get('delayType') or 'Undetermined', 'delayType')}"
    elif event_type == "Reject":
        reject = data.get("reject")
        said = reject.get("reason") if isinstance(reject, dict) else None
        reason = f"reject:{_text(said or 'unspecified', 'reject.reason')}"
    provider_id = mail.get("messageId")
    provider_id = _text(provider_id, "mail.messageId") if provider_id is not None else None
    return StatusChange(
        tracking_id=tracking_id,
        state=state,
        at_ms=at_ms,
        source="ses",
        event_id=f"ses:{event_type}:{provider_id or '-'}:{at_ms}",
        video_id=_tag(tags, "video_id"),
        notification_id=_tag(tags, "notification_id"),
        reason=redact(reason) if reason is not None else None,
        provider_id=provider_id,
    )


def _tag(tags: dict[str, Any], name: str) -> str | None:
    """A tag's value as SES gives it (a list of one string), when it is a short one."""
    values = tags.get(name)
    value = values[0] if isinstance(values, list) and values else None
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        return None
    return value if value.isprintable() else None


def _time(value: Any) -> float:
    if not isinstance(value, str):
        raise BadMessage("SES notification has no timestamp")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadMessage(f"SES timestamp is not ISO 8601: {value[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


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
