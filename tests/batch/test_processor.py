"""The batch processor with both entry points' handlers, on real peers (aiosmtpd, moto),
and with handlers of the test's own where what is under test is the processor's part: the
cutoff as each record's cancel scope, the work after it, a cancellation from outside.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import boto3
import pytest
from servers import REGION, MotoServer, SmtpSink, sqs_record

from async_notifier import wiring
from async_notifier.batch import notifier
from async_notifier.batch.outcome import Action, BatchResult, Outcome
from async_notifier.batch.processor import RecordHandler, RecordWork
from async_notifier.config import Settings
from async_notifier.deadline import Deadline
from async_notifier.errors import DeadlineExceeded, NotifierError
from async_notifier.messages import SqsRecord
from async_notifier.ports import Adapters, PoolStats

TABLE = "suppression"


def failed(video_id: str, to: str) -> dict[str, Any]:
    return {"video_id": video_id, "status": "FAILED", "email": to, "message": "decoder error"}


def hard_bounce(address: str) -> dict[str, Any]:
    """An SES bounce as configuration-set event publishing writes it (trimmed)."""
    return {
        "eventType": "Bounce",
        "mail": {
            "timestamp": "2026-12-05T10:00:00.000Z",
            "source": "no-reply@example.com",
            "messageId": "0100018c1c2d3e4f-abcdefab-000000",
            "destination": [address],
        },
        "bounce": {
            "feedbackId": "0100018c-bounce",
            "bounceType": "Permanent",
            "bounceSubType": "General",
            "bouncedRecipients": [{"emailAddress": address, "status": "5.1.1"}],
            "timestamp": "2026-12-05T10:00:01.000Z",
        },
    }


class Spy:
    """A real handler, with the records it was asked to start written down."""

    def __init__(self, handler: RecordHandler) -> None:
        self.handler = handler
        self.started: list[str] = []

    async def prepare(self, records: Sequence[SqsRecord]) -> None:
        await self.handler.prepare(records)

    def start(self, record: SqsRecord) -> RecordWork:
        self.started.append(record.message_id)
        return self.handler.start(record)

    def close(self) -> None:
        self.handler.close()

    def report(
        self, result: BatchResult, *, duration_s: float, pool: PoolStats, function_name: str | None
    ) -> None:
        self.handler.report(result, duration_s=duration_s, pool=pool, function_name=function_name)


# --------------------------------------------------------------------------- the notifier


async def test_the_notifier_parses_each_body_once_and_a_bad_record_never_reaches_it(
    worker_env: dict[str, str], smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[str] = []
    real_parse = notifier.parse_body

    def parse_body(body: str) -> Any:
        parsed.append(body)
        return real_parse(body)

    monkeypatch.setattr(notifier, "parse_body", parse_body)
    records = [
        sqs_record(failed("v1", "one@example.com"), "m1"),
        sqs_record("{not json", "bad-json"),
        {"messageId": "no-body", "attributes": {}},  # not an SQS record
        sqs_record(failed("v2", "two@example.com"), "m2"),
    ]
    worker = wiring.build_notifier(Settings.from_env())
    spies: list[Spy] = []

    def handler_for(adapters: Adapters, deadline: Deadline | None) -> Spy:
        spies.append(Spy(worker.handler(adapters, deadline)))
        return spies[-1]

    try:
        result = await worker.processor.process(records, handler_for)
    finally:
        await worker.aclose()

    assert len(parsed) == 3  # the three SQS records' bodies, once each
    [spy] = spies
    assert spy.started == ["m1", "bad-json", "m2"]
    assert sorted(str(m["X-Video-Id"]) for m in smtp_sink.parsed()) == ["v1", "v2"]
    assert [(o.message_id, o.error and o.error.kind) for o in result.errors] == [
        ("bad-json", "bad_message"),
        ("no-body", "bad_message"),
    ]
    bad_json, no_body = result.errors
    assert bad_json.record is not None  # a dead letter can copy it
    assert no_body.record is None
    assert result.response() == {
        "batchItemFailures": [{"itemIdentifier": "bad-json"}, {"itemIdentifier": "no-body"}]
    }


async def test_on_a_fifo_queue_a_record_that_is_not_one_blocks_the_rest_of_its_group(
    worker_env: dict[str, str], smtp_sink: SmtpSink
) -> None:
    arn = "arn:aws:sqs:us-east-1:123456789012:notifications.fifo"

    def grouped(raw: dict[str, Any], group: str) -> dict[str, Any]:
        raw["eventSourceARN"] = arn
        raw["attributes"]["MessageGroupId"] = group
        return raw

    records = [
        grouped(sqs_record(failed("a1", "a@example.com"), "a1", queue_arn=arn), "a"),
        grouped({"messageId": "b1", "attributes": {}}, "b"),
        grouped(sqs_record(failed("a2", "a@example.com"), "a2", queue_arn=arn), "a"),
        grouped(sqs_record(failed("b2", "b@example.com"), "b2", queue_arn=arn), "b"),
    ]
    worker = wiring.build_notifier(Settings.from_env())
    try:
        result = await worker.process(records)
    finally:
        await worker.aclose()

    assert sorted(str(m["X-Video-Id"]) for m in smtp_sink.parsed()) == ["a1", "a2"]
    assert [(o.message_id, o.error and o.error.kind) for o in result.errors] == [
        ("b1", "bad_message"),
        ("b2", "fifo_group_blocked"),
    ]


# --------------------------------------------------------------------------- SES events


@pytest.fixture
def ses_settings(aws: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Settings:
    boto3.client("dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION).create_table(
        TableName=TABLE,
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    monkeypatch.setenv("SUPPRESSION_TABLE", TABLE)
    monkeypatch.setenv("RETRY_BACKOFF", "false")
    return Settings.from_env(sending=False)


async def test_the_ses_events_handler_records_each_event_and_fails_only_the_foreign(
    ses_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder = wiring.build_ses_recorder(ses_settings)
    records = [
        sqs_record(json.dumps(hard_bounce("hard@example.com")), "bounce"),
        sqs_record("not an SES notification", "foreign"),
    ]
    try:
        result = await recorder.process(records)
        store = wiring.SesEventsBackend(ses_settings)
        adapters = await store.open(connections=0)
        try:
            found = await adapters.suppression.suppressed({"hard@example.com"})
        finally:
            await store.aclose()
    finally:
        await recorder.aclose()

    assert found == {"hard@example.com": "bounce:Permanent:General"}
    assert [(o.message_id, o.error and o.error.kind) for o in result.errors] == [
        ("foreign", "bad_message")
    ]
    assert result.delivered.actions == {"recorded": 1}
    metrics = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line
    ]
    assert [(m["SesEventsReceived"], m["HardBounces"], m["SesEventsFailed"]) for m in metrics] == [
        (2, 1, 1)
    ]


# --------------------------------------------------------------------------- the cutoff


class Stuck:
    """A record's work that waits until it is cancelled; what follows it is written down."""

    def __init__(self, handler: StuckHandler, record: SqsRecord) -> None:
        self.handler = handler
        self.record = record

    async def run(self) -> Action:
        self.handler.running.add(self.record.message_id)
        await anyio.Event().wait()  # never set: only a cancellation ends it
        raise AssertionError("not reached")

    async def finish(self, error: NotifierError | None) -> None:
        await anyio.lowlevel.checkpoint()  # an await after the cutoff: shielded, so it runs
        self.handler.finished[self.record.message_id] = error

    def annotate(self, outcome: Outcome) -> None:
        outcome.video_id = f"video-of-{self.record.message_id}"


