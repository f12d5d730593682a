"""The whole message as bytes, for previews and tests; sending streams it instead.

There is one builder, `mime_stream.build_streamed_email`; this joins its chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.headerregistry import Address
from pathlib import Path

from .messages import Notification
from .mime_stream import SMTP_POLICY, attachment_filename, build_streamed_email, message_id
from .render import RenderedEmail

__all__ = ["SMTP_POLICY", "OutgoingEmail", "attachment_filename", "build_email", "message_id"]


@dataclass(frozen=True)
class OutgoingEmail:
    sender: str
    recipient: str
    message_id: str
    data: bytes


def build_email(
    notification: Notification,
    rendered: RenderedEmail,
    *,
    sender: Address,
    attachment: Path | None = None,
    attachment_name: str | None = None,
) -> OutgoingEmail:
    streamed = build_streamed_email(
        notification,
        rendered,
        sender=sender,
        attachment=attachment,
        attachment_name=attachment_name,
    )
    return OutgoingEmail(
        sender=streamed.sender,
        recipient=streamed.recipient,
        message_id=streamed.message_id,
        data=b"".join(streamed.iter_chunks()),
    )
