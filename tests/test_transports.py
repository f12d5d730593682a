"""Both transports end to end through `handler.lambda_handler`: TRANSPORT=ses on moto's SES v2
API, and an SMTP primary that is down with the SES API as FALLBACK_TRANSPORT.

moto keeps the raw messages it was sent (`local/ses_outbox.py` reads them back), so each test
counts what SES accepted, by Message-ID: every email once.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
from typing import Any

import pytest
from servers import (
    FakeLambdaContext,
    MotoServer,
    SmtpSink,
    failed_ids,
    free_port,
    log_lines,
    make_zip,
    s3_client,
    seed_objects,
    sqs_event,
    sqs_record,
)

import handler
from async_notifier.aws.clients import aws_client
from async_notifier.config import Settings
from async_notifier.local.ses_outbox import sent_messages

SENDER = "no-reply@example.com"


def records(count: int) -> list[dict[str, Any]]:
    found = []
    for i in range(count):
        body: dict[str, Any] = {"video_id": f"v{i}", "email": f"u{i}@example.com"}
        if i % 2:
            body.update(status="FAILED", message="decoder error")
        else:
            body.update(status="COMPLETED", bucket="videos-zip", key=f"v{i}.zip")
        found.append(sqs_record(body, f"m-{i}"))
    return found


async def verify_sender(aws: MotoServer) -> None:
    s = Settings.from_env(
        {"EMAIL_FROM": SENDER, "ALLOWED_BUCKETS": "*", "TRANSPORT": "ses"}, sending=True
    )
    async with aws_client("ses", s) as ses:
        await ses.verify_email_identity(EmailAddress=SENDER)


def accepted_by_ses(aws: MotoServer) -> list[str]:
    ids = []
    for sent in sent_messages(aws.endpoint_url):
        message = email.message_from_bytes(sent.raw, policy=email.policy.default)
        ids.append(str(message["Message-ID"]))
    return sorted(ids)


def metric(lines: list[dict[str, Any]], name: str, **dimensions: str) -> Any:
    for line in lines:
        if "_aws" in line and name in line and all(line.get(k) == v for k, v in dimensions.items()):
            if not dimensions and any(k in line for k in ("Transport", "ErrorClass", "Condition")):
                continue
            return line[name]
    return None


@pytest.fixture
def ses_env(
    lambda_env: dict[str, str], aws: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    asyncio.run(verify_sender(aws))
    seed_objects(
        s3_client(aws.endpoint_url),
        bucket,
        {f"v{i}.zip": make_zip(30_000, seed=i) for i in range(0, 6, 2)},
    )
    monkeypatch.setenv("RETRY_BACKOFF", "false")  # synthetic records: no queue to delay in
    monkeypatch.setenv("EMAIL_FROM", f"Async Notifier <{SENDER}>")
    monkeypatch.setenv("SMTP_RATE_LIMIT", "none")  # moto's SES says 1 message/s
    return lambda_env


def test_the_ses_api_transport_delivers_every_email_once(
    ses_env: dict[str, str],
    aws: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TRANSPORT", "ses")
    monkeypatch.delenv("SMTP_SERVER")  # not needed: the function's role sends
    batch = records(6)
    result = handler.lambda_handler(sqs_event(batch), FakeLambdaContext())
    handler.reset()

    assert failed_ids(result) == []
    sent = accepted_by_ses(aws)
    assert len(sent) == 6
    assert len(set(sent)) == 6
    lines = log_lines(capsys.readouterr().out)
    done = [line for line in lines if line.get("message") == "record done"]
    assert {line["transport"] for line in done} == {"ses"}
    assert all(line["provider_id"] for line in done)  # SES's MessageId
    assert metric(lines, "MessagesAccepted", Transport="ses") == 6
    assert metric(lines, "FallbackMessages") == 0


def test_an_smtp_relay_that_is_down_hands_its_mail_to_the_ses_api(
    ses_env: dict[str, str],
    aws: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SMTP_PORT", str(free_port()))  # nothing listens: connections refused
    monkeypatch.setenv("SMTP_BREAKER_THRESHOLD", "1")
    monkeypatch.setenv("FALLBACK_TRANSPORT", "ses")
    batch = records(6)
    result = handler.lambda_handler(sqs_event(batch), FakeLambdaContext())
    handler.reset()

    # The connection attempts that opened the circuit failed their records' first tries;
    # their retries, and every other record, went through the SES API: each email once.
    assert failed_ids(result) == []
    sent = accepted_by_ses(aws)
    assert len(sent) == 6
    assert len(set(sent)) == 6
    lines = log_lines(capsys.readouterr().out)
    assert metric(lines, "FallbackMessages") == 6
    assert metric(lines, "MessagesAccepted", Transport="ses") == 6


# --------------------------------------------------------------------------- the same delivery


def summary(raw: bytes) -> tuple[Any, ...]:
    """What a reader sees of an email, without what differs per send (Date, boundaries)."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    attachments = tuple(
        (part.get_filename(), part.get_content()) for part in message.iter_attachments()
    )
    return (
        str(message["Message-ID"]),
        str(message["To"]),
        str(message["Subject"]),
        str(message["From"]),
        text.get_content() if text is not None else None,
        html.get_content() if html is not None else None,
        attachments,
    )


