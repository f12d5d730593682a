"""The fault injectors themselves, seen from real clients: a fault test means nothing unless
the fault really reaches the client the way a broken server or network would deliver it."""

from __future__ import annotations

import io
import math
import smtplib
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from typing import Any

import aioboto3
import aiohttp
import aiosmtplib
import boto3
import botocore.exceptions
import pytest
from botocore.config import Config
from faults import (
    REPLY_RATE_CLOSE,
    REPLY_TEMPFAIL,
    REPLY_THROTTLE,
    FaultySmtp,
    S3Action,
    S3FaultProxy,
    S3Faults,
    S3Rule,
    SmtpFault,
    SmtpFaults,
)
from servers import REGION, MotoServer, TlsFiles, make_zip, seed_objects

SENDER = "no-reply@example.com"


def _message(to: str | list[str] = "alice@example.com", subject: str = "hello") -> EmailMessage:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = to if isinstance(to, str) else ", ".join(to)
    message["Subject"] = subject
    message.set_content("body")
    return message


def _big_message(size: int = 2 * 1024 * 1024) -> EmailMessage:
    """Large enough that the client is still writing DATA when the server hangs up."""
    message = _message(subject="big")
    message.add_attachment(
        make_zip(size, seed=7), maintype="application", subtype="zip", filename="frames.zip"
    )
    return message


def _client(server: FaultySmtp, timeout: float = 5.0) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(hostname=server.host, port=server.port, timeout=timeout)


async def _send(client: aiosmtplib.SMTP, message: EmailMessage) -> str:
    """Send on an open connection: "250", or the error reply the server gave."""
    try:
        await client.send_message(message)
    except aiosmtplib.SMTPResponseException as exc:
        return f"{exc.code} {exc.message}"
    return "250"


def _subjects(server: FaultySmtp) -> list[str]:
    return [str(message["Subject"]) for message in server.parsed()]


# --------------------------------------------------------------------------- SMTP


async def test_healthy_by_default(faulty_smtp: FaultySmtp) -> None:
    async with _client(faulty_smtp) as client:
        await client.send_message(_message())
    await faulty_smtp.wait_idle_async()
    assert [m.rcpt_tos for m in faulty_smtp.accepted] == [["alice@example.com"]]
    assert faulty_smtp.ambiguous == []
    assert faulty_smtp.counts == {}
    assert faulty_smtp.connections_opened == 1
    assert faulty_smtp.quit_count == 1


async def test_close_after_answers_421_and_closes(faulty_smtp: FaultySmtp) -> None:
    faulty_smtp.faults = SmtpFaults(close_after=2)
    client = _client(faulty_smtp)
    await client.connect()
    await client.send_message(_message(subject="1"))
    await client.send_message(_message(subject="2"))
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await client.send_message(_message(subject="3"))
    assert refused.value.code == 421
    assert refused.value.message == "4.7.0 closing"
    assert not client.is_connected
    await faulty_smtp.wait_idle_async()  # the server closed its side as well

    # Any command is "the next command", and the count is per connection.
    async with _client(faulty_smtp) as client:
        await client.send_message(_message(subject="4"))
        await client.send_message(_message(subject="5"))
        with pytest.raises(aiosmtplib.SMTPResponseException) as noop:
            await client.noop()
        assert noop.value.code == 421
    await faulty_smtp.wait_idle_async()
    assert _subjects(faulty_smtp) == ["1", "2", "4", "5"]
    assert faulty_smtp.counts[SmtpFault.CLOSE_AFTER] == 2
    assert [e.command for e in faulty_smtp.events] == ["MAIL", "NOOP"]
    assert faulty_smtp.connections_opened == 2


async def test_tempfail_every_kth_message(faulty_smtp: FaultySmtp) -> None:
    faulty_smtp.faults = SmtpFaults(tempfail_every=2)
    async with _client(faulty_smtp) as client:
        outcomes = [await _send(client, _message(subject=str(n))) for n in range(1, 5)]
    assert outcomes == ["250", REPLY_TEMPFAIL, "250", REPLY_TEMPFAIL]
    assert _subjects(faulty_smtp) == ["1", "3"]  # a 451 message is not recorded
    assert faulty_smtp.counts[SmtpFault.TEMPFAIL] == 2
    [event, _] = faulty_smtp.events
    assert event.data is not None
    assert b"Subject: 2" in event.data


