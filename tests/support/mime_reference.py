"""The reference a streamed email is held to: the same message built entirely by the stdlib
email package, and the helpers that compare the two.

Shared by the MIME tests (mail/), the DATA-encoding and the channel tests (smtp/): each
builds its messages through `both`, which checks the fast build against the stdlib's on
the way.
"""

from __future__ import annotations

import json
import random
import re
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

from async_notifier.mail.mime import (
    _LINESEP,
    SMTP_POLICY,
    StreamedEmail,
    _Subject,
    attachment_filename,
    build_streamed_email,
    message_id,
    message_tags,
)
from async_notifier.mail.render import RenderedEmail, Renderer
from async_notifier.messages import Notification, parse_body

SENDER = Address(display_name="Async Notifier", username="no-reply", domain="example.com")
MiB = 1024 * 1024


def build_streamed_email_stdlib(
    notification: Notification,
    rendered: RenderedEmail,
    *,
    sender: Address,
    attachment: Path | None = None,
    attachment_name: str | None = None,
    reply_to: Address | None = None,
    configuration_set: str | None = None,
    tracking_id: str | None = None,
) -> StreamedEmail:
    """The reference: the whole build by the stdlib email package (~1.5 ms a message).

    `build_streamed_email` must produce the same bytes (Date and boundaries aside);
    the tests hold it to that. The stdlib builds the message with an empty attachment
    part: that yields the part's headers (filename encoded per RFC 2231 when non-ASCII)
    and an empty body followed by the closing boundary, and the base64 body slots in
    just before that boundary. Base64 lines never start with "--", so the boundary the
    stdlib chose cannot collide with the attachment it did not see.
    """
    if notification.email is None:
        raise ValueError("the recipient's address has not been looked up")
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = sender
    msg["To"] = Address(display_name=notification.name or "", addr_spec=notification.email)
    msg["Subject"] = _Subject(rendered.subject)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = mid = message_id(notification, sender.domain or "localhost")
    msg["X-Video-Id"] = notification.video_id
    msg["Auto-Submitted"] = "auto-generated"
    if reply_to is not None:
        msg["Reply-To"] = reply_to
    if configuration_set is not None:
        msg["X-SES-CONFIGURATION-SET"] = configuration_set
    # SES reads "name=value, name=value"; the stdlib would encode a long value as encoded
    # words, so the line goes in as written, folded after its commas when it is too long.
    tags = message_tags(notification, tracking_id)
    pairs = [f"{name}={value}" for name, value in tags]
    line = ", ".join(pairs)
    msg.set_raw(
        "X-SES-MESSAGE-TAGS",
        line if len(f"X-SES-MESSAGE-TAGS: {line}") <= 78 else ",\r\n ".join(pairs),
    )
    msg.set_content(rendered.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8", cte="quoted-printable")
    size = 0
    if attachment is not None:
        size = attachment.stat().st_size
        msg.add_attachment(
            b"",
            maintype="application",
            subtype="zip",
            filename=attachment_name or attachment_filename(notification),
        )
    # Set last, as the builder does: turning the message multipart moves Content-* headers down.
    msg["Content-Language"] = rendered.locale
    data = msg.as_bytes(policy=SMTP_POLICY.clone(refold_source="none"))
    head, tail = data, b""
    if attachment is not None:
        boundary = msg.get_boundary()  # set by the generator while flattening
        tail = _LINESEP + f"--{boundary}--".encode("ascii") + _LINESEP
        if boundary is None or not data.endswith(tail):
            raise RuntimeError("unexpected MIME layout from the email package: cannot stream")
        head = data[: -len(tail)]
    return StreamedEmail(
        sender=sender.addr_spec,
        recipient=notification.email,
        message_id=mid,
        head=head,
        attachment=attachment,
        attachment_size=size,
        tail=tail,
        tags=tags,
    )


def notification(**fields: Any) -> Notification:
    data: dict[str, Any] = {
        "video_id": "298ce197-3627-4845-83d7-cd6c98a9df8c",
        "status": "COMPLETED",
        "bucket": "videos-zip",
        "key": "298ce197/298ce197.zip",
        "email": "maria@example.com",
        "name": "Maria Conceição",
        "file_name": "férias.mp4",
        "locale": "pt-BR",
    }
    data.update(fields)
    return parse_body(json.dumps({k: v for k, v in data.items() if v is not None}))


def write_file(path: Path, size: int, seed: int = 7) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def both(
    renderer: Renderer,
    n: Notification,
    attachment: Path | None,
    name: str | None = None,
    rendered: RenderedEmail | None = None,
) -> tuple[bytes, StreamedEmail]:
    """The same inputs through the stdlib reference build and `build_streamed_email`."""
    if attachment is not None and name is None:
        name = attachment_filename(n)
    rendered = rendered or renderer.render(n, attachment_name=name)
    kwargs: dict[str, Any] = {"sender": SENDER, "attachment": attachment, "attachment_name": name}
    reference = b"".join(build_streamed_email_stdlib(n, rendered, **kwargs).iter_chunks())
    streamed = build_streamed_email(n, rendered, **kwargs)
    assert normalised(build_streamed_email(n, rendered, **kwargs).as_bytes()) == normalised(
        joined(streamed)
    )
    return reference, streamed


def joined(streamed: StreamedEmail, chunk_size: int = 256 * 1024) -> bytes:
    return b"".join(streamed.iter_chunks(chunk_size))


def normalised(data: bytes) -> bytes:
    """Bytes with what legitimately differs between two builds made fixed: Date, boundaries."""
    data = re.sub(rb"^Date: [^\r\n]*\r\n", b"Date: <fixed>\r\n", data, count=1, flags=re.M)
    for index, boundary in enumerate(dict.fromkeys(re.findall(rb'boundary="([^"]+)"', data))):
        data = data.replace(boundary, b"BOUNDARY-%d" % index)
    return data


def assert_no_defects(message: EmailMessage) -> None:
    for part in message.walk():
        assert part.defects == [], (part.get_content_type(), part.defects)
