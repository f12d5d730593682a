"""`handler.lambda_handler` end to end: SQS event in, moto S3 and aiosmtpd SMTP on the wire."""

from __future__ import annotations

import email
import email.policy
import json
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from servers import (
    LOOPBACK,
    FakeLambdaContext,
    MotoServer,
    SmtpSink,
    TlsFiles,
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
from async_notifier.config import ConfigError

Body = dict[str, Any]


def invoke(records: list[dict[str, Any]]) -> dict[str, Any]:
    result = handler.lambda_handler(sqs_event(records), FakeLambdaContext())
    assert isinstance(result, dict)
    return result


def completed(video_id: str, key: str, recipient: str, **extra: Any) -> Body:
    return {
        "video_id": video_id,
        "status": "COMPLETED",
        "bucket": "videos-zip",
        "key": key,
        "email": recipient,
        **extra,
    }


def tmp_files(env: dict[str, str]) -> list[Path]:
    return sorted(Path(env["TMP_DIR"]).rglob("*"))


def by_recipient(sink: SmtpSink) -> dict[str, EmailMessage]:
    messages = sink.parsed()
    result = {str(m["To"].addresses[0].addr_spec): m for m in messages}
    assert len(result) == len(messages), "one email per recipient expected"
    return result


def texts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None
    assert html is not None
    return text.get_content(), html.get_content()


def zip_attachment(message: EmailMessage) -> tuple[str | None, bytes]:
    [attachment] = list(message.iter_attachments())
    assert attachment.get_content_type() == "application/zip"
    payload = attachment.get_content()
    assert isinstance(payload, bytes)
    return attachment.get_filename(), payload


# --------------------------------------------------------------------------- the mixed batch


def test_mixed_batch_fails_exactly_the_bad_records(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ALLOWED_BUCKETS", bucket)
    client = s3_client(aws.endpoint_url)
    objects = {
        "v1/v1.zip": make_zip(120_000, seed=1),
        "v2/v2.zip": make_zip(40_000, seed=2),
        "v3/v3.zip": make_zip(5_000, seed=3),
    }
    seed_objects(client, bucket, objects)
    seed_objects(client, "private-data", {"secret.zip": make_zip(2_000, seed=99)})

    good: dict[str, Body | str] = {
        "good-canonical": completed(
            "vid-1",
            "v1/v1.zip",
            "maria@example.com",
            name="Maria",
            file_name="férias.mp4",
            locale="pt-BR",
            timestamp="2025-06-19T19:46:37+00:00",
        ),
        "good-aliases": {
            "video_id": "vid-2",
            "status": "completed",
            "zip": {"bucket": bucket, "key": "v2/v2.zip"},
            "recipient_email": "john@example.com",
            "recipient_name": "John",
            "file_name": "holiday.mov",
            "locale": "en-US",
        },
        "good-sns": json.dumps(
            {
                "Type": "Notification",
                "Message": json.dumps(
                    {
                        "video_id": "vid-3",
                        "s3_bucket": bucket,
                        "s3_key": "v3/v3.zip",
                        "email": "sns@example.com",
                    }
                ),
            }
        ),
        "good-failed": {
            "video_id": "vid-4",
            "status": "FAILED",
            "email": "ana@example.com",
            "name": "Ana",
            "file_name": "corrupt.mp4",
            "message": "ffmpeg: moov atom not found",
            "locale": "en",
        },
    }
    bad: dict[str, Body | str] = {
        "bad-json": '{"video_id": "vid-x", "email": ',
        "bad-status": completed("vid-5", "v1/v1.zip", "s@example.com", status="DONE"),
        "bad-no-key-field": {"video_id": "vid-6", "bucket": bucket, "email": "k@example.com"},
        "bad-missing-object": completed("vid-7", "v9/none.zip", "missing@example.com"),
        "bad-bucket": {
            **completed("vid-8", "secret.zip", "exfil@example.com"),
            "bucket": "private-data",
        },
        "bad-crlf-name": completed(
            "vid-9", "v1/v1.zip", "victim@example.com", name="Eve\r\nBcc: attacker@evil.example"
        ),
        "bad-two-recipients": completed("vid-10", "v1/v1.zip", "a@x.com, b@x.com"),
        "bad-display-name": completed("vid-11", "v1/v1.zip", "Eve <e@x.com>"),
    }
    records = [sqs_record(body, mid) for mid, body in {**good, **bad}.items()]
    records.append({"messageId": "bad-record-shape", "body": None})

    result = invoke(records)

    assert failed_ids(result) == sorted([*bad, "bad-record-shape"])
    handler.reset()  # the process ends: the warm pool QUITs
    smtp_sink.wait_idle()
    received = smtp_sink.messages
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(
        ["maria@example.com", "john@example.com", "sns@example.com", "ana@example.com"]
    )
    assert all(len(r.rcpt_tos) == 1 for r in received)
    assert all(r.mail_from == "no-reply@example.com" for r in received)
    mails = by_recipient(smtp_sink)

    maria = mails["maria@example.com"]
    assert str(maria["To"]) == "Maria <maria@example.com>"
    assert str(maria["From"]) == "Async Notifier <no-reply@example.com>"
    assert maria["Subject"] == "Seus frames de férias.mp4 estão prontos"
    assert maria["X-Video-Id"] == "vid-1"
    text, html = texts(maria)
    assert "Olá, Maria" in text
    assert "férias.zip" in text
    assert '<html lang="pt-BR">' in html
    assert zip_attachment(maria) == ("férias.zip", objects["v1/v1.zip"])

    john = mails["john@example.com"]
    assert str(john["To"]) == "John <john@example.com>"
    assert john["Subject"] == "Your frames from holiday.mov are ready"
    text, html = texts(john)
    assert "Hello John" in text
    assert "Hello John" in html
    assert zip_attachment(john) == ("holiday.zip", objects["v2/v2.zip"])

    sns = mails["sns@example.com"]
    assert sns["Subject"] == "Seus frames de vid-3 estão prontos"
    assert zip_attachment(sns) == ("v3.zip", objects["v3/v3.zip"])

    ana = mails["ana@example.com"]
    assert ana["Subject"] == "We could not process corrupt.mp4"
    assert list(ana.iter_attachments()) == []
    text, html = texts(ana)
    assert "ffmpeg: moov atom not found" in text
    assert "ffmpeg: moov atom not found" in html

    everything = b"".join(r.data for r in received)
    assert b"attacker@evil.example" not in everything
    assert b"private-data" not in everything
    assert make_zip(2_000, seed=99) not in [zip_attachment(m)[1] for m in (maria, john, sns)]
    assert tmp_files(lambda_env) == []


def test_failed_notification_default_locale(
    lambda_env: dict[str, str], aws: MotoServer, smtp_sink: SmtpSink
) -> None:
    body = {
        "video_id": "vid-f",
        "status": "failed",
        "email": "rita@example.com",
        "name": "Rita",
        "file_name": "festa.mp4",
        "message": "Formato de vídeo não suportado <codec=h265>",
    }
    assert failed_ids(invoke([sqs_record(body, "m-1")])) == []
    [message] = smtp_sink.parsed()
    assert message["Subject"] == "Não foi possível processar festa.mp4"
    assert message.get_content_type() == "multipart/alternative"
    assert list(message.iter_attachments()) == []
    text, html = texts(message)
    assert "Olá, Rita" in text
    assert "Formato de vídeo não suportado <codec=h265>" in text
    assert "Formato de vídeo não suportado &lt;codec=h265&gt;" in html


def test_traversal_key_is_delivered_without_escaping_tmp_dir(
    lambda_env: dict[str, str], aws: MotoServer, bucket: str, smtp_sink: SmtpSink
) -> None:
    data = make_zip(30_000, seed=8)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"../../x.zip": data})
    tmp_dir = Path(lambda_env["TMP_DIR"])
    body = completed("vid-t", "../../x.zip", "t@example.com")
    assert failed_ids(invoke([sqs_record(body, "m-t")])) == []
    [message] = smtp_sink.parsed()
    assert zip_attachment(message) == ("x.zip", data)
    assert tmp_files(lambda_env) == []
    assert not (tmp_dir.parent / "x.zip").exists()
    assert not (tmp_dir.parent.parent / "x.zip").exists()