async def test_reject_recipient_at_rcpt(faulty_smtp: FaultySmtp) -> None:
    faulty_smtp.faults = SmtpFaults(reject={"bob@example.com"})
    async with _client(faulty_smtp) as client:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
            await client.send_message(_message("Bob@Example.com"))
        [error] = refused.value.recipients
        assert (error.code, error.message) == (550, "5.1.1 mailbox unavailable")
        # A mixed envelope: the good recipient still gets it, the refusal is reported.
        errors, _ = await client.send_message(_message(["alice@example.com", "bob@example.com"]))
        assert errors["bob@example.com"].code == 550
    assert [m.rcpt_tos for m in faulty_smtp.accepted] == [["alice@example.com"]]
    assert faulty_smtp.counts[SmtpFault.REJECT] == 2
    assert [e.rcpt_tos for e in faulty_smtp.events] == [
        ("Bob@Example.com",),
        ("bob@example.com",),
    ]


async def test_throttle_bursts_454_at_mail(faulty_smtp: FaultySmtp) -> None:
    faulty_smtp.faults = SmtpFaults(throttle_burst=(2, 1))
    async with _client(faulty_smtp) as client:
        outcomes = [await _send(client, _message(subject=str(n))) for n in range(1, 7)]
        assert client.is_connected  # 454 leaves the connection usable
    ok, throttled = "250", REPLY_THROTTLE
    assert outcomes == [ok, ok, throttled, ok, ok, throttled]
    assert _subjects(faulty_smtp) == ["1", "2", "4", "5"]
    assert faulty_smtp.counts[SmtpFault.THROTTLE] == 2


async def test_throttle_with_421_closes(faulty_smtp: FaultySmtp) -> None:
    faulty_smtp.faults = SmtpFaults(throttle_burst=(1, 1), throttle_close=True)
    client = _client(faulty_smtp)
    await client.connect()
    await client.send_message(_message(subject="1"))
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await client.send_message(_message(subject="2"))
    assert f"{refused.value.code} {refused.value.message}" == REPLY_RATE_CLOSE
    assert not client.is_connected
    await faulty_smtp.wait_idle_async()
    assert _subjects(faulty_smtp) == ["1"]


async def test_drop_in_data_disconnects_and_records_nothing(faulty_smtp: FaultySmtp) -> None:
    faulty_smtp.faults = SmtpFaults(drop_in_data_every=2)
    message = _big_message()
    async with _client(faulty_smtp) as client:
        await client.send_message(_message(subject="1"))
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await client.send_message(message)
        assert not client.is_connected
    await faulty_smtp.wait_idle_async()
    assert _subjects(faulty_smtp) == ["1"]
    assert faulty_smtp.ambiguous == []
    [event] = faulty_smtp.events
    assert event.kind is SmtpFault.DROP_IN_DATA
    assert event.data is not None
    # The server read the header block, then hung up long before the attachment.
    assert event.data.endswith(b"\r\n\r\n")
    assert b"Subject: big" in event.data
    assert len(event.data) < len(message.as_bytes()) // 100


async def test_drop_after_data_is_delivered_but_unanswered(faulty_smtp: FaultySmtp) -> None:
    faulty_smtp.faults = SmtpFaults(drop_after_data_every=1)
    async with _client(faulty_smtp) as client:
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await client.send_message(_message(subject="maybe"))
    await faulty_smtp.wait_idle_async()
    [accepted] = faulty_smtp.accepted
    assert faulty_smtp.ambiguous == [accepted]
    assert _subjects(faulty_smtp) == ["maybe"]
    assert faulty_smtp.counts[SmtpFault.DROP_AFTER_DATA] == 1

    # The same with the standard library client: no 250, just the connection gone.
    faulty_smtp.clear()
    with (
        smtplib.SMTP(faulty_smtp.host, faulty_smtp.port, timeout=5) as client,
        pytest.raises(smtplib.SMTPServerDisconnected),
    ):
        client.send_message(_message(subject="again"))
    assert [str(m["Subject"]) for m in faulty_smtp.parsed()] == ["again"]
    assert len(faulty_smtp.ambiguous) == 1


async def test_stall_on_data_times_the_client_out(faulty_smtp: FaultySmtp) -> None:
    faulty_smtp.faults = SmtpFaults(stall_seconds=math.inf)
    client = _client(faulty_smtp, timeout=1.0)
    await client.connect()
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await client.send_message(_message())
    assert not client.is_connected
    await faulty_smtp.wait_idle_async()
    assert faulty_smtp.accepted == []  # a stalled server records only when it replies
    assert faulty_smtp.counts[SmtpFault.STALL] == 1


