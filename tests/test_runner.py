"""The SQS runner against a real (moto) queue with a dead-letter queue, and a real SMTP sink.

It must do what Lambda's event source mapping does: hand the batch code records shaped like
Lambda's, delete what succeeded, leave failures to come back until the redrive policy moves
them to the DLQ, and stop cleanly on a signal.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from queues import (
    LAMBDA_RECORD_KEYS,
    REDRIVE_ENV,
    REDRIVE_UNSET,
    Queues,
    client,
    counts,
    create_queues,
    notification,
    receive_all,
    send,
)
from servers import MotoServer, SmtpSink, make_zip, s3_client, seed_objects, sqs_record

from async_notifier.batch import BatchResult
from async_notifier.config import Settings
from async_notifier.runner import run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def runner_env(worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in REDRIVE_ENV.items():
        monkeypatch.setenv(name, value)
    for name in REDRIVE_UNSET:
        monkeypatch.delenv(name, raising=False)
    return {**worker_env, **REDRIVE_ENV}


@pytest.fixture
def sqs(aws: MotoServer) -> Any:
    return client("sqs", aws.endpoint_url)


@pytest.fixture
def queues(sqs: Any) -> Queues:
    return create_queues(sqs, visibility_timeout=1, max_receive_count=2)


class Batches:
    """The on_batch hook: every record and result the batch code saw, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[dict[str, Any]], BatchResult]] = []

    def __call__(self, records: list[dict[str, Any]], result: BatchResult) -> None:
        self.seen.append((records, result))

    def records(self, message_id: str) -> list[dict[str, Any]]:
        return [r for records, _ in self.seen for r in records if r["messageId"] == message_id]


def _good_and_bad(sqs: Any, queues: Queues, aws: MotoServer, bucket: str) -> dict[str, str]:
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v1.zip": make_zip(20_000, seed=1)})
    return {
        "completed": send(
            sqs,
            queues.url,
            notification("v1", bucket=bucket, key="v1.zip", email="ana@example.com"),
            origin="test",
            blob=b"\x00\x01binary",
        ),
        "failed": send(
            sqs, queues.url, notification("v2", status="FAILED", email="bo@example.com")
        ),
        "not_json": send(sqs, queues.url, "{not json"),
        "no_email": send(sqs, queues.url, notification("v3", status="FAILED", email=None)),
    }


async def test_runner_emails_good_messages_and_leaves_bad_ones_to_the_dlq(
    runner_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    sqs: Any,
    queues: Queues,
) -> None:
    ids = _good_and_bad(sqs, queues, aws, bucket)
    batches = Batches()

    stats = await run(
        Settings.from_env(),
        queues.url,
        batch_size=10,
        batch_window=0.2,
        wait_time=1,
        drain=True,
        on_batch=batches,
    )

    # Good messages: emailed once each, and deleted.
    assert sorted(m.rcpt_tos[0] for m in smtp_sink.messages) == [
        "ana@example.com",
        "bo@example.com",
    ]
    assert len(batches.records(ids["completed"])) == 1
    assert len(batches.records(ids["failed"])) == 1
    assert counts(sqs, queues.url) == dict.fromkeys(counts(sqs, queues.url), 0)
    # Bad messages: never deleted; after maxReceiveCount receives SQS moved them to the DLQ.
    dead = receive_all(sqs, queues.dlq_url)
    assert sorted(m["MessageId"] for m in dead) == sorted([ids["not_json"], ids["no_email"]])
    for name in ("not_json", "no_email"):
        seen = batches.records(ids[name])
        assert [r["attributes"]["ApproximateReceiveCount"] for r in seen] == ["1", "2"]
    assert stats.drained
    assert stats.deleted == stats.succeeded == 2
    assert stats.failed == 4  # two bad messages, two receives each
    assert stats.delete_failed == 0


async def test_records_have_lambdas_event_shape(
    runner_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    sqs: Any,
    queues: Queues,
) -> None:
    ids = _good_and_bad(sqs, queues, aws, bucket)
    batches = Batches()

    await run(
        Settings.from_env(),
        queues.url,
        batch_size=10,
        batch_window=0.2,
        wait_time=1,
        drain=True,
        max_batches=1,
        on_batch=batches,
    )

    [record] = batches.records(ids["completed"])
    reference = sqs_record("{}")  # how the Lambda tests build a record by hand
    assert set(record) - {"md5OfMessageAttributes"} == LAMBDA_RECORD_KEYS == set(reference)
    assert record["body"] == json.dumps(
        notification("v1", bucket=bucket, key="v1.zip", email="ana@example.com")
    )
    assert (
        record["md5OfBody"]
        == hashlib.md5(record["body"].encode(), usedforsecurity=False).hexdigest()
    )
    assert record["receiptHandle"]
    assert record["eventSource"] == "aws:sqs"
    assert record["eventSourceARN"] == queues.arn
    assert record["awsRegion"] == "us-east-1" == queues.arn.split(":")[3]
    attributes = record["attributes"]
    assert attributes["ApproximateReceiveCount"] == "1"
    for name in ("SentTimestamp", "SenderId", "ApproximateFirstReceiveTimestamp"):
        assert isinstance(attributes[name], str)
        assert attributes[name]
    assert int(attributes["SentTimestamp"]) <= int(attributes["ApproximateFirstReceiveTimestamp"])
    assert record["messageAttributes"] == {
        "origin": {
            "stringValue": "test",
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "String",
        },
        "blob": {
            "binaryValue": base64.b64encode(b"\x00\x01binary").decode(),
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "Binary",
        },
    }
    assert isinstance(record["md5OfMessageAttributes"], str)
    [plain] = batches.records(ids["failed"])
    assert plain["messageAttributes"] == {}
    assert "md5OfMessageAttributes" not in plain
    json.dumps(batches.seen[0][0])  # what Lambda delivers is JSON: so must this be


