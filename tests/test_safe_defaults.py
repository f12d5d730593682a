"""Safe by default: only allowed objects are mailed, only to verified recipients, no address
in logs, links that say their true lifetime, re-sends that go out, honest headers.

End to end through `handler.lambda_handler`, against moto (S3, SQS, Cognito, Secrets
Manager, DynamoDB) and aiosmtpd.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from faults import FaultySmtp, S3FaultProxy, SmtpFaults
from servers import (
    LOOPBACK,
    REGION,
    FakeLambdaContext,
    MotoServer,
    SmtpSink,
    log_lines,
    make_zip,
    s3_client,
    seed_objects,
    sqs_event,
    sqs_record,
)

import handler
from async_notifier.config import ConfigError, Settings
from async_notifier.errors import address_hash
from async_notifier.smtp.channel import MAX_REPLY_LINES, ProtocolError, SmtpChannel

BUCKET = "videos-zip"
MINIMAL = {"SMTP_SERVER": "smtp.example.com", "EMAIL_FROM": "no-reply@example.com"}


@pytest.fixture
def env(
    worker_env: dict[str, str], bucket: str, monkeypatch: pytest.MonkeyPatch, fresh_handler: None
) -> dict[str, str]:
    monkeypatch.setenv("ALLOWED_BUCKETS", bucket)
    monkeypatch.setenv("RETRY_BACKOFF", "false")
    return worker_env


def invoke(records: list[dict[str, Any]]) -> list[str]:
    result = handler.lambda_handler(sqs_event(records), FakeLambdaContext())
    return sorted(item["itemIdentifier"] for item in result["batchItemFailures"])


def failures(out: str) -> dict[str, dict[str, Any]]:
    return {e["messageId"]: e for e in log_lines(out) if e.get("outcome") == "failed"}


def completed(video_id: str, key: str, **fields: Any) -> dict[str, Any]:
    return {"video_id": video_id, "status": "COMPLETED", "bucket": BUCKET, "key": key, **fields}


def failed(video_id: str, **fields: Any) -> dict[str, Any]:
    return {"video_id": video_id, "status": "FAILED", "message": "codec error", **fields}


# --------------------------------------------------------------------------- settings


def test_allowed_buckets_is_required_and_star_is_said_on_purpose() -> None:
    with pytest.raises(ConfigError, match="ALLOWED_BUCKETS is required"):
        Settings.from_env(MINIMAL)
    assert Settings.from_env({**MINIMAL, "ALLOWED_BUCKETS": "*"}).allowed_buckets == {"*"}
    with pytest.raises(ConfigError, match="list none beside it"):
        Settings.from_env({**MINIMAL, "ALLOWED_BUCKETS": "*, videos"})
    # The SES events function mails nothing: no bucket needed there.
    events = Settings.from_env({"SUPPRESSION_TABLE": "suppression"}, sending=False)
    assert events.allowed_buckets == frozenset()


@pytest.mark.parametrize(
    ("prefix", "ok"),
    [
        ("users/{cognito_user_id}/", True),
        ("videos/{video_id}", True),
        ("plain/", True),
        ("users/{email}/", False),
        ("users/{}/", False),
        ("users/{cognito_user_id!r}/", False),
        ("users/{cognito_user_id", False),
    ],
)
def test_key_prefix_placeholders_are_checked_at_start(prefix: str, ok: bool) -> None:
    env = {**MINIMAL, "ALLOWED_BUCKETS": "*", "ALLOWED_KEY_PREFIX": prefix}
    if ok:
        assert Settings.from_env(env).allowed_key_prefix == prefix
    else:
        with pytest.raises(ConfigError, match="ALLOWED_KEY_PREFIX"):
            Settings.from_env(env)


def test_a_login_without_a_password_source_is_refused_at_start() -> None:
    env = {**MINIMAL, "ALLOWED_BUCKETS": "*", "SMTP_USER": "mailer", "SMTP_TLS": "starttls"}
    with pytest.raises(ConfigError, match="neither SMTP_PASSWORD nor SMTP_PASSWORD_SECRET_ID"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "SMTP_PASSWORD": "x"}).smtp_user == "mailer"
    with_secret = {**env, "SMTP_PASSWORD_SECRET_ID": "smtp"}
    assert Settings.from_env(with_secret).smtp_password_secret_id == "smtp"


def test_header_settings_are_validated() -> None:
    env = {**MINIMAL, "ALLOWED_BUCKETS": "*"}
    with pytest.raises(ConfigError, match="SES_CONFIGURATION_SET"):
        Settings.from_env({**env, "SES_CONFIGURATION_SET": "has space"})
    with pytest.raises(ConfigError, match="REPLY_TO"):
        Settings.from_env({**env, "REPLY_TO": "a@b.example, c@d.example"})
    s = Settings.from_env({**env, "REPLY_TO": "Help <help@example.com>"})
    assert s.reply_to is not None
    assert s.reply_to.addr_spec == "help@example.com"


# --------------------------------------------------------------------------- objects


def test_only_allowed_objects_are_mailed(
    env: dict[str, str],
    aws: MotoServer,
    smtp_sink: SmtpSink,
    s3_proxy: S3FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Buckets outside ALLOWED_BUCKETS and keys outside the owner's prefix fail for good,
    before any download: S3 (moto, behind a proxy that notes every request) is never asked
    for them."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.endpoint_url)
    monkeypatch.setenv("ALLOWED_KEY_PREFIX", "users/{cognito_user_id}/")
    monkeypatch.setenv("COGNITO_USER_POOL_ID", "us-east-1_NotUsed1")  # never called here
    client = s3_client(aws.endpoint_url)
    zip_bytes = make_zip(2_000, seed=5)
    # Every object named exists: refused after a download, each would fail the same way.
    seed_objects(
        client,
        BUCKET,
        {
            key: zip_bytes
            for key in (
                "users/u1/v.zip",
                "users/u2/v.zip",
                "users/u1/x/v.zip",
                "users/u1/../u2/v.zip",
            )
        },
    )
    seed_objects(client, "private-data", {"secret.zip": zip_bytes})
    records = [
        sqs_record(
            {**completed("v1", "users/u2/v.zip"), "cognito_user_id": "u1"}, "someone-elses-key"
        ),
        sqs_record(
            {
                **completed("v2", "users/u1/v.zip"),
                "cognito_user_id": "u1",
                "email": "x@evil-corp.com",
            },
            "own-key-but-own-email",
        ),
        sqs_record(completed("v3", "users/u1/v.zip", email="x@evil-corp.com"), "no-owner"),
        sqs_record(
            {**completed("v5", "users/u1/../u2/v.zip"), "cognito_user_id": "u1"}, "dot-segments"
        ),
        sqs_record(
            {**completed("v6", "users/u1/x/v.zip"), "cognito_user_id": "u1/x"}, "slash-in-owner"
        ),
        sqs_record(
            {**completed("v4", "secret.zip", email="a@example.com"), "bucket": "private-data"},
            "other-bucket",
        ),
    ]
    assert invoke(records) == sorted(r["messageId"] for r in records)
    found = failures(capsys.readouterr().out)
    assert {mid: f["error_class"] for mid, f in found.items()} == {
        "someone-elses-key": "key_not_allowed",
        "own-key-but-own-email": "key_not_allowed",
        "no-owner": "key_not_allowed",
        "dot-segments": "key_not_allowed",
        "slash-in-owner": "key_not_allowed",
        "other-bucket": "bucket_not_allowed",
    }
    assert all(f["transient"] is False for f in found.values())
    assert "users/u1/" in found["someone-elses-key"]["reason"]
    assert "'..' segments" in found["dot-segments"]["reason"]
    assert "must not contain '/'" in found["slash-in-owner"]["reason"]
    assert smtp_sink.messages == []
    # Not one request for any of the objects: neither bucket was even asked.
    assert [(r.method, r.path) for r in s3_proxy.requests if r.path != "/"] == []


def test_the_owners_key_goes_out(
    env: dict[str, str],
    aws: MotoServer,
    smtp_sink: SmtpSink,
    s3_proxy: S3FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.endpoint_url)
    monkeypatch.setenv("ALLOWED_KEY_PREFIX", "videos/{video_id}/")
    seed_objects(s3_client(aws.endpoint_url), BUCKET, {"videos/v1/frames.zip": make_zip(900, 1)})
    record = sqs_record(completed("v1", "videos/v1/frames.zip", email="a@example.com"), "ok")
    assert invoke([record]) == []
    assert [m["X-Video-Id"] for m in smtp_sink.parsed()] == ["v1"]
    # The proxy sees the worker's S3 requests (so its silence above means something).
    assert [(r.method, r.path) for r in s3_proxy.requests if r.path != "/"] == [
        ("GET", f"/{BUCKET}/videos/v1/frames.zip")
    ]


# --------------------------------------------------------------------------- recipients


@pytest.fixture
def user_pool(aws: MotoServer) -> str:
    cognito = boto3.client("cognito-idp", endpoint_url=aws.endpoint_url, region_name=REGION)
    pool_id: str = cognito.create_user_pool(PoolName="users")["UserPool"]["Id"]
    for username, verified in (("verified", "true"), ("unverified", "false")):
        cognito.admin_create_user(
            UserPoolId=pool_id,
            Username=username,
            UserAttributes=[
                {"Name": "email", "Value": f"{username}@example.com"},
                {"Name": "email_verified", "Value": verified},
            ],
            MessageAction="SUPPRESS",
        )
    return pool_id


def test_an_unverified_cognito_address_is_a_permanent_failure_of_its_own(
    env: dict[str, str],
    smtp_sink: SmtpSink,
    user_pool: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("COGNITO_USER_POOL_ID", user_pool)
    records = [
        sqs_record(failed("v1", cognito_user_id="verified"), "verified"),
        sqs_record(failed("v2", cognito_user_id="unverified"), "unverified"),
    ]
    assert invoke(records) == ["unverified"]
    out = capsys.readouterr().out
    [failure] = failures(out).values()
    assert (failure["error_class"], failure["transient"]) == ("recipient_unverified", False)
    [metrics] = [e for e in log_lines(out) if "RecipientsUnverified" in e]
    assert metrics["RecipientsUnverified"] == 1
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["verified@example.com"]]


def test_allow_unverified_email_mails_them_anyway(
    env: dict[str, str], smtp_sink: SmtpSink, user_pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COGNITO_USER_POOL_ID", user_pool)
    monkeypatch.setenv("ALLOW_UNVERIFIED_EMAIL", "true")
    assert invoke([sqs_record(failed("v2", cognito_user_id="unverified"), "u")]) == []
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["unverified@example.com"]]


# --------------------------------------------------------------------------- privacy


def test_no_address_or_name_reaches_logs_metrics_or_dead_letter_attributes(
    worker_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    faulty_smtp: FaultySmtp,
    user_pool: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fresh_handler: None,
) -> None:
    """A batch with every kind of failure: the server echoes refused addresses, a body holds
    an invalid one, Cognito has an unverified user. Every captured log line, EMF document and
    dead-letter attribute is searched for each recipient's address and name."""
    sqs = boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name=REGION)
    dlq_url = sqs.create_queue(QueueName="privacy-dlq")["QueueUrl"]
    monkeypatch.setenv("SMTP_SERVER", faulty_smtp.host)
    monkeypatch.setenv("SMTP_PORT", str(faulty_smtp.port))
    monkeypatch.setenv("ALLOWED_BUCKETS", bucket)
    monkeypatch.setenv("DEAD_LETTER_QUEUE_URL", dlq_url)
    monkeypatch.setenv("RETRY_BACKOFF", "false")
    monkeypatch.setenv("RETRY_ATTEMPTS", "1")
    monkeypatch.setenv("COGNITO_USER_POOL_ID", user_pool)
    people = {
        "refused": ("Rita Refusada", "rita.refused@example.com"),
        "missing-zip": ("Mia Missing", "mia.missing@example.com"),
        "bad-address": ("Bea Broken", "bea..broken@example"),
        "other-bucket": ("Otto Other", "otto.other@example.com"),
        "sent": ("Sara Sent", "sara.sent@example.com"),
    }
    faulty_smtp.faults = SmtpFaults(
        reject={people["refused"][1]},
        reject_reply="550 5.1.1 <{address}>: Recipient address rejected: User unknown",
    )
    seed_objects(s3_client(aws.endpoint_url), bucket, {"ok.zip": make_zip(1_000, 3)})

    def body(kind: str, **fields: Any) -> dict[str, Any]:
        name, address = people[kind]
        return {**failed(f"v-{kind}"), "name": name, "email": address, **fields}

    records = [
        sqs_record(body("refused"), "refused"),
        sqs_record(body("missing-zip", status="COMPLETED", bucket=bucket, key="no.zip"), "missing"),
        sqs_record(body("bad-address"), "bad-address"),
        sqs_record(body("other-bucket", status="COMPLETED", bucket="elsewhere", key="a"), "other"),
        sqs_record(body("sent"), "sent"),
        sqs_record(failed("v-unverified", cognito_user_id="unverified"), "unverified"),
    ]
    assert invoke(records) == []  # every failure here is permanent: dead-lettered
    out = capsys.readouterr().out
    dead = []
    while batch := sqs.receive_message(
        QueueUrl=dlq_url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
    ).get("Messages"):
        dead += batch
        for message in batch:
            sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=message["ReceiptHandle"])
    assert len(dead) == 5
    attributes = json.dumps([m["MessageAttributes"] for m in dead])
    everything = out + attributes
    secrets = [text for pair in people.values() for text in pair] + ["unverified@example.com"]
    for text in secrets:
        assert text.lower() not in everything.lower(), f"{text!r} leaked"
    # What support still has: the same short hash in the log and the dead-letter reason.
    refused_hash = address_hash(people["refused"][1])
    assert refused_hash in out
    assert refused_hash in attributes
    assert [m.rcpt_tos for m in faulty_smtp.messages] == [[people["sent"][1]]]