async def test_short_stall_only_slows_down(faulty_smtp: FaultySmtp) -> None:
    faulty_smtp.faults = SmtpFaults(stall_seconds=0.05)
    async with _client(faulty_smtp) as client:
        await client.send_message(_message())
    assert len(faulty_smtp.accepted) == 1
    assert faulty_smtp.counts[SmtpFault.STALL] == 1


async def test_stall_on_greeting(faulty_smtp: FaultySmtp) -> None:
    faulty_smtp.faults = SmtpFaults(stall_seconds=math.inf, stall_on="greeting")
    client = _client(faulty_smtp, timeout=1.0)
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await client.connect()
    await faulty_smtp.wait_idle_async()
    assert faulty_smtp.counts[SmtpFault.STALL] == 1
    assert faulty_smtp.connections_opened == 1


def _random_run(server: FaultySmtp, count: int) -> list[str]:
    """Send `count` messages one at a time, reconnecting as needed; what each one met."""
    outcomes = []
    client: smtplib.SMTP | None = None
    for n in range(count):
        if client is None:
            client = smtplib.SMTP(server.host, server.port, timeout=5)
        try:
            client.send_message(_message(subject=str(n)))
            outcomes.append("ok")
        except smtplib.SMTPDataError as exc:
            outcomes.append(str(exc.smtp_code))
        except smtplib.SMTPServerDisconnected:
            outcomes.append("disconnected")
            client.close()
            client = None
    if client is not None:
        client.quit()
    server.wait_idle()
    return outcomes


def test_random_mode_is_reproducible(faulty_smtp: FaultySmtp) -> None:
    faults = SmtpFaults(
        rng_seed=1234,
        p_tempfail=0.15,
        p_drop_in_data=0.1,
        p_drop_after_data=0.1,
        p_reject_5xx=0.1,
    )
    faulty_smtp.faults = faults
    first = _random_run(faulty_smtp, 60)
    counts, accepted, ambiguous = faulty_smtp.counts, faulty_smtp.accepted, faulty_smtp.ambiguous

    # Every message met exactly one fate, and the server's books agree with the client's.
    assert set(first) == {"ok", "451", "554", "disconnected"}
    assert first.count("ok") == len(accepted) - len(ambiguous)
    assert first.count("451") == counts[SmtpFault.TEMPFAIL]
    assert first.count("554") == counts[SmtpFault.REJECT_5XX]
    assert first.count("disconnected") == (
        counts[SmtpFault.DROP_IN_DATA] + counts[SmtpFault.DROP_AFTER_DATA]
    )
    assert len(ambiguous) == counts[SmtpFault.DROP_AFTER_DATA]
    assert all(event.random for event in faulty_smtp.events)
    ambiguous_subjects = {
        line for m in ambiguous for line in m.data.splitlines() if line.startswith(b"Subject:")
    }
    assert ambiguous_subjects <= {
        line for m in accepted for line in m.data.splitlines() if line.startswith(b"Subject:")
    }

    # Installing the same faults again reseeds: the same decisions in the same order.
    faulty_smtp.clear()
    faulty_smtp.faults = faults
    assert _random_run(faulty_smtp, 60) == first
    faulty_smtp.configure(rng_seed=99)
    faulty_smtp.clear()
    assert _random_run(faulty_smtp, 60) != first


async def test_faults_can_change_while_connected(faulty_smtp: FaultySmtp) -> None:
    async with _client(faulty_smtp) as client:
        await client.send_message(_message(subject="1"))
        faulty_smtp.configure(tempfail_every=1)
        with pytest.raises(aiosmtplib.SMTPDataError):
            await client.send_message(_message(subject="2"))
        faulty_smtp.configure(tempfail_every=None)
        await client.send_message(_message(subject="3"))
    assert _subjects(faulty_smtp) == ["1", "3"]


def test_faults_are_validated() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        SmtpFaults(p_tempfail=0.6, p_drop_after_data=0.6)
    with pytest.raises(ValueError, match="tempfail_every"):
        SmtpFaults(tempfail_every=0)
    with pytest.raises(ValueError, match="stall_on"):
        SmtpFaults(stall_seconds=1, stall_on="quit")  # type: ignore[arg-type]