async def test_batches_stay_within_batch_size(
    runner_env: dict[str, str], smtp_sink: SmtpSink, sqs: Any, queues: Queues
) -> None:
    sent = {
        send(sqs, queues.url, notification(f"v{i}", status="FAILED", email=f"u{i}@example.com"))
        for i in range(23)
    }
    batches = Batches()

    stats = await run(
        Settings.from_env(),
        queues.url,
        batch_size=5,
        batch_window=0.5,
        wait_time=1,
        drain=True,
        on_batch=batches,
    )

    sizes = [len(records) for records, _ in batches.seen]
    assert all(1 <= size <= 5 for size in sizes)
    assert sum(sizes) == 23
    assert {r["messageId"] for records, _ in batches.seen for r in records} == sent
    assert len(smtp_sink.messages) == 23
    assert stats.deleted == 23
    assert counts(sqs, queues.url) == dict.fromkeys(counts(sqs, queues.url), 0)


async def test_max_batches_leaves_the_rest_in_the_queue(
    runner_env: dict[str, str], smtp_sink: SmtpSink, sqs: Any, queues: Queues
) -> None:
    for i in range(15):
        send(sqs, queues.url, notification(f"v{i}", status="FAILED", email=f"u{i}@example.com"))

    stats = await run(
        Settings.from_env(),
        queues.url,
        batch_size=5,
        batch_window=5,
        wait_time=1,
        max_batches=1,
    )

    assert stats.batches == 1
    assert stats.received == stats.deleted == 5
    assert len(smtp_sink.messages) == 5
    # Nothing else was received and kept back: the other ten are visible right away.
    assert counts(sqs, queues.url)["ApproximateNumberOfMessages"] == 10


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "async_notifier", *args]


def _log_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_cli_drains_the_queue(
    runner_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    sqs: Any,
    queues: Queues,
) -> None:
    ids = _good_and_bad(sqs, queues, aws, bucket)

    done = subprocess.run(
        _cli(
            "run", "--queue-url", queues.url, "--drain", "--wait-time", "1", "--batch-window", "0"
        ),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )

    assert done.returncode == 0, done.stderr + done.stdout
    logs = _log_lines(done.stdout)
    [stopped] = [line for line in logs if line.get("message") == "runner stopped"]
    assert stopped["drained"] is True
    assert stopped["deleted"] == 2
    assert sorted(m.rcpt_tos[0] for m in smtp_sink.messages) == [
        "ana@example.com",
        "bo@example.com",
    ]
    assert counts(sqs, queues.url) == dict.fromkeys(counts(sqs, queues.url), 0)
    dead = receive_all(sqs, queues.dlq_url)
    assert sorted(m["MessageId"] for m in dead) == sorted([ids["not_json"], ids["no_email"]])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_stops_cleanly_on_signal(
    runner_env: dict[str, str], sqs: Any, queues: Queues, signum: signal.Signals
) -> None:
    process = subprocess.Popen(
        _cli("run", "--queue-url", queues.url, "--wait-time", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        started = _read_until(process, b'"runner started"', timeout=60)
        assert b'"runner started"' in started, started.decode(errors="replace")
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr.decode(errors="replace")
    logs = _log_lines((started + stdout).decode())
    assert [line.get("message") for line in logs if "signal" in line] == [
        "signal received: stopping after the batch in flight"
    ]
    [stopped] = [line for line in logs if line.get("message") == "runner stopped"]
    assert stopped["batches"] == 0
    assert stopped["drained"] is False


def _read_until(process: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    """Read the child's stdout (unbuffered) until `needle` shows up, it exits, or time is up."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while needle not in seen and time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                seen += chunk
            elif process.poll() is not None:
                break
    return seen


def test_cli_reports_bad_settings() -> None:
    done = subprocess.run(
        _cli("run", "--queue-url", "http://127.0.0.1:1/000000000000/none"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "SMTP_SERVER"},
        check=False,
    )
    assert done.returncode == 2
    assert "SMTP_SERVER is required" in done.stderr