# --------------------------------------------------------------------------- re-sends


def test_a_new_notification_for_the_same_video_is_a_new_email(
    env: dict[str, str], smtp_sink: SmtpSink
) -> None:
    """Redeliveries of one notification send once; a new one (new notification_id, or a new
    timestamp when there is none) goes out, with a Message-ID of its own."""
    first = failed("v1", email="a@example.com", notification_id="n-1")
    records = [
        sqs_record(first, "n1"),
        sqs_record(first, "n1-duplicate"),
        sqs_record({**first, "notification_id": "n-2"}, "n2"),
        sqs_record(failed("v1", email="a@example.com", timestamp="2026-01-01T10:00:00Z"), "t1"),
        sqs_record(failed("v1", email="a@example.com", timestamp="2026-01-02T10:00:00Z"), "t2"),
    ]
    assert invoke(records) == []
    message_ids = [m["Message-ID"] for m in smtp_sink.parsed()]
    assert len(message_ids) == 4  # n1 (once), n2, t1, t2
    assert len(set(message_ids)) == 4


# --------------------------------------------------------------------------- headers


def test_every_email_says_it_is_automatic_with_reply_to_and_configuration_set(
    env: dict[str, str], smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPLY_TO", "Suporte <suporte@example.com>")
    monkeypatch.setenv("SES_CONFIGURATION_SET", "notifier-events")
    assert invoke([sqs_record(failed("v1", email="a@example.com"), "m")]) == []
    [message] = smtp_sink.parsed()
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Reply-To"].addresses[0].addr_spec == "suporte@example.com"
    assert message["X-SES-CONFIGURATION-SET"] == "notifier-events"


def test_without_them_only_auto_submitted(env: dict[str, str], smtp_sink: SmtpSink) -> None:
    assert invoke([sqs_record(failed("v1", email="a@example.com"), "m")]) == []
    [message] = smtp_sink.parsed()
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Reply-To"] is None
    assert message["X-SES-CONFIGURATION-SET"] is None


# --------------------------------------------------------------------------- links


class CredentialsEndpoint:
    """The container credentials endpoint (what ECS and SnapStart'd Lambdas use): temporary
    credentials that say when they expire. A real HTTP peer on 127.0.0.1."""

    def __init__(self, expires_in: float) -> None:
        self.expires_in = expires_in
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                expiration = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=owner.expires_in)
                body = json.dumps(
                    {
                        "AccessKeyId": "ASIATEMPORARY",
                        "SecretAccessKey": "temporary-secret",
                        "Token": "temporary-token",
                        "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_port}/credentials"

    def __enter__(self) -> CredentialsEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _link(message: Any) -> dict[str, list[str]]:
    text = message.get_body(preferencelist=("plain",)).get_content()
    [url] = re.findall(r"https?://\S+X-Amz-Signature=[0-9a-f]+", text)
    return parse_qs(urlsplit(url).query)


@pytest.fixture
def big_zip(env: dict[str, str], aws: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ZIP over MAX_ATTACHMENT_BYTES: the email carries a link."""
    monkeypatch.setenv("MAX_ATTACHMENT_BYTES", "1000")
    seed_objects(s3_client(aws.endpoint_url), BUCKET, {"big.zip": make_zip(5_000, seed=8)})
    return "big.zip"


def test_links_signed_with_long_term_keys_last_as_asked(big_zip: str, smtp_sink: SmtpSink) -> None:
    assert invoke([sqs_record(completed("v1", big_zip, email="a@example.com"), "m")]) == []
    [message] = smtp_sink.parsed()
    assert _link(message)["X-Amz-Expires"] == ["604800"]


def test_session_credentials_of_unknown_expiry_promise_an_hour_at_most(
    big_zip: str, smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lambda's own credentials carry a session token and no expiry."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", "lambda-session-token")
    assert invoke([sqs_record(completed("v1", big_zip, email="a@example.com"), "m")]) == []
    [message] = smtp_sink.parsed()
    assert _link(message)["X-Amz-Expires"] == ["3600"]


def test_credentials_that_expire_sooner_shorten_the_link_and_its_promise(
    big_zip: str, smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CredentialsEndpoint(expires_in=20 * 60) as endpoint:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", endpoint.url)
        assert invoke([sqs_record(completed("v1", big_zip, email="a@example.com"), "m")]) == []
    [message] = smtp_sink.parsed()
    link = _link(message)
    assert 0 < int(link["X-Amz-Expires"][0]) <= 20 * 60 - 60
    assert link["X-Amz-Credential"][0].startswith("ASIATEMPORARY/")
    # The email states the same end as the link: within the next twenty minutes.
    text = message.get_body(preferencelist=("plain",)).get_content()
    sent = dt.datetime.now(dt.UTC)
    stated = _stated_expiry(text)
    assert sent < stated <= sent + dt.timedelta(minutes=20)


def test_a_signing_key_pair_from_secrets_manager_gives_links_of_days(
    big_zip: str, aws: MotoServer, smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = boto3.client("secretsmanager", endpoint_url=aws.endpoint_url, region_name=REGION)
    secrets.create_secret(
        Name="link-signer",
        SecretString=json.dumps(
            {"access_key_id": "AKIALINKSIGNER", "secret_access_key": "long-lived-secret"}
        ),
    )
    monkeypatch.setenv("AWS_SESSION_TOKEN", "lambda-session-token")  # the role's: an hour
    monkeypatch.setenv("LINK_SIGNING_SECRET_ID", "link-signer")
    assert invoke([sqs_record(completed("v1", big_zip, email="a@example.com"), "m")]) == []
    [message] = smtp_sink.parsed()
    link = _link(message)
    assert link["X-Amz-Expires"] == ["604800"]
    assert link["X-Amz-Credential"][0].startswith("AKIALINKSIGNER/")


def _stated_expiry(text: str) -> dt.datetime:
    """The end the (pt-BR) email states for its link: "válido até 05/12/2026 11:23 UTC",
    rounded up to the end of that minute."""
    match = re.search(r"(\d{2})/(\d{2})/(\d{4}) (\d{2}):(\d{2}) UTC", text)
    assert match, text
    day, month, year, hour, minute = (int(part) for part in match.groups())
    stated = dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC)
    return stated + dt.timedelta(minutes=1)


# --------------------------------------------------------------------------- replies


async def test_a_reply_of_too_many_lines_is_a_protocol_error_not_unbounded_memory() -> None:
    """A server that answers with an endless multi-line reply: the connection is closed
    once the reply passes MAX_REPLY_LINES lines, and the command fails."""

    served = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readline()
            for _ in range(MAX_REPLY_LINES * 5):
                writer.write(b"250-still going\r\n")
            await writer.drain()
            await reader.read()  # until the client hangs up
        except ConnectionError:
            pass
        finally:
            writer.close()
            served.set()

    server = await asyncio.start_server(serve, LOOPBACK, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        transport, channel = await asyncio.get_running_loop().create_connection(
            SmtpChannel, LOOPBACK, port
        )
        channel._transport = transport  # type: ignore[assignment]
        with pytest.raises(OSError, match="connection lost"):
            async with asyncio.timeout(5):
                await channel.command("NOOP", 5.0)
        assert isinstance(channel._lost, ProtocolError)
        assert f"more than {MAX_REPLY_LINES} lines" in str(channel._lost)
        assert not channel.is_connected
        assert len(channel._lines) <= MAX_REPLY_LINES + 1
        # The server's side ends too (the client hung up), before the test's loop closes.
        async with asyncio.timeout(30):
            await served.wait()
    finally:
        server.close()
        await server.wait_closed()
