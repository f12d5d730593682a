"""The SQS runner against a real (moto) queue with a dead-letter queue, and a real SMTP sink.

It must do what Lambda's event source mapping does: hand the batch code records shaped like
Lambda's, delete what succeeded, leave failures to come back until the redrive policy moves
them to the DLQ, and stop cleanly on a signal.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faults import FaultySmtp, SmtpFaults
from queues import (
    LAMBDA_RECORD_KEYS,
    Competitor,
    Queues,
    SqsRecorder,
    client,
    counts,
    create_queues,
    notification,
    receive_all,
    run_with_own_notifier,
    send,
)
from servers import MotoServer, SmtpSink, make_zip, s3_client, seed_objects, sqs_record

from async_notifier.batch.notifier import Notifier
from async_notifier.batch.outcome import BatchResult
from async_notifier.config import Settings
from async_notifier.deadline import Deadline
from async_notifier.runner import HEARTBEAT_TASK_NAME, MIN_EXTENSION
from async_notifier.wiring import AwsBackend

ROOT = Path(__file__).resolve().parent.parent
LAMBDA_KEYS = {"cold_start", "function_name", "function_memory_size", "xray_trace_id"}
TRACE_HEADER = "Root=1-67891233-abcdef012345678912345678;Parent=53995c3f42cd8ad8;Sampled=1"


@pytest.fixture
def sqs(aws: MotoServer) -> Any:
    return client("sqs", aws.endpoint_url)


@pytest.fixture
def queues(sqs: Any) -> Queues:
    return create_queues(sqs, visibility_timeout=1, max_receive_count=2)


@pytest.fixture
def recorder(aws: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[SqsRecorder]:
    """The worker's AWS calls go through a recorder: the test sees its SQS calls on the wire."""
    with SqsRecorder(aws.endpoint_url) as sqs_recorder:
        monkeypatch.setenv("AWS_ENDPOINT_URL", sqs_recorder.endpoint_url)
        yield sqs_recorder


class Batches:
    """The on_batch hook: every record and result the batch code saw, in order, and when the
    runner was done with each batch (its deletes included)."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[dict[str, Any]], BatchResult]] = []
        self.ended: list[float] = []  # monotonic
        self.ended_ms: list[int] = []  # wall clock, SQS's ApproximateFirstReceiveTimestamp unit
        self.heartbeats_alive: list[int] = []

    def __call__(self, records: list[dict[str, Any]], result: BatchResult) -> None:
        self.seen.append((records, result))
        self.ended.append(time.monotonic())
        self.ended_ms.append(math.floor(time.time() * 1000))
        self.heartbeats_alive.append(
            sum(1 for t in asyncio.all_tasks() if t.get_name() == HEARTBEAT_TASK_NAME)
        )

    def records(self, message_id: str) -> list[dict[str, Any]]:
        return [r for records, _ in self.seen for r in records if r["messageId"] == message_id]

    def ids(self, index: int) -> set[str]:
        return {r["messageId"] for r in self.seen[index][0]}


@dataclass(frozen=True)
class Span:
    """One call of Notifier.process: when (monotonic) and with which deadline."""

    started: float
    ended: float
    deadline: Deadline | None


class TimedNotifier(Notifier):
    """The real notifier, noting when each batch was processed: a receive or a heartbeat call
    can then be placed inside or outside a batch."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, AwsBackend(settings))
        self.spans: list[Span] = []

    async def process(
        self,
        records: list[Any],
        *,
        deadline: Deadline | None = None,
        function_name: str | None = None,
    ) -> BatchResult:
        started = time.monotonic()
        try:
            return await super().process(records, deadline=deadline, function_name=function_name)
        finally:
            self.spans.append(Span(started, time.monotonic(), deadline))


def _emails(sqs: Any, url: str, count: int, prefix: str = "u") -> dict[str, str]:
    """`count` FAILED-status notifications (no ZIP to fetch): messageId -> recipient."""
    sent = {}
    for i in range(count):
        address = f"{prefix}{i}@example.com"
        sent[send(sqs, url, notification(f"{prefix}{i}", status="FAILED", email=address))] = address
    return sent