def mixed_batch() -> list[dict[str, Any]]:
    """Good records of both statuses and locales, a bad one, one whose ZIP is missing, and one
    too large to attach (a link)."""
    batch = records(4)
    batch.append(sqs_record("{not json", "m-bad"))
    missing = {"video_id": "gone", "status": "COMPLETED", "bucket": "videos-zip", "key": "x.zip"}
    batch.append(sqs_record({**missing, "email": "gone@example.com"}, "m-missing"))
    big = {"video_id": "big", "status": "COMPLETED", "bucket": "videos-zip", "key": "big.zip"}
    batch.append(sqs_record({**big, "email": "big@example.com", "locale": "en"}, "m-big"))
    return batch


def test_both_transports_deliver_the_same_emails(
    ses_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same batch through each transport: the same records fail, and every email a reader
    receives is the same (headers, both bodies, the attachments byte for byte, the link)."""
    seed_objects(s3_client(aws.endpoint_url), bucket, {"big.zip": make_zip(400_000, seed=7)})
    monkeypatch.setenv("MAX_ATTACHMENT_BYTES", "300000")  # big.zip goes as a link
    emails: dict[str, list[tuple[Any, ...]]] = {}
    for transport in ("smtp", "ses"):
        monkeypatch.setenv("TRANSPORT", transport)
        result = handler.lambda_handler(sqs_event(mixed_batch()), FakeLambdaContext())
        handler.reset()
        assert failed_ids(result) == ["m-bad", "m-missing"], transport
    emails["smtp"] = sorted(summary(message.data) for message in smtp_sink.messages)
    emails["ses"] = sorted(summary(sent.raw) for sent in sent_messages(aws.endpoint_url))
    assert len(emails["smtp"]) == len(emails["ses"]) == 5
    for by_smtp, by_ses in zip(emails["smtp"], emails["ses"], strict=True):
        assert by_smtp[:4] == by_ses[:4]  # Message-ID, To, Subject, From
        assert _unlinked(by_smtp[4]) == _unlinked(by_ses[4])  # the text
        assert _unlinked(by_smtp[5]) == _unlinked(by_ses[5])  # the HTML
        assert by_smtp[6] == by_ses[6]  # the attachments
    assert sum(bool(e[6]) for e in emails["ses"]) == 2  # two ZIPs attached, one linked
    assert any("<link>" in (_unlinked(e[4]) or "") for e in emails["ses"])


def _unlinked(body: str | None) -> str | None:
    """A body with its presigned link's signature and expiry blanked (they differ per run)."""
    if body is None:
        return None
    return re.sub(r"https?://[^\s\"'<>]+", "<link>", body)