async def test_faults_work_over_starttls(tls_files: TlsFiles) -> None:
    with FaultySmtp(SmtpFaults(drop_after_data_every=1), tls=tls_files.server_context()) as server:
        client = aiosmtplib.SMTP(
            hostname=server.host,
            port=server.port,
            start_tls=True,
            tls_context=tls_files.client_context(),
            timeout=5,
        )
        async with client:
            with pytest.raises(aiosmtplib.SMTPServerDisconnected):
                await client.send_message(_message())
        await server.wait_idle_async()
        assert len(server.ambiguous) == 1
        assert server.connections_opened == 1


# --------------------------------------------------------------------------- S3 proxy

KEY = "videos/v1/frames.zip"
PAYLOAD = make_zip(1024 * 1024, seed=3)
NO_RETRIES = Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=5)
CREDENTIALS: dict[str, Any] = {
    "region_name": REGION,
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
}


@pytest.fixture
def proxied(bucket: str, aws: MotoServer, s3_proxy: S3FaultProxy) -> Iterator[Any]:
    """A boto3 client through the proxy, without botocore's own retries, and one object."""
    direct = boto3.client("s3", endpoint_url=aws.endpoint_url, **CREDENTIALS)
    seed_objects(direct, bucket, {KEY: PAYLOAD, "other.zip": b"other"})
    client = boto3.client(
        "s3", endpoint_url=s3_proxy.endpoint_url, config=NO_RETRIES, **CREDENTIALS
    )
    try:
        yield client
    finally:
        client.close()
        direct.close()


@pytest.fixture
async def aio_proxied(proxied: Any, s3_proxy: S3FaultProxy) -> AsyncIterator[Any]:
    """The worker's stack (aioboto3 on aiohttp) through the proxy, without retries."""
    session = aioboto3.Session()
    async with session.client(
        "s3", endpoint_url=s3_proxy.endpoint_url, config=NO_RETRIES, **CREDENTIALS
    ) as client:
        yield client


def test_proxy_passes_requests_through(proxied: Any, bucket: str, s3_proxy: S3FaultProxy) -> None:
    proxied.create_bucket(Bucket="another-bucket")
    proxied.put_object(Bucket=bucket, Key="new.zip", Body=PAYLOAD)  # 1 MiB: Expect: 100-continue
    assert proxied.head_object(Bucket=bucket, Key="new.zip")["ContentLength"] == len(PAYLOAD)
    assert proxied.get_object(Bucket=bucket, Key=KEY)["Body"].read() == PAYLOAD
    assert [(r.method, r.path) for r in s3_proxy.requests] == [
        ("PUT", "/another-bucket"),
        ("PUT", "/videos-zip/new.zip"),
        ("HEAD", "/videos-zip/new.zip"),
        ("GET", f"/videos-zip/{KEY}"),
    ]
    assert s3_proxy.counts == {}


async def test_proxy_passes_aioboto3_through(
    aio_proxied: Any, bucket: str, s3_proxy: S3FaultProxy
) -> None:
    await aio_proxied.put_object(Bucket=bucket, Key="new.zip", Body=PAYLOAD * 3)
    head = await aio_proxied.head_object(Bucket=bucket, Key="new.zip")
    assert head["ContentLength"] == 3 * len(PAYLOAD)
    response = await aio_proxied.get_object(Bucket=bucket, Key=KEY)
    assert await response["Body"].read() == PAYLOAD
    assert s3_proxy.request_count == 3


@pytest.mark.parametrize(
    ("action", "status", "code"),
    [(S3Action.INTERNAL_ERROR, 500, "InternalError"), (S3Action.SLOW_DOWN, 503, "SlowDown")],
)
def test_proxy_error_responses(
    proxied: Any, bucket: str, s3_proxy: S3FaultProxy, action: S3Action, status: int, code: str
) -> None:
    s3_proxy.set_rules(S3Rule(action, match=KEY, times=2))
    with pytest.raises(botocore.exceptions.ClientError) as get_error:
        proxied.get_object(Bucket=bucket, Key=KEY)
    assert get_error.value.response["Error"]["Code"] == code
    assert get_error.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    # HEAD has no body, so botocore knows only the status.
    with pytest.raises(botocore.exceptions.ClientError) as head_error:
        proxied.head_object(Bucket=bucket, Key=KEY)
    assert head_error.value.response["Error"]["Code"] == str(status)
    # `times` is spent: the next request goes through, and other keys were never touched.
    assert proxied.get_object(Bucket=bucket, Key=KEY)["Body"].read() == PAYLOAD
    assert s3_proxy.counts == {action: 2}
    assert [r.action for r in s3_proxy.requests] == [action, action, None]