def test_empty_or_malformed_event_returns_an_empty_failure_list(
    lambda_env: dict[str, str], smtp_sink: SmtpSink
) -> None:
    assert handler.lambda_handler({"Records": []}, FakeLambdaContext()) == {"batchItemFailures": []}
    assert handler.lambda_handler({}, FakeLambdaContext()) == {"batchItemFailures": []}
    assert smtp_sink.connections_opened == 0


# --------------------------------------------------------------------------- failures of peers


def test_smtp_unreachable_fails_every_record_and_still_returns(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SMTP_PORT", str(free_port()))
    seed_objects(
        s3_client(aws.endpoint_url),
        bucket,
        {f"v{i}/v{i}.zip": make_zip(20_000, seed=i) for i in range(6)},
    )
    records = [
        sqs_record(completed(f"vid-{i}", f"v{i}/v{i}.zip", f"u{i}@example.com"), f"m-{i}")
        for i in range(6)
    ]
    records.append(
        sqs_record({"video_id": "f", "status": "FAILED", "email": "f@example.com"}, "m-failed")
    )
    result = invoke(records)
    assert failed_ids(result) == sorted(r["messageId"] for r in records)
    assert tmp_files(lambda_env) == []  # downloaded files are removed on failure too


def test_server_dropping_connections_mid_batch(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = make_zip(8_000, seed=4)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v/v.zip": data})
    with SmtpSink(drop_after=3) as sink:
        monkeypatch.setenv("SMTP_PORT", str(sink.port))
        records = [
            sqs_record(completed(f"vid-{i}", "v/v.zip", f"u{i}@example.com"), f"m-{i}")
            for i in range(60)
        ]
        assert failed_ids(invoke(records)) == []
        handler.reset()  # the process ends: the warm pool QUITs
        sink.wait_idle()
        assert sorted(r.rcpt_tos[0] for r in sink.messages) == sorted(
            f"u{i}@example.com" for i in range(60)
        )
        assert sink.connections_opened >= 20  # the server cut every connection after three
    assert tmp_files(lambda_env) == []


# --------------------------------------------------------------------------- volume


def _bulk(
    aws: MotoServer, bucket: str, count: int, distinct: int = 20
) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    objects = {f"bulk/{i:02d}.zip": make_zip(2_048 + 97 * i, seed=100 + i) for i in range(distinct)}
    seed_objects(s3_client(aws.endpoint_url), bucket, objects)
    keys = sorted(objects)
    records = [
        sqs_record(
            completed(f"video-{n:05d}", keys[n % distinct], f"user{n:05d}@example.com"),
            f"msg-{n:05d}",
        )
        for n in range(count)
    ]
    return records, objects


def _check_bulk_delivery(sink: SmtpSink, count: int, objects: dict[str, bytes]) -> None:
    """Every record's email arrived once, to its recipient, with its object's bytes attached.

    Parsed with the fast legacy policy: thousands of messages, and only the structure matters.
    """
    keys = sorted(objects)
    received = sink.messages
    assert len(received) == count
    seen = set()
    for raw in received:
        message = email.message_from_bytes(raw.data, policy=email.policy.compat32)
        n = int(str(message["X-Video-Id"]).removeprefix("video-"))
        assert raw.rcpt_tos == [f"user{n:05d}@example.com"]
        assert message["To"] == f"user{n:05d}@example.com"
        [attachment] = [p for p in message.walk() if p.get_content_type() == "application/zip"]
        assert attachment.get_payload(decode=True) == objects[keys[n % len(keys)]]
        seen.add(n)
    assert seen == set(range(count))


def test_200_records_use_at_most_pool_size_connections(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With the default recycling (100 messages) 200 emails need at least 2 connections over
    # time; lift it so that the count measures the pool bound alone (recycling is tested below
    # and in smtp/test_pool.py).
    monkeypatch.setenv("SMTP_MAX_MESSAGES_PER_CONNECTION", "200")
    records, objects = _bulk(aws, bucket, 200)
    assert failed_ids(invoke(records)) == []
    handler.reset()  # the process ends: the warm pool QUITs
    smtp_sink.wait_idle()
    _check_bulk_delivery(smtp_sink, 200, objects)
    pool_size = int(lambda_env["SMTP_POOL_SIZE"])
    # All opened at the start of the batch (their handshakes overlap the first downloads),
    # then kept for the whole batch: never more than the pool.
    assert smtp_sink.connections_opened == pool_size
    assert smtp_sink.quit_count == smtp_sink.connections_opened  # closed with QUIT at the end
    assert smtp_sink.connections_open == 0
    assert tmp_files(lambda_env) == []


def test_800_records_end_to_end_through_20_generations_of_connections(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Recycling after 40 emails (the default of 100 is checked in test_config): a connection
    # retires and another replaces it 20 times over, as 2,000 emails would with the default.
    monkeypatch.setenv("SMTP_POOL_SIZE", "8")
    monkeypatch.setenv("MAX_CONCURRENCY", "64")
    monkeypatch.setenv("SMTP_MAX_MESSAGES_PER_CONNECTION", "40")
    records, objects = _bulk(aws, bucket, 800)
    assert failed_ids(invoke(records)) == []
    handler.reset()  # the process ends: the warm pool QUITs
    smtp_sink.wait_idle()
    _check_bulk_delivery(smtp_sink, 800, objects)
    # Every retired connection carried 40 emails, and at most 8 (the pool) were still open
    # at the end; each one was closed with QUIT.
    assert 800 // 40 <= smtp_sink.connections_opened <= 800 // 40 + 8
    assert smtp_sink.quit_count == smtp_sink.connections_opened
    assert smtp_sink.connections_open == 0
    assert tmp_files(lambda_env) == []


# --------------------------------------------------------------------------- warm invocations


def test_warm_invocations_reuse_settings_connections_and_message_ids(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = make_zip(4_000, seed=6)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v/v.zip": data})
    body = completed("vid-r", "v/v.zip", "retry@example.com")
    assert failed_ids(invoke([sqs_record(body, "first-delivery")])) == []
    # Settings were read once: a later change of the environment does not reach a warm process.
    monkeypatch.setenv("SMTP_PORT", str(free_port()))
    assert failed_ids(invoke([sqs_record(body, "second-delivery")])) == []
    handler.reset()  # the process ends: the warm pool QUITs
    smtp_sink.wait_idle()
    first, second = smtp_sink.parsed()
    assert first["Message-ID"] == second["Message-ID"]
    # The second (warm) invocation reused the first one's connection: no new handshake.
    assert smtp_sink.connections_opened == 1
    assert smtp_sink.quit_count == 1


# --------------------------------------------------------------------------- configuration


def test_missing_smtp_server_raises_config_error(
    lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, smtp_sink: SmtpSink
) -> None:
    monkeypatch.delenv("SMTP_SERVER")
    record = sqs_record({"video_id": "v", "status": "FAILED", "email": "a@example.com"})
    with pytest.raises(ConfigError, match="SMTP_SERVER is required"):
        handler.lambda_handler(sqs_event([record]), FakeLambdaContext())
    assert smtp_sink.connections_opened == 0


def test_invalid_settings_raise_one_config_error(
    lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP_POOL_SIZE", "zero")
    monkeypatch.setenv("SMTP_TLS", "sometimes")
    record = sqs_record({"video_id": "v", "status": "FAILED", "email": "a@example.com"})
    with pytest.raises(ConfigError) as caught:
        handler.lambda_handler(sqs_event([record]), FakeLambdaContext())
    assert "SMTP_POOL_SIZE" in str(caught.value)
    assert "SMTP_TLS" in str(caught.value)


# --------------------------------------------------------------------------- TLS, AUTH and logs


def test_logs_one_json_line_per_record_without_secrets_or_bodies(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    tls_files: TlsFiles,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    password = "Sup3r-s3cret-SMTP-pa55"
    data = make_zip(6_000, seed=12)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v/v.zip": data})
    marker = "ERROR-TEXT-MARKER-7f3a"
    bodies: dict[str, Body | str] = {
        "log-ok": completed("vid-ok", "v/v.zip", "ok@example.com", name="Okay"),
        "log-failed": {
            "video_id": "vid-failed",
            "status": "FAILED",
            "email": "failed@example.com",
            "message": marker,
        },
        "log-missing": completed("vid-missing", "nope.zip", "missing@example.com"),
        "log-bad-json": "{not json",
    }
    with SmtpSink(tls=tls_files.server_context(), auth=("mailer", password)) as sink:
        monkeypatch.setenv("SMTP_SERVER", LOOPBACK)
        monkeypatch.setenv("SMTP_PORT", str(sink.port))
        monkeypatch.setenv("SMTP_TLS", "starttls")
        monkeypatch.setenv("SMTP_CA_FILE", str(tls_files.ca))
        monkeypatch.setenv("SMTP_USER", "mailer")
        monkeypatch.setenv("SMTP_PASSWORD", password)
        context = FakeLambdaContext(aws_request_id="req-1234")
        result = handler.lambda_handler(
            sqs_event(sqs_record(body, mid) for mid, body in bodies.items()), context
        )
        handler.reset()  # the process ends: the warm pool QUITs
        sink.wait_idle()
        # STARTTLS and AUTH are required by this sink, so delivery proves both happened.
        assert sorted(r.rcpt_tos[0] for r in sink.messages) == [
            "failed@example.com",
            "ok@example.com",
        ]
    assert failed_ids(result) == ["log-bad-json", "log-missing"]

    captured = capsys.readouterr()
    lines = log_lines(captured.out)
    # Other lines may name a record too (SQS retry back-off); the outcome line is one per record.
    per_record = [line for line in lines if "messageId" in line and "outcome" in line]
    assert sorted(line["messageId"] for line in per_record) == sorted(bodies)
    outcome = {line["messageId"]: line for line in per_record}
    assert outcome["log-ok"]["outcome"] == "sent"
    assert outcome["log-ok"]["video_id"] == "vid-ok"
    assert outcome["log-ok"]["status"] == "COMPLETED"
    assert outcome["log-ok"]["bytes"] == len(data)
    assert isinstance(outcome["log-ok"]["duration_ms"], int | float)
    assert outcome["log-failed"]["outcome"] == "sent"
    assert outcome["log-failed"]["status"] == "FAILED"
    assert outcome["log-missing"]["outcome"] == "failed"
    assert outcome["log-missing"]["error_class"] == "object_unavailable"
    assert outcome["log-bad-json"]["outcome"] == "failed"
    assert outcome["log-bad-json"]["error_class"] == "bad_message"
    assert "JSON" in outcome["log-bad-json"]["reason"]
    assert all(line["request_id"] == "req-1234" for line in per_record)

    everything = captured.out + captured.err
    assert password not in everything
    assert marker not in everything  # the FAILED notification's text is email body, not log
    assert "Hello Okay" not in everything
    assert "Olá, Okay" not in everything
    assert "frames extracted" not in everything
    assert tmp_files(lambda_env) == []
