"""SES's events, simulated: what SES would publish about an email it was given.

No local endpoint publishes SES events (moto's and LocalStack's SES keep what they are sent,
and a mail catcher is no SES at all), yet the delivery status needs them: `delivered`,
`bounced` and `complained` are SES's word. So the demo, and the canary's test, write the
event SES's configuration set would publish for an email, from the email itself: its
`X-SES-MESSAGE-TAGS` header gives `mail.tags` (as SES's SMTP interface reads it; the API's
`EmailTags` are the same tags), its recipients `mail.destination`. The event goes, in SNS's
envelope, on the SES events queue, so the real SES events function records it. Whatever
reads these events must say they are simulated.
"""

from __future__ import annotations

import email
import email.policy
import json
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any, Literal

from ..canary import SIMULATOR_DOMAIN

Outcome = Literal["delivered", "bounced", "complained"]

#: SES's mailbox simulator (`canary.EXPECTED`): what SES does with mail to each of its
#: addresses (a `+label` after the local part is allowed and changes nothing).
SIMULATOR: dict[str, Outcome] = {
    "success": "delivered",
    "bounce": "bounced",
    "complaint": "complained",
}


def simulator_outcome(address: str) -> Outcome | None:
    """What SES's mailbox simulator does with mail to `address` (None: not one of its
    success, bounce or complaint addresses)."""
    local, _, domain = address.strip().lower().rpartition("@")
    if domain != SIMULATOR_DOMAIN:
        return None
    return SIMULATOR.get(local.split("+", 1)[0])


def parse_email(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, _class=EmailMessage, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def mail_tags(message: EmailMessage) -> dict[str, list[str]]:
    """`mail.tags` as SES builds it from the email's `X-SES-MESSAGE-TAGS` header."""
    header = message["X-SES-MESSAGE-TAGS"]
    tags: dict[str, list[str]] = {}
    for pair in " ".join(str(header or "").split()).split(","):
        name, sep, value = pair.strip().partition("=")
        if sep and name:
            tags[name] = [value]
    return tags


def recipients(message: EmailMessage) -> list[str]:
    return [address for _, address in getaddresses([str(message["To"] or "")]) if address]


def ses_events(
    message: EmailMessage, outcome: Outcome, *, message_id: str, at: datetime | None = None
) -> list[dict[str, Any]]:
    """The configuration-set events SES publishes for an email with this outcome: a
    delivery; a permanent bounce; a delivery then a complaint (a complaint is about an
    email that was delivered)."""
    at = at or datetime.now(UTC)
    stamp = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    to = recipients(message)
    mail = {
        "timestamp": stamp,
        "source": str(message["From"] or ""),
        "messageId": message_id,
        "destination": to,
        "tags": mail_tags(message),
    }
    delivery = {
        "eventType": "Delivery",
        "mail": mail,
        "delivery": {
            "timestamp": stamp,
            "recipients": to,
            "smtpResponse": "250 2.6.0 Message received",
        },
    }
    if outcome == "delivered":
        return [delivery]
    if outcome == "bounced":
        bounce = {
            "bounceType": "Permanent",
            "bounceSubType": "General",
            "bouncedRecipients": [{"emailAddress": a, "status": "5.1.1"} for a in to],
            "timestamp": stamp,
        }
        return [{"eventType": "Bounce", "mail": mail, "bounce": bounce}]
    complaint = {
        "complainedRecipients": [{"emailAddress": a} for a in to],
        "complaintFeedbackType": "abuse",
        "timestamp": stamp,
    }
    return [delivery, {"eventType": "Complaint", "mail": mail, "complaint": complaint}]


def sns_envelope(event: dict[str, Any]) -> str:
    """An SES event as SNS puts it on an SQS queue without raw message delivery."""
    return json.dumps(
        {"Type": "Notification", "MessageId": str(uuid.uuid4()), "Message": json.dumps(event)}
    )