def test_botocore_retries_absorb_a_single_error(
    proxied: Any, bucket: str, aws: MotoServer, s3_proxy: S3FaultProxy
) -> None:
    """Worth knowing when writing worker tests: the SDK's retries hide one-off 5xx."""
    retrying = boto3.client(
        "s3",
        endpoint_url=s3_proxy.endpoint_url,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}),
        **CREDENTIALS,
    )
    s3_proxy.set_rules(S3Rule(S3Action.SLOW_DOWN, match=KEY, times=1))
    try:
        assert retrying.get_object(Bucket=bucket, Key=KEY)["Body"].read() == PAYLOAD
    finally:
        retrying.close()
    assert [r.action for r in s3_proxy.requests] == [S3Action.SLOW_DOWN, None]


def test_cut_body_boto3_raises_streaming_error(
    proxied: Any, bucket: str, s3_proxy: S3FaultProxy
) -> None:
    s3_proxy.set_rules(S3Rule(S3Action.CUT, match=KEY, methods={"GET"}, cut_fraction=0.5))
    response = proxied.get_object(Bucket=bucket, Key=KEY)
    assert response["ContentLength"] == len(PAYLOAD)  # the header promised the whole object
    with pytest.raises(botocore.exceptions.ResponseStreamingError, match="IncompleteRead"):
        response["Body"].read()
    assert s3_proxy.counts == {S3Action.CUT: 1}


