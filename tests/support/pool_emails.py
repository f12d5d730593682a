"""Small numbered emails for the SMTP pool tests, and what a server should have received.

Shared by the pool tests and the pool-resilience tests: the pool sends `StreamedEmail`s, the
same type the delivery builds, and the tests count them back by subject on the server side.
"""

from __future__ import annotations

import email.policy
from email.message import EmailMessage

from servers import SmtpSink

from async_notifier.config import Settings
from async_notifier.mail.mime import StreamedEmail

SENDER = "no-reply@example.com"


def settings(host: str, port: int, **extra: str) -> Settings:
    env = {
        "SMTP_SERVER": host,
        "SMTP_PORT": str(port),
        "SMTP_TLS": "none",
        "EMAIL_FROM": f"Async Notifier <{SENDER}>",
        "ALLOWED_BUCKETS": "*",
        "SMTP_TIMEOUT": "10",
        **extra,
    }
    return Settings.from_env(env)


def outgoing(index: int, recipient: str | None = None) -> StreamedEmail:
    """A small email in the form the pool sends (the pipeline builds the same type)."""
    to = recipient or f"user{index}@example.com"
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = SENDER
    message["To"] = to
    message["Subject"] = f"message {index}"
    message["Message-ID"] = f"<m{index}@example.com>"
    message.set_content(f"body {index}")
    return StreamedEmail(
        sender=SENDER,
        recipient=to,
        message_id=f"<m{index}@example.com>",
        head=message.as_bytes(),
        attachment=None,
        attachment_size=0,
        tail=b"",
    )


def subjects(sink: SmtpSink) -> list[str]:
    return sorted(str(m["Subject"]) for m in sink.parsed())


def expected_subjects(count: int) -> list[str]:
    return sorted(f"message {i}" for i in range(count))
