"""Provider-wide conditions end to end: the Lambda function fails such a batch fast, and
`SMTP_RATE_LIMIT=auto` reads the account's rate and daily quota from SES (moto).

Once the relay has said "Daily message quota exceeded", a warm function sends the next
batch back without an attempt: no MAIL reaches the relay, no ZIP is downloaded, no file is
left behind, every record is in batchItemFailures and counted as RecordsHeld.
"""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from faults import FaultySmtp, SmtpFaults
from pool_emails import outgoing, settings
from servers import (
    FakeLambdaContext,
    MotoServer,
    SmtpSink,
    failed_ids,
    log_lines,
    make_zip,
    s3_client,
    seed_objects,
    sqs_event,
    sqs_record,
)

import handler
from async_notifier.aws.clients import aws_client
from async_notifier.aws.ses_quota import SesQuotaReader
from async_notifier.errors import DailyQuotaExceeded
from async_notifier.smtp.pool import SmtpPool

DAILY_QUOTA = "454 4.7.0 Throttling failure: Daily message quota exceeded."
SENDER = "no-reply@example.com"


def records(count: int, prefix: str) -> list[dict[str, Any]]:
    return [
        sqs_record(
            {
                "video_id": f"{prefix}{i}",
                "status": "COMPLETED",
                "bucket": "videos-zip",
                "key": f"v{i}.zip",
                "email": f"u{i}@example.com",
            },
            f"{prefix}-{i}",
        )
        for i in range(count)
    ]


def test_a_warm_function_sends_a_held_batch_back_without_an_attempt(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    faulty_smtp: FaultySmtp,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SMTP_SERVER", faulty_smtp.host)
    monkeypatch.setenv("SMTP_PORT", str(faulty_smtp.port))
    monkeypatch.setenv("RETRY_BACKOFF", "false")  # synthetic records: no queue to delay in
    seed_objects(
        s3_client(aws.endpoint_url),
        bucket,
        {f"v{i}.zip": make_zip(5_000, seed=i) for i in range(8)},
    )
    faulty_smtp.faults = SmtpFaults(mail_reply=DAILY_QUOTA)

    first = records(8, "first")
    assert failed_ids(handler.lambda_handler(sqs_event(first), FakeLambdaContext())) == sorted(
        r["messageId"] for r in first
    )
    # The records already under way when the first refusal came may have asked too; none
    # retried, and most never reached the relay.
    tried = faulty_smtp.mail_commands
    assert 1 <= tried < len(first)
    capsys.readouterr()

    second = records(8, "second")
    result = handler.lambda_handler(sqs_event(second), FakeLambdaContext())
    assert failed_ids(result) == sorted(r["messageId"] for r in second)
    assert faulty_smtp.mail_commands == tried  # nothing more reached the relay
    assert faulty_smtp.messages == []
    lines = log_lines(capsys.readouterr().out)
    [held] = [line for line in lines if line.get("message", "").startswith("provider condition")]
    assert held["condition"] == "daily_quota"
    assert held["records"] == 8
    assert not [line for line in lines if line.get("message") == "record failed"]
    metrics = [line for line in lines if "_aws" in line]
    assert any(m.get("RecordsHeld") == 8 and "Condition" not in m for m in metrics)
    assert any(m.get("Condition") == "daily_quota" and m.get("RecordsHeld") == 8 for m in metrics)
    assert list(Path(lambda_env["TMP_DIR"]).rglob("*")) == []  # nothing downloaded or left


async def ses_sent(aws: MotoServer, recipients: int) -> None:
    """Spend `recipients` of moto's daily quota (SES counts recipients)."""
    s = settings("127.0.0.1", 25)
    async with aws_client("ses", s) as ses:
        await ses.verify_email_identity(EmailAddress=SENDER)
    async with aws_client("sesv2", s) as sesv2:
        for start in range(0, recipients, 50):
            message = EmailMessage()
            message["From"] = SENDER
            message["To"] = ", ".join(
                f"r{i}@example.net" for i in range(start, min(recipients, start + 50))
            )
            message["Subject"] = "spent"
            message.set_content("the quota")
            await sesv2.send_email(
                FromEmailAddress=SENDER, Content={"Raw": {"Data": message.as_bytes()}}
            )


async def quota_pool(sink: SmtpSink, ses: Any, **extra: str) -> SmtpPool:
    pool = SmtpPool(settings(sink.host, sink.port, SMTP_RATE_LIMIT="auto", **extra))
    pool.limits.use_quota(SesQuotaReader(ses))
    await pool.refresh_limits()
    return pool


async def test_auto_paces_at_the_fleets_share_of_the_accounts_rate(
    aws: MotoServer, smtp_sink: SmtpSink
) -> None:
    async with aws_client("ses", settings("127.0.0.1", 25)) as ses:
        pool = await quota_pool(smtp_sink, ses, FLEET_SIZE="2")
        async with pool:
            assert pool.limits.send_rate == 0.5  # moto's MaxSendRate 1, shared by two
            await pool.send(outgoing(0))
            assert pool.held() is None
    assert len(smtp_sink.messages) == 1


async def test_auto_holds_the_daily_quota_before_the_relay_refuses(
    aws: MotoServer, smtp_sink: SmtpSink
) -> None:
    """A quota that reads as spent holds every send without asking the relay: the records
    go back and come back once a later read shows room."""
    await ses_sent(aws, 200)  # moto's Max24HourSend
    async with aws_client("ses", settings("127.0.0.1", 25)) as ses:
        pool = await quota_pool(smtp_sink, ses)
        async with pool:
            held = pool.held()
            assert isinstance(held, DailyQuotaExceeded)
            assert "200 of 200" in held.reason
            assert held.retry_after > 30
            with pytest.raises(DailyQuotaExceeded):
                await pool.send(outgoing(0))
    assert smtp_sink.connections_opened == 0
    assert smtp_sink.messages == []