class StuckHandler:
    def __init__(self) -> None:
        self.running: set[str] = set()
        self.finished: dict[str, NotifierError | None] = {}
        self.closed = False
        self.reported: list[BatchResult] = []

    async def prepare(self, records: Sequence[SqsRecord]) -> None:
        pass

    def start(self, record: SqsRecord) -> Stuck:
        return Stuck(self, record)

    def close(self) -> None:
        self.closed = True

    def report(
        self, result: BatchResult, *, duration_s: float, pool: PoolStats, function_name: str | None
    ) -> None:
        self.reported.append(result)


def other_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


async def test_records_still_running_at_the_cutoff_are_cancelled_and_say_so(
    ses_settings: Settings,
) -> None:
    """Two workers, three records: two run until the cutoff cancels them, the third never
    starts; what follows each record runs after the cutoff all the same."""
    recorder = wiring.build_ses_recorder(ses_settings)
    recorder.processor.concurrency = 2
    handler = StuckHandler()
    records = [sqs_record("{}", f"m{n}") for n in range(3)]
    try:
        await recorder.prepare()  # the clients made: the records start at once
        result = await recorder.processor.process(
            records, lambda a, d: handler, deadline=Deadline.after(1.0, grace=2.0)
        )
    finally:
        await recorder.aclose()

    assert handler.running == {"m0", "m1"}
    reasons = {o.message_id: (o.error and o.error.reason) for o in result.errors}
    assert reasons == {
        "m0": "cancelled: the invocation ran out of time",
        "m1": "cancelled: the invocation ran out of time",
        "m2": "not started: the invocation ran out of time",
    }
    assert all(isinstance(o.error, DeadlineExceeded) for o in result.errors)
    assert [o.video_id for o in result.errors] == ["video-of-m0", "video-of-m1", "video-of-m2"]
    assert handler.finished == {o.message_id: o.error for o in result.errors}
    assert handler.closed
    assert handler.reported == [result]
    assert len(result.fates) == 3  # settled
    assert other_tasks() == []


@pytest.mark.parametrize("outside", ["asyncio.timeout", "anyio.move_on_after"])
async def test_a_batch_cancelled_from_outside_finishes_its_records_and_leaves_no_task(
    outside: str, ses_settings: Settings
) -> None:
    """The SQS runner's kill (asyncio.timeout) or an anyio scope around the batch: each
    running record's follow-up still runs (shielded), and no task outlives the batch."""
    recorder = wiring.build_ses_recorder(ses_settings)
    handler = StuckHandler()
    records = [sqs_record("{}", f"m{n}") for n in range(3)]
    try:
        await recorder.prepare()
        if outside == "asyncio.timeout":
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    await recorder.processor.process(records, lambda a, d: handler)
        else:
            with anyio.move_on_after(1.0) as scope:
                await recorder.processor.process(records, lambda a, d: handler)
            assert scope.cancelled_caught
    finally:
        await recorder.aclose()

    assert handler.running == {"m0", "m1", "m2"}
    assert {mid: error and error.reason for mid, error in handler.finished.items()} == {
        "m0": "cancelled",
        "m1": "cancelled",
        "m2": "cancelled",
    }
    assert handler.closed
    assert handler.reported == []  # no result to report: the whole batch fails
    assert other_tasks() == []
