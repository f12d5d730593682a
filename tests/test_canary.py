"""`async-notifier canary` and `handler.canary_handler` against a deployment on moto.

SES's mailbox simulator has no local peer, and moto's SES publishes no events, so the
"deployment" here is driven by the test: it consumes the notification queue with
`handler.lambda_handler` (mailing an SMTP sink), and for every email the sink receives it
feeds `handler.ses_events_handler` the events SES publishes for that simulator address
(`local/ses_feed.py`: a delivery; a permanent bounce; a delivery and a complaint). The
canary knows none of this: it sends to the queue and reads the status table.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import aioboto3
import boto3
import pytest
from servers import (
    REGION,
    FakeLambdaContext,
    MotoServer,
    SmtpSink,
    log_lines,
    sqs_event,
    sqs_record,
)
from status_events import create_status_table

import handler
from async_notifier import __main__ as cli
from async_notifier.aws.tables import create_table
from async_notifier.canary import CanaryRequest
from async_notifier.local.ses_feed import (
    Outcome,
    parse_email,
    recipients,
    ses_events,
    simulator_outcome,
    sns_envelope,
)

STATUS_TABLE = "notifier-status"
SUPPRESSION_TABLE = "suppression"


class Deployment:
    """The deployed path, one step at a time: the notification queue's event source
    mapping and the worker, then SES (scripted) and the SES events function."""

    def __init__(self, endpoint_url: str, sink: SmtpSink, events: set[str] | None = None) -> None:
        self.sqs = boto3.client("sqs", endpoint_url=endpoint_url, region_name=REGION)
        self.queue_url: str = self.sqs.create_queue(QueueName="notifications")["QueueUrl"]
        self.sink = sink
        # The event types SES's configuration set publishes (all, unless a test says not).
        self.events = events or {"Delivery", "Bounce", "Complaint"}
        self.fed = 0
        self.invocations = 0

    def step(self) -> None:
        messages = self.sqs.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
        ).get("Messages", [])
        if messages:
            records = [sqs_record(m["Body"], m["MessageId"]) for m in messages]
            response = handler.lambda_handler(sqs_event(records), FakeLambdaContext())
            self.invocations += 1
            failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
            for message in messages:
                if message["MessageId"] not in failed:
                    self.sqs.delete_message(
                        QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"]
                    )
        for received in self.sink.messages[self.fed :]:
            self.fed += 1
            email = parse_email(received.data)
            outcome: Outcome | None = simulator_outcome(recipients(email)[0])
            assert outcome is not None, recipients(email)
            published = [
                sqs_record(sns_envelope(event), f"ses-{self.fed}-{n}")
                for n, event in enumerate(ses_events(email, outcome, message_id=f"ses-{self.fed}"))
                if event["eventType"] in self.events
            ]
            if published:
                response = handler.ses_events_handler(sqs_event(published), FakeLambdaContext())
                assert response == {"batchItemFailures": []}

    def serve_while(self, work: Callable[[], Any], limit: float = 60.0) -> Any:
        """Run `work` (the canary) in a thread, stepping the deployment until it returns."""
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = work()
            except BaseException as exc:  # handed to the test's thread
                outcome["error"] = exc

        thread = threading.Thread(target=target)
        thread.start()
        give_up = time.monotonic() + limit
        while thread.is_alive() and time.monotonic() < give_up:
            self.step()
            thread.join(0.05)
        thread.join(10)
        assert not thread.is_alive(), "the canary did not return"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


@pytest.fixture
def deployment(
    lambda_env: dict[str, str],
    aws: MotoServer,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> Deployment:
    async def suppression_table() -> None:
        async with aioboto3.Session().client(
            "dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION
        ) as client:
            await create_table(client, SUPPRESSION_TABLE)

    asyncio.run(suppression_table())
    create_status_table(aws.endpoint_url, STATUS_TABLE)
    monkeypatch.setenv("STATUS_TABLE", STATUS_TABLE)
    monkeypatch.setenv("SUPPRESSION_TABLE", SUPPRESSION_TABLE)
    return Deployment(aws.endpoint_url, smtp_sink)


def canary_lines(out: str) -> dict[str, list[str]]:
    """The canary's verdict lines (stdout), by probe; the worker's log lines left out."""
    lines = {}
    for line in out.splitlines():
        words = line.split()
        if words and words[0] in ("success", "bounce", "complaint"):
            lines[words[0]] = words
    return lines


def test_the_canary_passes_through_the_whole_path_and_again(
    deployment: Deployment, smtp_sink: SmtpSink, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["canary", "--queue-url", deployment.queue_url, "--timeout", "45", "--interval", "0.1"]
    assert deployment.serve_while(lambda: cli.main(argv)) == 0
    captured = capsys.readouterr()
    verdicts = canary_lines(captured.out)
    assert {kind: words[2:6] for kind, words in verdicts.items()} == {
        "success": ["delivered", "got", "delivered", "ok"],
        "bounce": ["bounced", "got", "bounced", "ok"],
        "complaint": ["complained", "got", "complained", "ok"],
    }, captured.out + captured.err
    assert "passed in" in captured.err
    sent = smtp_sink.messages
    assert len(sent) == 3
    addresses = sorted(r for m in sent for r in m.rcpt_tos)
    assert [a.split("+")[0] for a in addresses] == ["bounce", "complaint", "success"]
    assert all(a.endswith("@simulator.amazonses.com") and "+canary-" in a for a in addresses)

    # The suppression list now holds the bounced and the complaining address; the next run
    # uses addresses of its own, so it is not suppressed and passes too.
    assert deployment.serve_while(lambda: cli.main(argv)) == 0
    assert len(smtp_sink.messages) == 6
    assert set(canary_lines(capsys.readouterr().out)) == {"success", "bounce", "complaint"}


def test_the_canary_lists_what_is_missing(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    """A configuration set that does not publish complaints: the complaint probe stays
    `delivered`, and the canary says so once its time is up."""
    deployment.events = {"Delivery", "Bounce"}
    argv = ["canary", "--queue-url", deployment.queue_url, "--timeout", "3", "--interval", "0.1"]
    assert deployment.serve_while(lambda: cli.main(argv)) == 1
    captured = capsys.readouterr()
    verdicts = canary_lines(captured.out)
    assert verdicts["complaint"][2:6] == ["complained", "got", "delivered", "MISSING"]
    assert verdicts["success"][5] == verdicts["bounce"][5] == "ok"
    missing = [line for line in captured.err.splitlines() if "missing:" in line]
    assert len(missing) == 1
    assert "complaint: expected complained, got status delivered" in missing[0]
    assert "FAILED (timed out after 3 s)" in captured.err


def test_a_queue_nobody_consumes_leaves_every_status_missing(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["canary", "--queue-url", deployment.queue_url, "--timeout", "1", "--json"]
    assert cli.main(argv) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] is False
    assert summary["timed_out"] is True
    assert [p["status"] for p in summary["probes"]] == [None, None, None]
    assert len(summary["missing"]) == 3
    assert all("no status at all" in line for line in summary["missing"])


def test_the_canary_needs_the_status_table_and_a_queue(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing_queue = deployment.queue_url.rsplit("/", 1)[0] + "/no-such-queue"
    assert cli.main(["canary", "--queue-url", missing_queue, "--timeout", "1"]) == 3
    assert "could not send to the notification queue" in capsys.readouterr().err
    monkeypatch.setenv("STATUS_TABLE", "no-such-table")
    argv = ["canary", "--queue-url", deployment.queue_url, "--timeout", "30", "--interval", "0.1"]
    assert cli.main(argv) == 3  # after a few reads, not the whole timeout
    err = capsys.readouterr().err
    assert "could not read the status table" in err
    assert "ResourceNotFoundException" in err
    monkeypatch.delenv("STATUS_TABLE")
    assert cli.main(["canary", "--queue-url", deployment.queue_url]) == 2
    assert "STATUS_TABLE is required" in capsys.readouterr().err


def test_the_scheduled_entry_point(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    """`handler.canary_handler`, as the template's schedule invokes it: the summary, and
    the `CanaryFailed` metric the alarm watches."""
    event = {"queue_url": deployment.queue_url, "timeout_seconds": 45}
    context = FakeLambdaContext(remaining_ms=60_000)
    summary = deployment.serve_while(lambda: handler.canary_handler(event, context))
    assert summary["ok"] is True, summary
    assert [p["status"] for p in summary["probes"]] == ["delivered", "bounced", "complained"]
    [metrics] = [e for e in log_lines(capsys.readouterr().out) if "CanaryFailed" in e]
    assert (metrics["CanaryFailed"], metrics["CanaryMissing"]) == (0, 0)
    assert metrics["FunctionName"] == context.function_name

    deployment.events = {"Delivery"}  # no bounce, no complaint
    event["timeout_seconds"] = 2
    summary = deployment.serve_while(lambda: handler.canary_handler(event, context))
    assert summary["ok"] is False
    [metrics] = [e for e in log_lines(capsys.readouterr().out) if "CanaryFailed" in e]
    assert (metrics["CanaryFailed"], metrics["CanaryMissing"]) == (1, 2)


def test_the_scheduled_event_is_checked_and_bounded_by_the_invocation() -> None:
    request = CanaryRequest.from_event({"queue_url": "https://sqs/1/q"}, remaining_seconds=100)
    assert request.timeout == 100 - CanaryRequest.REPORT_MARGIN
    request = CanaryRequest.from_event(
        {"queue_url": "https://sqs/1/q", "timeout_seconds": 30, "zip": "s3://b/k.zip"}, 900
    )
    assert (request.timeout, request.zip_location) == (30, ("b", "k.zip"))
    for bad, why in (
        ({}, "needs queue_url"),
        ({"queue_url": "q"}, "needs queue_url"),
        ({"queue_url": "https://sqs/1/q", "timeout_seconds": 0}, "more than 0"),
    ):
        with pytest.raises(ValueError, match=why):
            CanaryRequest.from_event(bad, None)
