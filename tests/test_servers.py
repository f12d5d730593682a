"""The test peers themselves: if these fail, no worker test result means anything."""

from __future__ import annotations

import io
import os
import smtplib
import socket
import ssl
import threading
import zipfile
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
from runtime_api import peer_pid
from servers import (
    LOOPBACK,
    FakeLambdaContext,
    MotoServer,
    SmtpSink,
    TlsFiles,
    free_port,
    make_zip,
    s3_client,
    seed_objects,
    sqs_event,
    sqs_record,
)


def _message(to: str = "alice@example.com", subject: str = "hello") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "no-reply@example.com"
    message["To"] = to
    message["Subject"] = subject
    message.set_content("body")
    return message


# --------------------------------------------------------------------------- moto


def test_moto_serves_s3(bucket: str, aws: MotoServer) -> None:
    client = s3_client(aws.endpoint_url)
    seed_objects(client, bucket, {"a/b.zip": b"payload"})
    seed_objects(client, bucket, {"c.zip": b"more"})  # bucket exists already: no error
    body = client.get_object(Bucket=bucket, Key="a/b.zip")["Body"].read()
    assert body == b"payload"
    assert aws.endpoint_url.startswith("http://127.0.0.1:")
    assert os.environ["AWS_ENDPOINT_URL"] == aws.endpoint_url


def test_moto_reset_clears_state(aws: MotoServer) -> None:
    client = s3_client(aws.endpoint_url)
    seed_objects(client, "leftover", {"k": b"v"})
    aws.reset()
    assert client.list_buckets()["Buckets"] == []


def test_moto_server_stops_its_process() -> None:
    with MotoServer() as server:
        assert server.running
    assert not server.running


# --------------------------------------------------------------------------- SMTP


def test_sink_records_message_and_counts_connection(smtp_sink: SmtpSink) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=10) as client:
        client.send_message(_message())
        assert smtp_sink.connections_open == 1
    smtp_sink.wait_idle()

    [received] = smtp_sink.wait_for(1)
    assert received.mail_from == "no-reply@example.com"
    assert received.rcpt_tos == ["alice@example.com"]
    [parsed] = smtp_sink.parsed()
    assert parsed["Subject"] == "hello"
    assert parsed.get_content().strip() == "body"
    assert smtp_sink.connections_opened == 1
    assert smtp_sink.connections_open == 0
    assert smtp_sink.quit_count == 1


def test_sink_drop_after_closes_connection() -> None:
    with SmtpSink(drop_after=1) as sink:
        client = smtplib.SMTP(sink.host, sink.port, timeout=10)
        try:
            client.send_message(_message(subject="first"))
            with pytest.raises(smtplib.SMTPServerDisconnected):
                client.send_message(_message(subject="second"))
        finally:
            client.close()
        sink.wait_idle()
        assert [m["Subject"] for m in sink.parsed()] == ["first"]
        assert sink.connections_opened == 1
        assert sink.quit_count == 0


def test_sink_drop_after_counts_per_connection() -> None:
    with SmtpSink(drop_after=2) as sink:
        sent = 0
        while sent < 5:
            with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
                try:
                    for _ in range(3):
                        client.send_message(_message(subject=str(sent)))
                        sent += 1
                        if sent == 5:
                            break
                except smtplib.SMTPServerDisconnected:
                    pass
        sink.wait_for(5)
        sink.wait_idle()
        assert sink.connections_opened == 3  # 2 + 2 + 1


def test_sink_rejects_configured_recipients() -> None:
    with (
        SmtpSink(reject={"gone@example.com"}) as sink,
        smtplib.SMTP(sink.host, sink.port, timeout=10) as client,
    ):
        refused = client.sendmail(
            "no-reply@example.com", ["alice@example.com", "gone@example.com"], b"Subject: x\r\n\r\n"
        )
        assert refused == {"gone@example.com": (550, b"5.1.1 mailbox unavailable")}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("no-reply@example.com", ["gone@example.com"], b"Subject: y\r\n\r\n")
    assert [m.rcpt_tos for m in sink.messages] == [["alice@example.com"]]


def test_sink_starttls_verified_against_ca(tls_files: TlsFiles) -> None:
    with SmtpSink(tls=tls_files.server_context()) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("no-reply@example.com", ["a@example.com"], b"x")
            assert refused.value.smtp_code == 530  # STARTTLS is required
            client.starttls(context=ssl.create_default_context(cafile=str(tls_files.ca)))
            client.send_message(_message())
        sink.wait_for(1)
        sink.wait_idle()
        assert sink.connections_opened == 1  # STARTTLS does not count as a new connection


