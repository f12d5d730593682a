"""Operating the worker, end to end through the handler: SMTP credentials from Secrets
Manager (with rotation), CloudWatch EMF metrics per invocation, recipients from Cognito."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest
from servers import (
    LOOPBACK,
    REGION,
    FakeLambdaContext,
    MotoServer,
    SmtpSink,
    TlsFiles,
    log_lines,
    make_zip,
    s3_client,
    seed_objects,
    sqs_event,
    sqs_record,
)

import handler

OLD_PASSWORD = "pw-OLD-7f3a91"
NEW_PASSWORD = "pw-NEW-91c2e4"


def invoke(records: list[dict[str, Any]], **context: Any) -> list[str]:
    result = handler.lambda_handler(sqs_event(records), FakeLambdaContext(**context))
    assert list(result) == ["batchItemFailures"]
    return sorted(item["itemIdentifier"] for item in result["batchItemFailures"])


def body(video_id: str, **fields: Any) -> dict[str, Any]:
    return {"video_id": video_id, "status": "FAILED", "message": "codec error", **fields}


# --------------------------------------------------------------------------- secrets


def test_smtp_credentials_come_from_secrets_manager_and_follow_a_rotation(
    lambda_env: dict[str, str],
    aws: MotoServer,
    tls_files: TlsFiles,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secrets = boto3.client("secretsmanager", endpoint_url=aws.endpoint_url, region_name=REGION)
    secrets.create_secret(
        Name="smtp", SecretString=json.dumps({"username": "mailer", "password": OLD_PASSWORD})
    )
    with SmtpSink(tls=tls_files.server_context(), auth=("mailer", OLD_PASSWORD)) as sink:
        monkeypatch.setenv("SMTP_SERVER", LOOPBACK)
        monkeypatch.setenv("SMTP_PORT", str(sink.port))
        monkeypatch.setenv("SMTP_TLS", "starttls")
        monkeypatch.setenv("SMTP_CA_FILE", str(tls_files.ca))
        monkeypatch.setenv("SMTP_PASSWORD_SECRET_ID", "smtp")
        # One email per connection, so every email logs in again.
        monkeypatch.setenv("SMTP_MAX_MESSAGES_PER_CONNECTION", "1")

        assert invoke([sqs_record(body("v1", email="a@example.com"), "m1")]) == []
        # Rotation: the server and the secret change; the worker still holds the old password.
        secrets.put_secret_value(
            SecretId="smtp",
            SecretString=json.dumps({"username": "mailer", "password": NEW_PASSWORD}),
        )
        sink.auth = ("mailer", NEW_PASSWORD)
        assert invoke([sqs_record(body("v2", email="b@example.com"), "m2")]) == []
        handler.reset()
        sink.wait_idle()
        assert sorted(r.rcpt_tos[0] for r in sink.messages) == ["a@example.com", "b@example.com"]
    output = capsys.readouterr()
    for secret in (OLD_PASSWORD, NEW_PASSWORD):
        assert secret not in output.out
        assert secret not in output.err


def test_an_unreadable_secret_fails_records_transiently_without_sending(
    lambda_env: dict[str, str],
    aws: MotoServer,
    smtp_sink: SmtpSink,
    tls_files: TlsFiles,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SMTP_TLS", "starttls")
    monkeypatch.setenv("SMTP_CA_FILE", str(tls_files.ca))
    monkeypatch.setenv("SMTP_PASSWORD_SECRET_ID", "does-not-exist")
    assert invoke([sqs_record(body("v1", email="a@example.com"), "m1")]) == ["m1"]
    [failure] = [e for e in log_lines(capsys.readouterr().out) if e.get("outcome") == "failed"]
    assert failure["error_class"] == "secret_unavailable"
    assert failure["transient"] is True
    assert smtp_sink.messages == []


# --------------------------------------------------------------------------- metrics


def test_each_invocation_emits_one_emf_metrics_document(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("METRICS_NAMESPACE", "VideoTools/Notifier")
    zip_bytes = make_zip(3_000, seed=1)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v/v.zip": zip_bytes})
    completed = {"video_id": "v1", "bucket": bucket, "key": "v/v.zip", "email": "a@example.com"}
    records = [
        sqs_record(completed, "ok-completed"),
        sqs_record(body("v2", email="b@example.com"), "ok-failed-status"),
        sqs_record("{not json", "bad"),
    ]
    capsys.readouterr()
    assert invoke(records, function_name="notifier-prod") == ["bad"]

    documents = [e for e in log_lines(capsys.readouterr().out) if "_aws" in e]
    main = next(d for d in documents if "RecordsReceived" in d)
    [directive] = main["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "VideoTools/Notifier"
    assert directive["Dimensions"] == [["FunctionName"]]
    assert main["FunctionName"] == "notifier-prod"
    assert main["RecordsReceived"] == 3
    assert main["RecordsSent"] == 2
    assert main["RecordsFailed"] == 1
    assert main["BytesAttached"] == len(zip_bytes)
    assert main["SmtpConnectionsOpened"] >= 1
    assert main["InvocationDuration"] > 0
    by_class = [d for d in documents if "ErrorClass" in d]
    assert [(d["ErrorClass"], d["RecordsFailed"]) for d in by_class] == [("bad_message", 1)]
    names = {m["Name"] for m in directive["Metrics"]}
    assert {"RecordsReceived", "RecordsSent", "RecordsFailed", "InvocationDuration"} <= names


# --------------------------------------------------------------------------- Cognito


@pytest.fixture
def user_pool(aws: MotoServer) -> str:
    cognito = boto3.client("cognito-idp", endpoint_url=aws.endpoint_url, region_name=REGION)
    pool_id: str = cognito.create_user_pool(PoolName="users")["UserPool"]["Id"]
    cognito.admin_create_user(
        UserPoolId=pool_id,
        Username="maria",
        UserAttributes=[
            {"Name": "email", "Value": "maria@example.com"},
            {"Name": "email_verified", "Value": "true"},
            {"Name": "given_name", "Value": "Maria"},
        ],
        MessageAction="SUPPRESS",
    )
    cognito.admin_create_user(UserPoolId=pool_id, Username="no-email", MessageAction="SUPPRESS")
    return pool_id


def test_recipients_are_looked_up_in_cognito(
    lambda_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    user_pool: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("COGNITO_USER_POOL_ID", user_pool)
    zip_bytes = make_zip(5_000, seed=2)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"m/m.zip": zip_bytes})
    records = [
        sqs_record(
            {"video_id": "v1", "bucket": bucket, "key": "m/m.zip", "cognito_user_id": "maria"},
            "completed-by-user-id",
        ),
        sqs_record(body("v2", cognito_user_id="maria"), "failed-by-user-id"),
        sqs_record(body("v3", cognito_user_id="no-email"), "user-without-email"),
        sqs_record(body("v4", cognito_user_id="nobody"), "unknown-user"),
    ]
    assert invoke(records) == ["unknown-user", "user-without-email"]
    handler.reset()
    smtp_sink.wait_idle()
    received = smtp_sink.parsed()
    assert sorted(m["X-Video-Id"] for m in received) == ["v1", "v2"]
    for message in received:
        [to] = message["To"].addresses
        assert (to.addr_spec, to.display_name) == ("maria@example.com", "Maria")
    attachment = next(m for m in received if m["X-Video-Id"] == "v1")
    [part] = list(attachment.iter_attachments())
    assert part.get_payload(decode=True) == zip_bytes
    failures = {
        e["messageId"]: e
        for e in log_lines(capsys.readouterr().out)
        if e.get("outcome") == "failed"
    }
    assert failures["user-without-email"]["error_class"] == "recipient_unknown"
    assert failures["user-without-email"]["transient"] is False
    assert failures["unknown-user"]["error_class"] == "recipient_unknown"


def test_a_user_id_without_a_configured_pool_is_a_clear_failure(
    lambda_env: dict[str, str],
    aws: MotoServer,
    smtp_sink: SmtpSink,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert invoke([sqs_record(body("v1", cognito_user_id="maria"), "m1")]) == ["m1"]
    [failure] = [e for e in log_lines(capsys.readouterr().out) if e.get("outcome") == "failed"]
    assert failure["error_class"] == "lookup_failed"
    assert "COGNITO_USER_POOL_ID" in failure["reason"]
    assert smtp_sink.messages == []
