"""Build the MIME message: text and HTML alternatives, plus the ZIP when there is one.

Headers are produced by the standard library's email policy, which encodes
non-ASCII names (RFC 2047/2231) and refuses CR/LF in header values, a second
line of defence behind `messages`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path, PurePosixPath

from .messages import Notification
from .render import RenderedEmail

SMTP_POLICY = policy.SMTP.clone(max_line_length=78)
_UNSAFE_FILENAME = re.compile(r'[\\/:*?"<>|\x00-\x1f\x7f]+')


@dataclass(frozen=True)
class OutgoingEmail:
    sender: str
    recipient: str
    message_id: str
    data: bytes


def message_id(notification: Notification, domain: str) -> str:
    """Derived from the record's identity, so a redelivered record repeats it."""
    return f"<{notification.identity[:40]}@{domain}>"


def attachment_filename(notification: Notification) -> str:
    """A safe `<video name>.zip`; the key's path never reaches the client."""
    base = notification.file_name or PurePosixPath(notification.key or "").name
    base = unicodedata.normalize("NFC", base or "")
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    stem = " ".join(_UNSAFE_FILENAME.sub("_", stem).split()).strip(" ._")[:100]
    return f"{stem or 'frames'}.zip"


def build_email(
    notification: Notification,
    rendered: RenderedEmail,
    *,
    sender: Address,
    attachment: Path | None = None,
    attachment_name: str | None = None,
) -> OutgoingEmail:
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = sender
    msg["To"] = Address(display_name=notification.name or "", addr_spec=notification.email)
    msg["Subject"] = rendered.subject
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = mid = message_id(notification, sender.domain or "localhost")
    msg["X-Video-Id"] = notification.video_id
    msg.set_content(rendered.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8", cte="quoted-printable")
    if attachment is not None:
        msg.add_attachment(
            attachment.read_bytes(),
            maintype="application",
            subtype="zip",
            filename=attachment_name or attachment_filename(notification),
        )
    # Set last: turning the message multipart moves Content-* headers into the first part.
    msg["Content-Language"] = rendered.locale
    return OutgoingEmail(
        sender=sender.addr_spec,
        recipient=notification.email,
        message_id=mid,
        data=msg.as_bytes(policy=SMTP_POLICY),
    )