def _wait_until_received(sqs: Any, url: str, timeout: float = 30.0) -> None:
    """Block until something has received a message of `url` (it is hidden)."""
    deadline = time.monotonic() + timeout
    while counts(sqs, url)["ApproximateNumberOfMessagesNotVisible"] == 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing received from the queue within {timeout}s")
        time.sleep(0.05)


def _assert_each_emailed_once_and_deleted(
    sink: SmtpSink, sqs: Any, queues: Queues, emails: dict[str, str]
) -> None:
    """The end state every scenario must reach: one email per message, an empty queue and
    an empty dead-letter queue."""
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted(emails.values())
    assert counts(sqs, queues.url) == dict.fromkeys(counts(sqs, queues.url), 0)
    assert receive_all(sqs, queues.dlq_url) == []


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

    stats = await run_with_own_notifier(
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

    await run_with_own_notifier(
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

    stats = await run_with_own_notifier(
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

    stats = await run_with_own_notifier(
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


async def test_heartbeat_keeps_a_batch_longer_than_the_visibility_timeout_hidden(
    runner_env: dict[str, str],
    aws: MotoServer,
    recorder: SqsRecorder,
    smtp_sink: SmtpSink,
    sqs: Any,
) -> None:
    queues = create_queues(sqs, visibility_timeout=2, max_receive_count=5)
    emails = _emails(sqs, queues.url, 8)
    # Four SMTP connections, eight emails of 3 s each: the batch takes about 6 s, three
    # visibility timeouts.
    smtp_sink.verdict_delay = 3.0
    notifier = TimedNotifier(Settings.from_env())
    batches = Batches()
    runner = asyncio.create_task(
        run_with_own_notifier(
            Settings.from_env(),
            queues.url,
            batch_size=10,
            batch_window=0.5,
            wait_time=1,
            max_batches=1,
            on_batch=batches,
            notifier=notifier,
        )
    )
    try:
        await asyncio.to_thread(smtp_sink.wait_for, 1, 30)  # the batch is being processed
        # Another consumer polls all along: it must never see one of the batch's messages.
        with Competitor(aws.endpoint_url, queues.url) as competitor:
            async with asyncio.timeout(60):
                stats = await runner
    finally:
        runner.cancel()
        await notifier.aclose()

    assert competitor.polls >= 1
    assert competitor.received == []
    [(records, result)] = batches.seen
    assert {r["messageId"] for r in records} == set(emails)
    assert [r["attributes"]["ApproximateReceiveCount"] for r in records] == ["1"] * 8
    assert result.failures == []
    assert stats.deleted == 8
    assert stats.delete_failed == 0
    _assert_each_emailed_once_and_deleted(smtp_sink, sqs, queues, emails)
    # On the wire: several beats within the batch, each resetting every message's visibility.
    [span] = notifier.spans
    beats = recorder.calls("ChangeMessageVisibilityBatch")
    assert len(beats) >= 3
    handles = {r["receiptHandle"] for r in records}
    for beat in beats:
        assert span.started <= beat.started <= span.ended
        entries = beat.request["Entries"]
        assert {e["ReceiptHandle"] for e in entries} == handles
        assert {e["VisibilityTimeout"] for e in entries} == {max(2, MIN_EXTENSION)}
    # Each beat on the wire is booked once, for all eight messages. A beat gives up after
    # half its period (0.5 s here), and on a loaded machine moto can be slower than that
    # once: the server still extends, the runner books the beat's eight as failed, and the
    # next beat (the extension is 3 s, the period 1 s) covers it. The messages stayed hidden
    # all along (asserted above). One such beat at most; every other one extended all eight.
    assert stats.extend_failed in (0, 8)
    assert stats.extended == 8 * len(beats) - stats.extend_failed
    assert stats.extended >= 8 * 3


async def test_batch_deadline_cuts_a_stalled_batch_and_its_records_come_back(
    runner_env: dict[str, str],
    faulty_smtp: FaultySmtp,
    sqs: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SMTP_SERVER", faulty_smtp.host)
    monkeypatch.setenv("SMTP_PORT", str(faulty_smtp.port))
    monkeypatch.setenv("DEADLINE_MARGIN_SECONDS", "1")
    faulty_smtp.faults = SmtpFaults(stall_seconds=math.inf)  # no reply to DATA, ever
    queues = create_queues(sqs, visibility_timeout=2, max_receive_count=3)
    emails = _emails(sqs, queues.url, 3)
    notifier = TimedNotifier(Settings.from_env())
    batches = Batches()

    def on_batch(records: list[dict[str, Any]], result: BatchResult) -> None:
        batches(records, result)
        faulty_smtp.faults = SmtpFaults()  # the server recovers after the first batch

    try:
        async with asyncio.timeout(60):  # nothing may hang on the stalled server
            stats = await run_with_own_notifier(
                Settings.from_env(),
                queues.url,
                batch_size=10,
                batch_window=0.2,
                wait_time=1,
                batch_timeout=4,
                drain=True,
                on_batch=on_batch,
                notifier=notifier,
            )
    finally:
        await notifier.aclose()

    # The first batch was cut at its cutoff: every record failed for the deadline...
    first_records, first_result = batches.seen[0]
    assert {r["messageId"] for r in first_records} == set(emails)
    assert sorted(o.message_id for o in first_result.failures) == sorted(emails)
    assert {o.error.kind for o in first_result.failures if o.error} == {"deadline"}
    # ...by its own deadline, made for the batch's 4 s, not by the runner's last resort (a
    # cancellation a grace period after the deadline's end, which would count as overran).
    first = notifier.spans[0]
    assert first.deadline is not None
    assert first.deadline.end <= first.started + 4
    assert stats.overran == 0
    # ...and every record came back once, to be emailed and deleted.
    for message_id in emails:
        assert [
            r["attributes"]["ApproximateReceiveCount"] for r in batches.records(message_id)
        ] == [
            "1",
            "2",
        ]
    assert all(result.failures == [] for _, result in batches.seen[1:])
    assert stats.deleted == 3
    assert stats.drained
    _assert_each_emailed_once_and_deleted(faulty_smtp, sqs, queues, emails)


async def test_messages_arriving_during_a_batch_are_not_received_until_it_ends(
    runner_env: dict[str, str],
    recorder: SqsRecorder,
    smtp_sink: SmtpSink,
    sqs: Any,
) -> None:
    queues = create_queues(sqs, visibility_timeout=30, max_receive_count=2)
    smtp_sink.verdict_delay = 2.0
    emails = _emails(sqs, queues.url, 1, prefix="a")
    notifier = TimedNotifier(Settings.from_env())
    batches = Batches()
    # Room for 30 (three receives' worth), a 2 s window, long polls of 20 s.
    runner = asyncio.create_task(
        run_with_own_notifier(
            Settings.from_env(),
            queues.url,
            batch_size=30,
            batch_window=2.0,
            max_batches=2,
            on_batch=batches,
            notifier=notifier,
        )
    )
    try:
        async with asyncio.timeout(60):
            await asyncio.to_thread(_wait_until_received, sqs, queues.url)
            # The window is open: this one joins the first batch.
            emails |= _emails(sqs, queues.url, 1, prefix="b")
            await asyncio.to_thread(smtp_sink.wait_for, 1, 30)
            # The first batch is being processed: this one waits in the queue for the next.
            late = _emails(sqs, queues.url, 1, prefix="c")
            emails |= late
            stats = await runner
    finally:
        runner.cancel()
        await notifier.aclose()

    assert len(batches.seen) == 2
    assert batches.ids(1) == set(late)
    assert batches.ids(0) == set(emails) - set(late)
    # Not received (hidden, with nobody working on it) while the first batch ran, but after.
    [late_record] = batches.seen[1][0]
    assert int(late_record["attributes"]["ApproximateFirstReceiveTimestamp"]) >= batches.ended_ms[0]
    # On the wire: no receive was in flight while a batch was being processed; the first
    # batch came from receives before it, the second from receives between the two.
    receives = recorder.calls("ReceiveMessage")
    first, second = notifier.spans
    for span in (first, second):
        assert [c for c in receives if c.started < span.ended and c.answered > span.started] == []
    assert [c for c in receives if c.answered <= first.started]
    assert [c for c in receives if first.ended <= c.started and c.answered <= second.started]
    assert stats.deleted == 3
    _assert_each_emailed_once_and_deleted(smtp_sink, sqs, queues, emails)


async def test_heartbeat_stops_when_its_batch_ends(
    runner_env: dict[str, str],
    recorder: SqsRecorder,
    smtp_sink: SmtpSink,
    sqs: Any,
) -> None:
    queues = create_queues(sqs, visibility_timeout=2, max_receive_count=2)
    smtp_sink.verdict_delay = 3.0
    emails = _emails(sqs, queues.url, 1)
    bad = send(sqs, queues.url, "{not json")  # fails in each batch, and is never extended after
    notifier = TimedNotifier(Settings.from_env())
    batches = Batches()

    try:
        async with asyncio.timeout(60):
            stats = await run_with_own_notifier(
                Settings.from_env(),
                queues.url,
                batch_size=10,
                batch_window=0.2,
                wait_time=1,
                max_batches=2,
                on_batch=batches,
                notifier=notifier,
            )
    finally:
        await notifier.aclose()

    # The first batch ran about 3 s and its heartbeat beat; the failed message then came back
    # within a visibility timeout of the last beat: nothing kept it hidden after its batch.
    assert batches.ids(0) == {*emails, bad}
    assert batches.ids(1) == {bad}
    assert [r["attributes"]["ApproximateReceiveCount"] for r in batches.records(bad)] == ["1", "2"]
    beats = recorder.calls("ChangeMessageVisibilityBatch")
    first, _ = notifier.spans
    assert [b for b in beats if first.started <= b.started <= first.ended]
    # Every extension call started while a batch was being processed, none after.
    for beat in beats:
        assert any(span.started <= beat.started <= span.ended for span in notifier.spans)
        assert all(e["VisibilityTimeout"] > 0 for e in beat.request["Entries"])
    # And no heartbeat task outlived its batch, nor any task the run.
    assert batches.heartbeats_alive == [0, 0]
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    assert stats.deleted == 1
    assert sorted(m.rcpt_tos[0] for m in smtp_sink.messages) == sorted(emails.values())
    assert sum(counts(sqs, queues.url).values()) == 1  # the bad one, on its way to the DLQ


async def test_stop_during_a_batch_finishes_it_and_receives_nothing_more(
    runner_env: dict[str, str], recorder: SqsRecorder, smtp_sink: SmtpSink, sqs: Any
) -> None:
    queues = create_queues(sqs, visibility_timeout=2, max_receive_count=2)
    smtp_sink.verdict_delay = 2.0
    emails = _emails(sqs, queues.url, 2)
    stop = asyncio.Event()
    notifier = TimedNotifier(Settings.from_env())
    runner = asyncio.create_task(
        run_with_own_notifier(
            Settings.from_env(),
            queues.url,
            batch_size=10,
            batch_window=0.2,
            wait_time=1,
            stop=stop,
            notifier=notifier,
        )
    )
    try:
        async with asyncio.timeout(60):
            await asyncio.to_thread(smtp_sink.wait_for, 1, 30)
            stop.set()
            later = _emails(sqs, queues.url, 3, prefix="later")
            stats = await runner
    finally:
        runner.cancel()
        await notifier.aclose()

    assert stats.batches == 1
    assert stats.deleted == 2
    assert stats.released == 0  # nothing was received beyond the batch
    assert sorted(m.rcpt_tos[0] for m in smtp_sink.messages) == sorted(emails.values())
    assert counts(sqs, queues.url)["ApproximateNumberOfMessages"] == len(later)
    [span] = notifier.spans
    assert [c for c in recorder.calls("ReceiveMessage") if c.answered > span.started] == []
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_cancelled_run_leaves_no_task_behind(
    runner_env: dict[str, str], recorder: SqsRecorder, smtp_sink: SmtpSink, sqs: Any
) -> None:
    """A second Ctrl-C cancels the run mid-batch: the heartbeat goes with it."""
    queues = create_queues(sqs, visibility_timeout=2, max_receive_count=2)
    smtp_sink.verdict_delay = 5.0
    _emails(sqs, queues.url, 2)
    notifier = TimedNotifier(Settings.from_env())
    runner = asyncio.create_task(
        run_with_own_notifier(
            Settings.from_env(),
            queues.url,
            batch_size=10,
            batch_window=0.2,
            wait_time=1,
            notifier=notifier,
        )
    )
    try:
        async with asyncio.timeout(60):
            await asyncio.to_thread(smtp_sink.wait_for, 1, 30)
            await asyncio.to_thread(recorder.wait_for, "ChangeMessageVisibilityBatch")
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await runner
    finally:
        runner.cancel()
        await notifier.aclose()
    cancelled_at = time.monotonic()

    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    await asyncio.sleep(2.0)  # two heartbeat periods
    assert [
        c for c in recorder.calls("ChangeMessageVisibilityBatch") if c.started > cancelled_at
    ] == []
    # Neither deleted nor emailed for sure: both are still in the queue, to be sent again.
    assert sum(counts(sqs, queues.url).values()) == 2


class DeadlineDeaf(TimedNotifier):
    """A notifier that ignores the deadline it is given: only the runner can stop it."""

    async def process(
        self,
        records: list[Any],
        *,
        deadline: Deadline | None = None,
        function_name: str | None = None,
    ) -> BatchResult:
        return await super().process(records, function_name=function_name)


async def test_a_batch_that_ignores_its_deadline_is_cancelled_and_retried_whole(
    runner_env: dict[str, str],
    faulty_smtp: FaultySmtp,
    sqs: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SMTP_SERVER", faulty_smtp.host)
    monkeypatch.setenv("SMTP_PORT", str(faulty_smtp.port))
    monkeypatch.setenv("DEADLINE_MARGIN_SECONDS", "1")
    faulty_smtp.faults = SmtpFaults(stall_seconds=math.inf)
    queues = create_queues(sqs, visibility_timeout=2, max_receive_count=3)
    emails = _emails(sqs, queues.url, 2)
    notifier = DeadlineDeaf(Settings.from_env())
    batches = Batches()
    try:
        async with asyncio.timeout(60):
            stats = await run_with_own_notifier(
                Settings.from_env(),
                queues.url,
                batch_size=10,
                batch_window=0.2,
                wait_time=1,
                batch_timeout=3,
                max_batches=1,
                on_batch=batches,
                notifier=notifier,
            )
    finally:
        await notifier.aclose()

    # Like Lambda killing an invocation at its timeout: the whole batch is retried.
    assert stats.overran == 1
    [(records, result)] = batches.seen
    assert {r["messageId"] for r in records} == set(emails)
    assert sorted(o.message_id for o in result.failures) == sorted(emails)
    [span] = notifier.spans
    assert span.deadline is None  # it really had none to respect
    assert stats.deleted == 0
    assert faulty_smtp.messages == []
    assert sum(counts(sqs, queues.url).values()) == 2
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


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
            "run",
            "--queue-url",
            queues.url,
            "--drain",
            "--wait-time",
            "1",
            "--batch-window",
            "0",
            "--batch-timeout",
            "60",
            "--fleet-size",
            "4",
        ),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        # A trace variable in the environment (an X-Ray-instrumented host) does not make
        # the runner's batches Lambda invocations.
        env={**os.environ, "SMTP_RATE_LIMIT": "100", "_X_AMZN_TRACE_ID": TRACE_HEADER},
        check=False,
    )

    assert done.returncode == 0, done.stderr + done.stdout
    logs = _log_lines(done.stdout)
    # Lambda's keys (and its ColdStart metric) are the handler's alone.
    assert [line for line in logs if LAMBDA_KEYS & set(line) or "ColdStart" in line] == []
    assert any(line.get("message") == "batch done" for line in logs)
    [started] = [line for line in logs if line.get("message") == "runner started"]
    assert started["batch_timeout"] == 60
    assert started["visibility_timeout"] == 1
    # The account's 100/s shared by the four runners --fleet-size says there are.
    assert started["fleet_size"] == 4
    assert started["send_rate"] == 25
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


def test_cli_refuses_a_batch_timeout_of_zero() -> None:
    done = subprocess.run(
        _cli("run", "--queue-url", "http://127.0.0.1:1/000000000000/none", "--batch-timeout", "0"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2
    assert "--batch-timeout: must be a number of seconds, more than 0" in done.stderr


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