def test_sink_tls_rejected_by_client_without_the_ca(tls_files: TlsFiles) -> None:
    with SmtpSink(tls=tls_files.server_context()) as sink:
        with (
            smtplib.SMTP(sink.host, sink.port, timeout=10) as client,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            client.starttls(context=ssl.create_default_context())
        sink.wait_idle()
        assert sink.connections_opened == 1
        assert sink.messages == []


def test_sink_requires_auth() -> None:
    with SmtpSink(auth=("mailer", "s3cret")) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.send_message(_message())
            assert refused.value.smtp_code == 530
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("mailer", "wrong")
            client.login("mailer", "s3cret")
            client.send_message(_message())
        assert len(sink.wait_for(1)) == 1


def test_sink_auth_over_starttls(tls_files: TlsFiles) -> None:
    with (
        SmtpSink(tls=tls_files.server_context(), auth=("mailer", "s3cret")) as sink,
        smtplib.SMTP(sink.host, sink.port, timeout=10) as client,
    ):
        client.starttls(context=tls_files.client_context())
        client.login("mailer", "s3cret")
        client.send_message(_message())
    assert len(sink.wait_for(1)) == 1


def test_sink_accepts_large_message(smtp_sink: SmtpSink) -> None:
    message = _message()
    message.add_attachment(
        make_zip(20 * 1024 * 1024, seed=1), maintype="application", subtype="zip", filename="f.zip"
    )
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=30) as client:
        client.send_message(message)
    [parsed] = smtp_sink.parsed()
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_content() == make_zip(20 * 1024 * 1024, seed=1)


async def test_sink_with_aiosmtplib_reuses_one_connection(smtp_sink: SmtpSink) -> None:
    client = aiosmtplib.SMTP(hostname=smtp_sink.host, port=smtp_sink.port, start_tls=False)
    await client.connect()
    try:
        for index in range(3):
            await client.send_message(_message(subject=str(index)))
    finally:
        await client.quit()
    assert len(smtp_sink.messages) == 3
    assert smtp_sink.connections_opened == 1
    assert smtp_sink.quit_count == 1


async def test_sink_starttls_and_auth_with_aiosmtplib(tls_files: TlsFiles) -> None:
    with SmtpSink(tls=tls_files.server_context(), auth=("mailer", "s3cret")) as sink:
        await aiosmtplib.send(
            _message(),
            hostname=sink.host,
            port=sink.port,
            start_tls=True,
            tls_context=tls_files.client_context(),
            username="mailer",
            password="s3cret",
        )
        assert len(sink.messages) == 1
        assert sink.connections_opened == 1


def test_sink_stop_leaves_no_thread() -> None:
    before = set(threading.enumerate())
    with SmtpSink() as sink, smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        client.noop()
    assert set(threading.enumerate()) <= before


# --------------------------------------------------------------------------- payloads


@pytest.mark.parametrize("size", [10, 1024, 100_000, 20 * 1024 * 1024])
def test_make_zip_is_valid_and_sized(size: int) -> None:
    data = make_zip(size, seed=7)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
    assert names[0] == "frame_0001.jpg"
    assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    if size >= 1024:
        assert len(data) == size
    assert make_zip(size, seed=7) == data
    assert make_zip(size, seed=8) != data


def test_sqs_event_shape() -> None:
    record = sqs_record({"bucket": "b", "key": "k"}, "m-1", receive_count=3)
    assert record["messageId"] == "m-1"
    assert record["body"] == '{"bucket": "b", "key": "k"}'
    assert record["attributes"]["ApproximateReceiveCount"] == "3"
    assert record["eventSource"] == "aws:sqs"
    assert record["awsRegion"] == "us-east-1"
    assert sqs_record("raw")["body"] == "raw"
    assert sqs_event([record]) == {"Records": [record]}


def test_fake_lambda_context_counts_down() -> None:
    context = FakeLambdaContext(remaining_ms=1_000)
    assert 0 < context.get_remaining_time_in_millis() <= 1_000
    assert FakeLambdaContext(remaining_ms=0).get_remaining_time_in_millis() == 0
    assert context.aws_request_id != FakeLambdaContext().aws_request_id


def test_worker_env(worker_env: dict[str, str], smtp_sink: SmtpSink) -> None:
    assert os.environ["SMTP_PORT"] == str(smtp_sink.port)
    assert Path(worker_env["TMP_DIR"]).is_dir()
    assert "SMTP_USER" not in os.environ
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Settings the shell running the tests might export (set before `worker_env` runs)."""
    names = ["LOG_LEVEL", "RETRY_ATTEMPTS", "DEAD_LETTER_QUEUE_URL", "SMTP_PASSWORD_SECRET_ID"]
    for name in names:
        monkeypatch.setenv(name, "exported-by-the-shell")
    return names


def test_worker_env_leaves_no_exported_setting_behind(
    exported: list[str], worker_env: dict[str, str]
) -> None:
    assert [name for name in exported if name in os.environ] == []
    assert os.environ["SMTP_POOL_SIZE"] == worker_env["SMTP_POOL_SIZE"]


def _bound_to(port: int) -> socket.socket:
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # beside TIME_WAIT ends
    client.bind((LOOPBACK, port))
    return client


def test_the_runtime_api_names_a_client_by_both_ends_of_its_connection() -> None:
    """Connections from the same client port to other servers that closed and wait out
    TIME_WAIT belong to no process: the emulator must not take one of them for the client."""
    servers = [socket.create_server((LOOPBACK, 0)) for _ in range(10)]
    port = free_port()
    try:
        for server in servers[:-1]:
            with _bound_to(port) as client:
                client.connect(server.getsockname())
                accepted, _ = server.accept()
            accepted.close()  # the client closed first: its end waits out TIME_WAIT
        with _bound_to(port) as client:
            client.connect(servers[-1].getsockname())
            accepted, _ = servers[-1].accept()
            with accepted:
                assert peer_pid(client.getsockname(), servers[-1].getsockname()) == os.getpid()
    finally:
        for server in servers:
            server.close()
