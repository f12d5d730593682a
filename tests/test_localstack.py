"""End to end against LocalStack (`make localstack`, then `make test-localstack`).

The design promises that the worker runs against LocalStack; these tests keep the promise
honest on every CI run. They need LocalStack on 127.0.0.1:4566 (or LOCALSTACK_ENDPOINT) and
fail, never skip, without it. `make test` deselects them with `-m "not localstack"`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from queues import (
    client,
    counts,
    create_queues,
    notification,
    receive_all,
    run_with_own_notifier,
    send,
)
from servers import SmtpSink, make_zip

from async_notifier.batch.outcome import BatchResult
from async_notifier.config import Settings
from async_notifier.local.demo import Options, run_local

pytestmark = pytest.mark.localstack


async def test_run_local_flow_against_localstack(
    localstack: str, restore_environ: None, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox"
    out = io.StringIO()
    report = await run_local(
        Options(messages=8, zip_size=100_000, outbox=outbox, endpoint_url=localstack), out=out
    )

    output = out.getvalue()
    assert report.ok, output
    assert "Every message ended where it should." in output
    by_label = {sample.label: sample for sample in report.samples}
    for label in ("COMPLETED pt-BR", "COMPLETED en", "FAILED en", "FAILED pt-BR"):
        [mail] = by_label[label].emails
        assert mail.eml.exists()
        assert mail.html is not None
        assert mail.html.exists()
        assert by_label[label].tries == 1
    assert by_label["COMPLETED pt-BR"].emails[0].attachments == ("férias na praia.zip",)
    for label in ("bad: not JSON", "bad: no email", "COMPLETED pt-BR, ZIP missing"):
        assert by_label[label].in_dlq
        assert by_label[label].tries == 1  # permanent: the worker dead-letters it at once
    # LocalStack run without Docker serves no DynamoDB (its DynamoDB is DynamoDB Local, a
    # Java download): the demo says so and skips the bounce. Where it does serve DynamoDB,
    # the bounce is recorded and the next email to that recipient is suppressed.
    if report.skipped:
        assert "serves no DynamoDB" in report.skipped
        assert "Skipped SES's events, suppression and delivery status" in output
        assert not [label for label in by_label if label.startswith("SES")]
    else:
        assert by_label["SES (simulated): #1 bounced, permanent"].recorded
        assert by_label["COMPLETED pt-BR"].status is not None
        assert by_label["COMPLETED pt-BR"].status.status == "bounced"
        suppressed = by_label["FAILED pt-BR, to the bounced"]
        assert suppressed.in_dlq
        assert not suppressed.emails
        assert (suppressed.error or "").startswith("suppressed: addr-")
    # The demo removed the queues and the bucket it made on the shared endpoint.
    assert report.resource_name
    queues = client("sqs", localstack).list_queues(QueueNamePrefix=report.resource_name)
    assert not queues.get("QueueUrls")
    buckets = client("s3", localstack).list_buckets()["Buckets"]
    assert report.resource_name not in {b["Name"] for b in buckets}


async def test_runner_against_localstack(localstack_env: str, smtp_sink: SmtpSink) -> None:
    sqs = client("sqs", localstack_env)
    s3 = client("s3", localstack_env)
    queues = create_queues(sqs, visibility_timeout=1, max_receive_count=2, prefix="ls-runner")
    bucket = f"ls-runner-{queues.url.rsplit('-', 1)[-1]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="v1.zip", Body=make_zip(30_000, seed=7))
    good = {
        send(sqs, queues.url, notification("v1", bucket=bucket, key="v1.zip"), origin="ls"),
        send(sqs, queues.url, notification("v2", status="FAILED", locale="pt-BR")),
    }
    bad = {
        send(sqs, queues.url, "not json at all"),
        send(sqs, queues.url, notification("v3", bucket=bucket, key="missing.zip")),
    }
    seen: list[tuple[list[dict[str, Any]], BatchResult]] = []

    try:
        stats = await run_with_own_notifier(
            Settings.from_env(),
            queues.url,
            batch_size=10,
            batch_window=0.2,
            wait_time=1,
            drain=True,
            on_batch=lambda records, result: seen.append((records, result)),
        )

        assert stats.drained
        assert [m.rcpt_tos for m in smtp_sink.messages] == [["user@example.com"]] * 2
        assert stats.deleted == 2
        assert counts(sqs, queues.url) == dict.fromkeys(counts(sqs, queues.url), 0)
        dead = receive_all(sqs, queues.dlq_url)
        assert {m["MessageId"] for m in dead} == bad
        records = [r for batch, _ in seen for r in batch]
        assert {r["messageId"] for r in records} == good | bad
        for record in records:
            assert record["eventSource"] == "aws:sqs"
            assert record["eventSourceARN"] == queues.arn
            assert record["awsRegion"] == "us-east-1"
            assert int(record["attributes"]["ApproximateReceiveCount"]) >= 1
        [tagged] = [r for r in records if r["messageAttributes"]]
        assert tagged["messageAttributes"]["origin"]["stringValue"] == "ls"
        assert tagged["messageAttributes"]["origin"]["dataType"] == "String"
    finally:
        sqs.delete_queue(QueueUrl=queues.url)
        sqs.delete_queue(QueueUrl=queues.dlq_url)
        for key in ("v1.zip",):
            s3.delete_object(Bucket=bucket, Key=key)
        s3.delete_bucket(Bucket=bucket)


async def test_redrive_moves_dead_letters_with_a_message_move_task(localstack_env: str) -> None:
    """LocalStack implements StartMessageMoveTask (moto does not): `redrive` without a reason
    moves the whole dead-letter queue back to its source queue with one SQS task."""
    from async_notifier.aws.redrive import redrive, sqs_client

    localstack = localstack_env
    sqs = client("sqs", localstack)
    queues = create_queues(sqs, visibility_timeout=1, max_receive_count=3, prefix="redrive")
    sent = {
        send(sqs, queues.dlq_url, notification(f"v{i}"), error_class="expired") for i in range(5)
    }
    async with sqs_client("us-east-1", localstack) as async_sqs:
        result = await redrive(async_sqs, queues.dlq_url, poll_interval=0.5)
    assert result.ok, result
    assert result.method == "move_task"
    assert result.task is not None
    assert result.task.status == "COMPLETED"
    moved = receive_all(sqs, queues.url)
    assert len(moved) == len(sent)
    assert receive_all(sqs, queues.dlq_url) == []