async def test_cut_body_aioboto3_raises_payload_error(
    aio_proxied: Any, bucket: str, s3_proxy: S3FaultProxy
) -> None:
    s3_proxy.set_rules(S3Rule(S3Action.CUT, match=KEY, methods={"GET"}, cut_fraction=0.5))
    response = await aio_proxied.get_object(Bucket=bucket, Key=KEY)
    assert response["ContentLength"] == len(PAYLOAD)
    received = io.BytesIO()

    async def stream() -> None:
        async for chunk in response["Body"].iter_chunks(64 * 1024):
            received.write(chunk)

    # Streaming in chunks (as the worker does) yields the first half, then fails.
    try:
        with pytest.raises(aiohttp.ClientPayloadError, match="Not enough data"):
            await stream()
    finally:
        response["Body"].close()  # the broken connection, as the worker closes it
    assert received.getvalue() == PAYLOAD[: len(PAYLOAD) // 2]


async def test_slow_body_still_completes(
    aio_proxied: Any, bucket: str, s3_proxy: S3FaultProxy
) -> None:
    s3_proxy.set_rules(S3Rule(S3Action.SLOW, match=KEY, slow_chunk=128 * 1024, slow_delay=0.01))
    response = await aio_proxied.get_object(Bucket=bucket, Key=KEY)
    assert await response["Body"].read() == PAYLOAD
    assert s3_proxy.counts == {S3Action.SLOW: 1}


async def test_chunked_body_arrives_whole_without_a_length(
    aio_proxied: Any, bucket: str, s3_proxy: S3FaultProxy
) -> None:
    s3_proxy.set_rules(S3Rule(S3Action.CHUNKED, match=KEY, slow_chunk=50_000))
    response = await aio_proxied.get_object(Bucket=bucket, Key=KEY)
    headers = response["ResponseMetadata"]["HTTPHeaders"]
    assert headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in headers
    assert "ContentLength" not in response  # what the worker sees: the size is unknown
    assert await response["Body"].read() == PAYLOAD
    # A HEAD response has no body to re-frame: it keeps its length.
    head = await aio_proxied.head_object(Bucket=bucket, Key=KEY)
    assert head["ContentLength"] == len(PAYLOAD)
    assert s3_proxy.counts == {S3Action.CHUNKED: 2}


async def test_rules_by_target_pick_one_json_operation(
    aws: MotoServer, s3_proxy: S3FaultProxy
) -> None:
    """JSON-protocol services (DynamoDB, SQS) all POST to "/": the operation is a header.

    The calls that must succeed get a read timeout far above a loaded machine's latency;
    only the stalled one, which never gets an answer, has a short one to give up after.
    """
    s3_proxy.set_rules(S3Rule(S3Action.STALL, target="DynamoDB_20120810.DeleteItem"))
    session = aioboto3.Session()
    patient = Config(retries={"total_max_attempts": 1}, read_timeout=30)
    impatient = Config(retries={"total_max_attempts": 1}, read_timeout=0.5)
    async with (
        session.client(
            "dynamodb", endpoint_url=s3_proxy.endpoint_url, config=patient, **CREDENTIALS
        ) as client,
        session.client(
            "dynamodb", endpoint_url=s3_proxy.endpoint_url, config=impatient, **CREDENTIALS
        ) as stalled,
    ):
        await client.create_table(
            TableName="t",
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )
        await client.put_item(TableName="t", Item={"id": {"S": "k"}})
        with pytest.raises(botocore.exceptions.ReadTimeoutError):
            await stalled.delete_item(TableName="t", Key={"id": {"S": "k"}})
        assert "Item" in await client.get_item(TableName="t", Key={"id": {"S": "k"}})
    assert [(r.target, r.action) for r in s3_proxy.requests] == [
        ("DynamoDB_20120810.CreateTable", None),
        ("DynamoDB_20120810.PutItem", None),
        ("DynamoDB_20120810.DeleteItem", S3Action.STALL),
        ("DynamoDB_20120810.GetItem", None),
    ]


def test_slow_body_with_a_short_read_timeout_times_out(
    proxied: Any, bucket: str, s3_proxy: S3FaultProxy
) -> None:
    """The headers come at moto's pace, the body stalls: only the body read times out.

    The timeout sits well above moto's latency on a loaded machine (0.2 s was not)
    and well below the pause between body chunks.
    """
    s3_proxy.set_rules(S3Rule(S3Action.SLOW, match=KEY, slow_chunk=1024, slow_delay=10.0))
    impatient = boto3.client(
        "s3",
        endpoint_url=s3_proxy.endpoint_url,
        config=Config(retries={"total_max_attempts": 1}, read_timeout=1.5),
        **CREDENTIALS,
    )
    try:
        response = impatient.get_object(Bucket=bucket, Key=KEY)
        with pytest.raises(botocore.exceptions.ReadTimeoutError):
            response["Body"].read()
    finally:
        impatient.close()


def test_stalled_request_times_out(proxied: Any, bucket: str, s3_proxy: S3FaultProxy) -> None:
    s3_proxy.set_rules(S3Rule(S3Action.STALL, match=KEY, times=1))
    impatient = boto3.client(
        "s3",
        endpoint_url=s3_proxy.endpoint_url,
        config=Config(retries={"total_max_attempts": 1}, read_timeout=0.2),
        **CREDENTIALS,
    )
    try:
        with pytest.raises(botocore.exceptions.ReadTimeoutError):
            impatient.get_object(Bucket=bucket, Key=KEY)
    finally:
        impatient.close()
    assert proxied.get_object(Bucket=bucket, Key=KEY)["Body"].read() == PAYLOAD


def test_dropped_connection(proxied: Any, bucket: str, s3_proxy: S3FaultProxy) -> None:
    s3_proxy.set_rules(S3Rule(S3Action.DROP, match=KEY, times=1))
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        proxied.get_object(Bucket=bucket, Key=KEY)
    assert proxied.get_object(Bucket=bucket, Key=KEY)["Body"].read() == PAYLOAD


def test_rules_by_match_every_and_probability(
    proxied: Any, bucket: str, s3_proxy: S3FaultProxy
) -> None:
    def run(count: int) -> list[bool]:
        failed = []
        for _ in range(count):
            try:
                proxied.get_object(Bucket=bucket, Key=KEY)["Body"].read()
                failed.append(False)
            except botocore.exceptions.ClientError:
                failed.append(True)
        return failed

    s3_proxy.set_rules(S3Rule(S3Action.INTERNAL_ERROR, match=KEY, every=2))
    assert run(4) == [False, True, False, True]
    assert proxied.get_object(Bucket=bucket, Key="other.zip")["Body"].read() == b"other"

    faults = S3Faults(rules=(S3Rule(S3Action.SLOW_DOWN, match=KEY, probability=0.5),), rng_seed=7)
    s3_proxy.faults = faults
    first = run(20)
    assert any(first)
    assert not all(first)
    s3_proxy.faults = faults  # reinstalling reseeds
    assert run(20) == first
