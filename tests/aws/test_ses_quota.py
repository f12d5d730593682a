"""The SES sending quota: moto's SES, a peer answering SES errors, and the fault proxy."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator
from email.message import EmailMessage
from typing import Any

import aioboto3
import pytest
from aiobotocore.config import AioConfig
from faults import S3Action, S3FaultProxy, S3Rule
from servers import LOOPBACK, REGION, MotoServer, free_port

from async_notifier.aws.clients import aws_client
from async_notifier.aws.ses_quota import (
    QuotaUnavailable,
    SendQuota,
    SesQuotaReader,
    is_ses,
    ses_region,
)
from async_notifier.config import Settings

SENDER = "no-reply@example.com"


def settings(endpoint_url: str) -> Settings:
    return Settings.from_env(
        {
            "SMTP_SERVER": "email-smtp.us-east-1.amazonaws.com",
            "EMAIL_FROM": SENDER,
            "ALLOWED_BUCKETS": "*",
            "AWS_ENDPOINT_URL": endpoint_url,
            "AWS_REGION": REGION,
        }
    )


@pytest.fixture
async def ses(aws: MotoServer) -> AsyncIterator[Any]:
    async with aws_client("ses", settings(aws.endpoint_url)) as client:
        yield client


def one_attempt_client(endpoint_url: str, read_timeout: float = 30.0) -> Any:
    """A client that neither retries nor gives up early on its own: any bound is the reader's."""
    config = AioConfig(
        connect_timeout=1,
        read_timeout=read_timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    return aioboto3.Session().client(
        "ses",
        endpoint_url=endpoint_url,
        region_name=REGION,
        config=config,
        aws_access_key_id="testing",  # never real ones: the peer is local
        aws_secret_access_key="testing",
    )


async def send_one(aws: MotoServer, ses: Any, recipients: list[str]) -> None:
    """One email through moto's SES (v2, raw content) from a verified sender, its recipients
    in the message's To header only (moto would count a Destination's twice)."""
    await ses.verify_email_identity(EmailAddress=SENDER)
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = ", ".join(recipients)
    message["Subject"] = "frames"
    message.set_content("your frames are ready")
    async with aws_client("sesv2", settings(aws.endpoint_url)) as sesv2:
        await sesv2.send_email(
            FromEmailAddress=SENDER,
            Content={"Raw": {"Data": message.as_bytes()}},
        )


async def test_reads_moto_quota_and_counts_what_was_sent(aws: MotoServer, ses: Any) -> None:
    reader = SesQuotaReader(ses)
    assert await reader.read() == SendQuota(
        max_send_rate=1.0, max_24_hour_send=200.0, sent_last_24_hours=0.0
    )
    await send_one(aws, ses, ["a@example.net", "b@example.net"])
    quota = await reader.read()
    assert quota.sent_last_24_hours == 2.0  # SES counts recipients
    assert quota.max_send_rate == 1.0
    assert not quota.exhausted


@pytest.mark.parametrize(
    ("limit", "sent", "exhausted"),
    [
        (200.0, 0.0, False),
        (200.0, 199.0, False),
        (200.0, 200.0, True),
        (200.0, 250.0, True),  # past the limit: sends that were in flight
        (0.0, 0.0, True),
        (-1.0, 0.0, False),  # unlimited
        (-1.0, 1e9, False),
    ],
)
def test_exhausted_when_the_day_is_used_up_and_never_when_unlimited(
    limit: float, sent: float, exhausted: bool
) -> None:
    quota = SendQuota(max_send_rate=14.0, max_24_hour_send=limit, sent_last_24_hours=sent)
    assert quota.exhausted is exhausted
    assert quota.unlimited is (limit < 0)


async def test_refused_connection_is_unavailable() -> None:
    async with one_attempt_client(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(QuotaUnavailable, match="EndpointConnectionError"):
            await SesQuotaReader(client, timeout=10.0).read()


async def test_a_peer_that_never_answers_is_unavailable_at_the_timeout(
    s3_proxy: S3FaultProxy,
) -> None:
    s3_proxy.set_rules(S3Rule(S3Action.STALL))
    # The client would wait 30 s for an answer; the reader gives up after a fraction of one.
    async with one_attempt_client(s3_proxy.endpoint_url, read_timeout=30.0) as client:
        with pytest.raises(QuotaUnavailable, match=r"no answer within 0\.2 s"):
            await SesQuotaReader(client, timeout=0.2).read()
    assert s3_proxy.counts[S3Action.STALL] == 1


SES_ERROR = (
    '<ErrorResponse xmlns="http://ses.amazonaws.com/doc/2010-12-01/">'
    "<Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
    "<RequestId>8c4b7f3e-0d4e-4a55-9a5e-3f2b1c0d9e8f</RequestId></ErrorResponse>"
)


@contextlib.asynccontextmanager
async def ses_answering(status: int, code: str, message: str) -> AsyncIterator[str]:
    """An HTTP peer on 127.0.0.1 that answers every request with an SES error (moto has no
    way to throttle or deny); yields its endpoint and stops it afterwards."""
    body = SES_ERROR.format(code=code, message=message).encode()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            await reader.readexactly(int(length[1]) if length else 0)
            writer.write(
                f"HTTP/1.1 {status} Error\r\nContent-Type: text/xml\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer, LOOPBACK, 0)
    try:
        yield f"http://{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (400, "Throttling", "Maximum sending rate exceeded."),
        (403, "AccessDenied", "not authorized to perform: ses:GetSendQuota"),
    ],
)
async def test_an_ses_error_is_unavailable_with_its_code(
    status: int, code: str, message: str
) -> None:
    async with (
        ses_answering(status, code, message) as endpoint,
        one_attempt_client(endpoint) as client,
    ):
        with pytest.raises(
            QuotaUnavailable, match=re.escape(f"failed: {code}: {message}")
        ) as caught:
            await SesQuotaReader(client).read()
    assert caught.value.reason == f"{code}: {message}"


async def test_an_answer_without_an_ses_code_is_unavailable_with_its_status(
    s3_proxy: S3FaultProxy,
) -> None:
    s3_proxy.set_rules(S3Rule(S3Action.SLOW_DOWN))  # S3's error document, not SES's
    async with one_attempt_client(s3_proxy.endpoint_url) as client:
        with pytest.raises(QuotaUnavailable, match=r"ClientError \(HTTP 503\)"):
            await SesQuotaReader(client).read()
    assert s3_proxy.counts[S3Action.SLOW_DOWN] == 1


class Answers:
    """A client whose GetSendQuota answers with a fixed body: SES (and moto) never send a
    malformed one, so no real peer can."""

    def __init__(self, response: Any) -> None:
        self.response = response

    async def get_send_quota(self) -> Any:
        return self.response


@pytest.mark.parametrize(
    ("response", "named"),
    [
        ({}, "MaxSendRate"),
        (None, "MaxSendRate"),
        ({"MaxSendRate": 0.0, "Max24HourSend": 200.0, "SentLast24Hours": 0.0}, "MaxSendRate"),
        ({"MaxSendRate": "14", "Max24HourSend": 200.0, "SentLast24Hours": 0.0}, "MaxSendRate"),
        ({"MaxSendRate": math.nan, "Max24HourSend": 200.0, "SentLast24Hours": 0.0}, "MaxSendRate"),
        ({"MaxSendRate": True, "Max24HourSend": 200.0, "SentLast24Hours": 0.0}, "MaxSendRate"),
        ({"MaxSendRate": 14.0, "Max24HourSend": 200.0}, "SentLast24Hours"),
        ({"MaxSendRate": 14.0, "Max24HourSend": 200.0, "SentLast24Hours": -1.0}, "SentLast24Hours"),
        ({"MaxSendRate": 14.0, "Max24HourSend": math.inf, "SentLast24Hours": 0.0}, "Max24HourSend"),
    ],
)
async def test_a_malformed_answer_is_unavailable(response: Any, named: str) -> None:
    with pytest.raises(QuotaUnavailable, match=f"SES GetSendQuota failed: .* {named} "):
        await SesQuotaReader(Answers(response)).read()


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_timeout_is_refused(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        SesQuotaReader(Answers({}), timeout=timeout)


@pytest.mark.parametrize(
    ("host", "region"),
    [
        ("email-smtp.eu-west-1.amazonaws.com", "eu-west-1"),
        ("email-smtp.us-east-1.amazonaws.com", "us-east-1"),
        ("EMAIL-SMTP.AP-SOUTHEAST-2.AMAZONAWS.COM", "ap-southeast-2"),
        ("email-smtp.us-gov-west-1.amazonaws.com", "us-gov-west-1"),
        ("email-smtp-fips.us-east-1.amazonaws.com", "us-east-1"),
        ("email-smtp-fips.us-gov-west-1.amazonaws.com", "us-gov-west-1"),
        ("email-smtp.eu-central-1.amazonaws.com.", "eu-central-1"),  # fully qualified
        (" email-smtp.eu-west-2.amazonaws.com ", "eu-west-2"),
        (
            "vpce-0123456789abcdef0-abcdefgh.email-smtp.us-west-2.vpce.amazonaws.com",
            "us-west-2",
        ),
        ("", None),
        ("smtp.example.com", None),
        ("127.0.0.1", None),
        ("email-smtp.amazonaws.com", None),
        ("email-smtp.eu-west-1.amazonaws.com.evil.example", None),
        ("evil.example/email-smtp.eu-west-1.amazonaws.com", None),
        ("xemail-smtp.eu-west-1.amazonaws.com", None),
        ("email-smtp.eu-west-1.amazonaws.com:587", None),
        ("email-smtp.eu_west_1.amazonaws.com", None),
        ("email-smtp.eu-west-1.amazonaws.com\n", "eu-west-1"),
        ("email.eu-west-1.amazonaws.com", None),  # the API endpoint, not SMTP
        ("email-smtp.eu-west-1.vpce.amazonaws.com", None),
    ],
)
def test_ses_region_and_is_ses(host: str, region: str | None) -> None:
    assert ses_region(host) == region
    assert is_ses(host) is (region is not None)
