"""`async-notifier redrive` against moto: dead letters routed by the worker's own
`DeadLetterRouter`, or moved by SQS's redrive policy, brought back.

moto 5.2.5 has no StartMessageMoveTask, so "redrive all" takes the copy path there (the
fallback is part of what is tested). The move-task path is tested against `FakeMoveTasks`,
the one fake here: no local peer implements message move tasks (LocalStack does, and needs
to be running).
"""

from __future__ import annotations

import io
import json
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from faults import S3Action, S3FaultProxy, S3Rule
from queues import Queues, arn_of, client, counts, create_queues, delete_queues, receive_all
from servers import REGION, MotoServer

from async_notifier import __main__ as cli
from async_notifier.aws.redrive import (
    MAX_MOVE_RATE,
    MAX_RECEIVE_COUNT,
    REDRIVEN_FROM,
    Progress,
    RedriveError,
    RedriveResult,
    parse_reasons,
    redrive,
    run_move_task,
    sqs_client,
)
from async_notifier.aws.sqs import DeadLetterRouter
from async_notifier.errors import BadMessage, NotifierError, PermanentError, SmtpThrottled
from async_notifier.messages import SqsRecord


class Expired(PermanentError):
    """The router writes whatever kind an error has: `expired` is MAX_DELIVERY_AGE's."""

    kind = "expired"


# What the DLQ holds in most tests: three expired, two throttled, one bad message (all
# routed by the worker), and one the redrive policy moved (no attributes of ours).
ROUTED: list[tuple[str, NotifierError]] = [
    ("v1", Expired("older than MAX_DELIVERY_AGE")),
    ("v2", Expired("older than MAX_DELIVERY_AGE")),
    ("v3", Expired("older than MAX_DELIVERY_AGE")),
    ("v4", SmtpThrottled("454 daily quota exhausted")),
    ("v5", SmtpThrottled("454 daily quota exhausted")),
    ("v6", BadMessage("no video_id")),
]
ALL_REASONS = Counter({"expired": 3, "smtp_throttled": 2, "bad_message": 1, MAX_RECEIVE_COUNT: 1})


@pytest.fixture
def sqs_sync(aws: MotoServer) -> Any:
    return client("sqs", aws.endpoint_url)


@pytest.fixture
async def sqs(aws: MotoServer) -> AsyncIterator[Any]:
    """The command's own client (its retries and time limits)."""
    async with sqs_client(REGION, aws.endpoint_url) as async_client:
        yield async_client


@pytest.fixture
def pair(sqs_sync: Any) -> Iterator[Queues]:
    """A notification queue whose redrive policy names its DLQ."""
    queues = create_queues(sqs_sync, visibility_timeout=30, prefix="redrive")
    try:
        yield queues
    finally:
        delete_queues(sqs_sync, queues)


def _body(video_id: str) -> str:
    return json.dumps({"video_id": video_id, "status": "COMPLETED", "locale": "en"})


def _record(video_id: str, source_arn: str, group: str | None = None) -> SqsRecord:
    attributes = {"ApproximateReceiveCount": "3"}
    if group is not None:
        attributes["MessageGroupId"] = group
    return SqsRecord.from_event(
        {
            "messageId": f"id-{video_id}",
            "receiptHandle": "handle",
            "body": _body(video_id),
            "attributes": attributes,
            "eventSource": "aws:sqs",
            "eventSourceARN": source_arn,
        }
    )


async def _fill(sqs: Any, sqs_sync: Any, queues: Queues) -> None:
    """The DLQ of ROUTED, routed by the worker's router, plus one the redrive policy moved
    (here: sent with an attribute of the producer's, a binary one)."""
    router = DeadLetterRouter(sqs, queues.dlq_url)
    items = [(_record(video, queues.arn), error) for video, error in ROUTED]
    assert await router.route(items) == {record.message_id for record, _ in items}
    sqs_sync.send_message(
        QueueUrl=queues.dlq_url,
        MessageBody=_body("v7"),
        MessageAttributes={"trace": {"DataType": "Binary", "BinaryValue": b"\x00\x01"}},
    )


def _video(message: dict[str, Any]) -> str:
    video: str = json.loads(message["Body"])["video_id"]
    return video


def _strings(message: dict[str, Any]) -> dict[str, str]:
    return {
        name: value.get("StringValue", value.get("BinaryValue"))
        for name, value in message.get("MessageAttributes", {}).items()
    }


def _empty(sqs_sync: Any, url: str) -> bool:
    attributes = sqs_sync.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return attributes == {
        "ApproximateNumberOfMessages": "0",
        "ApproximateNumberOfMessagesNotVisible": "0",
    }


# --------------------------------------------------------------------------- the copy path


async def test_redrive_all_falls_back_to_copying_on_moto(
    sqs: Any, sqs_sync: Any, pair: Queues
) -> None:
    await _fill(sqs, sqs_sync, pair)
    before = {_video(m): m for m in receive_all(sqs_sync, pair.dlq_url)}
    sqs_sync.change_message_visibility_batch(
        QueueUrl=pair.dlq_url,
        Entries=[
            {"Id": f"m{i}", "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
            for i, m in enumerate(before.values())
        ],
    )
    notices: list[str] = []
    progress: list[Progress] = []

    result = await redrive(
        sqs, pair.dlq_url, on_notice=notices.append, on_progress=progress.append, wait_time=0
    )

    assert result.method == "copy"
    assert result.fallback is not None
    assert "StartMessageMoveTask" in result.fallback
    assert any("copying" in notice for notice in notices)
    assert result.destination_url == pair.url  # the DLQ's source queue
    assert result.moved == ALL_REASONS
    assert (result.left, result.failed, result.not_deleted) == (Counter(), Counter(), [])
    assert result.ok
    assert progress[-1].moved == 7
    moved = {_video(m): m for m in receive_all(sqs_sync, pair.url)}
    assert sorted(moved) == sorted(before)
    for video, message in moved.items():
        assert message["Body"] == before[video]["Body"]
        expected = {**_strings(before[video]), REDRIVEN_FROM: pair.dlq_arn}
        assert _strings(message) == expected
        assert message["MessageAttributes"].get("receive_count", {}).get("DataType") == (
            "Number" if video != "v7" else None
        )
    assert _strings(moved["v1"])["error_class"] == "expired"
    assert _strings(moved["v7"])["trace"] == b"\x00\x01"
    assert _empty(sqs_sync, pair.dlq_url)


async def test_reason_moves_only_those_and_leaves_the_rest_visible(
    sqs: Any, sqs_sync: Any, pair: Queues
) -> None:
    await _fill(sqs, sqs_sync, pair)

    result = await redrive(sqs, pair.dlq_url, reasons={"expired"}, wait_time=0)

    assert result.method == "copy"
    assert result.fallback is None
    assert result.moved == Counter({"expired": 3})
    assert result.left == Counter({"smtp_throttled": 2, "bad_message": 1, MAX_RECEIVE_COUNT: 1})
    assert result.ok
    assert sorted(_video(m) for m in receive_all(sqs_sync, pair.url)) == ["v1", "v2", "v3"]
    # Made visible again at the end of the run: receivable at once.
    assert sorted(_video(m) for m in receive_all(sqs_sync, pair.dlq_url)) == [
        "v4",
        "v5",
        "v6",
        "v7",
    ]


async def test_several_reasons_and_max_receive_count(sqs: Any, sqs_sync: Any, pair: Queues) -> None:
    await _fill(sqs, sqs_sync, pair)

    result = await redrive(
        sqs, pair.dlq_url, reasons=parse_reasons("smtp_throttled,max_receive_count"), wait_time=0
    )

    assert result.moved == Counter({"smtp_throttled": 2, MAX_RECEIVE_COUNT: 1})
    assert sorted(_video(m) for m in receive_all(sqs_sync, pair.url)) == ["v4", "v5", "v7"]


async def test_dry_run_counts_by_reason_and_moves_nothing(
    sqs: Any, sqs_sync: Any, pair: Queues
) -> None:
    await _fill(sqs, sqs_sync, pair)

    everything = await redrive(sqs, pair.dlq_url, dry_run=True, wait_time=0)
    some = await redrive(sqs, pair.dlq_url, dry_run=True, reasons={"expired"}, wait_time=0)

    assert everything.method == "dry_run"
    assert everything.selected == ALL_REASONS
    assert (everything.moved, everything.left) == (Counter(), Counter())
    assert some.selected == Counter({"expired": 3})
    assert some.left == Counter({"smtp_throttled": 2, "bad_message": 1, MAX_RECEIVE_COUNT: 1})
    assert receive_all(sqs_sync, pair.url) == []
    assert len(receive_all(sqs_sync, pair.dlq_url)) == 7


async def test_to_another_queue(sqs: Any, sqs_sync: Any, pair: Queues) -> None:
    await _fill(sqs, sqs_sync, pair)
    other = sqs_sync.create_queue(QueueName="redrive-elsewhere")["QueueUrl"]

    result = await redrive(sqs, pair.dlq_url, destination_url=other, wait_time=0)

    assert result.destination_url == other
    assert result.moved == ALL_REASONS
    assert len(receive_all(sqs_sync, other)) == 7
    assert receive_all(sqs_sync, pair.url) == []
    assert _empty(sqs_sync, pair.dlq_url)


async def test_fifo_pair_keeps_groups_and_order(sqs: Any, sqs_sync: Any) -> None:
    dlq_url = sqs_sync.create_queue(QueueName="redrive-dlq.fifo", Attributes={"FifoQueue": "true"})[
        "QueueUrl"
    ]
    url = sqs_sync.create_queue(
        QueueName="redrive.fifo",
        Attributes={
            "FifoQueue": "true",
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": arn_of(sqs_sync, dlq_url), "maxReceiveCount": "3"}
            ),
        },
    )["QueueUrl"]
    arn = arn_of(sqs_sync, url)
    router = DeadLetterRouter(sqs, dlq_url)
    items = [
        (_record(video, arn, group=group), Expired("too old"))
        for video, group in [("a1", "ga"), ("b1", "gb"), ("a2", "ga"), ("b2", "gb")]
    ]
    assert len(await router.route(items)) == 4

    result = await redrive(sqs, dlq_url, wait_time=0)

    assert result.moved == Counter({"expired": 4})
    assert result.ok
    moved = receive_all(sqs_sync, url)
    groups: dict[str, list[str]] = {}
    for message in moved:
        groups.setdefault(message["Attributes"]["MessageGroupId"], []).append(_video(message))
    assert groups == {"ga": ["a1", "a2"], "gb": ["b1", "b2"]}
    assert _empty(sqs_sync, dlq_url)


async def test_no_source_queue_and_no_destination_is_an_error(sqs: Any, sqs_sync: Any) -> None:
    lonely = sqs_sync.create_queue(QueueName="redrive-lonely")["QueueUrl"]
    sqs_sync.send_message(QueueUrl=lonely, MessageBody="{}")

    with pytest.raises(RedriveError, match="--to"):
        await redrive(sqs, lonely, wait_time=0)

    assert len(receive_all(sqs_sync, lonely)) == 1


async def test_the_dlq_itself_as_destination_is_an_error(sqs: Any, pair: Queues) -> None:
    with pytest.raises(RedriveError, match="itself"):
        await redrive(sqs, pair.dlq_url, destination_url=pair.dlq_url)


async def test_a_missing_queue_is_an_error(sqs: Any, aws: MotoServer) -> None:
    missing = f"{aws.endpoint_url}/123456789012/nope"
    with pytest.raises(RedriveError, match="no such queue"):
        await redrive(sqs, missing)


def test_parse_reasons() -> None:
    assert parse_reasons("expired, smtp_throttled") == {"expired", "smtp_throttled"}
    for bad in ("", "expired,", "Expired", "smtp rejected"):
        with pytest.raises(ValueError, match="not a reason"):
            parse_reasons(bad)


def _dead_letters(sqs_sync: Any, url: str, kinds: list[str]) -> None:
    for i, kind in enumerate(kinds):
        sqs_sync.send_message(
            QueueUrl=url,
            MessageBody=_body(f"v{i + 1}"),
            MessageAttributes={"error_class": {"DataType": "String", "StringValue": kind}},
        )


async def test_a_failed_send_leaves_the_messages_in_the_dlq(
    sqs_sync: Any, pair: Queues, s3_proxy: S3FaultProxy
) -> None:
    """SendMessageBatch answers 500 (every attempt): nothing is deleted, the run stops and
    gives the messages back to the DLQ at once."""
    _dead_letters(sqs_sync, pair.dlq_url, ["expired", "expired", "bad_message"])
    s3_proxy.set_rules(S3Rule(S3Action.INTERNAL_ERROR, target="AmazonSQS.SendMessageBatch"))

    async with sqs_client(REGION, s3_proxy.endpoint_url) as sqs:
        result = await redrive(sqs, pair.dlq_url, reasons={"expired"}, wait_time=0)

    assert result.failed == Counter({"expired": 2})
    assert result.moved == Counter()
    assert result.error is not None
    assert not result.ok
    assert result.not_released == 0
    assert receive_all(sqs_sync, pair.url) == []
    assert len(receive_all(sqs_sync, pair.dlq_url)) == 3  # visible again, none lost


def test_a_failed_delete_is_reported_and_exits_1(
    sqs_sync: Any,
    pair: Queues,
    s3_proxy: S3FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """DeleteMessageBatch answers 500: the messages arrived, and are in both queues."""
    _dead_letters(sqs_sync, pair.dlq_url, ["expired", "expired"])
    s3_proxy.set_rules(S3Rule(S3Action.INTERNAL_ERROR, target="AmazonSQS.DeleteMessageBatch"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.endpoint_url)

    status = cli.main(["redrive", "--from", pair.dlq_url, "--to", pair.url, "--reason", "expired"])

    out, err = capsys.readouterr()
    assert status == 1
    assert out == f"moved 2 of 2 messages to {pair.url}: expired 2\n"
    assert "2 messages were sent but not deleted from the DLQ" in err
    assert "stopped early" in err
    assert sorted(_video(m) for m in receive_all(sqs_sync, pair.url)) == ["v1", "v2"]
    assert counts(sqs_sync, pair.dlq_url)["ApproximateNumberOfMessagesNotVisible"] == 2


# --------------------------------------------------------------------------- the command


def test_cli_prints_the_summary_and_exits_0(
    sqs_sync: Any, pair: Queues, capsys: pytest.CaptureFixture[str]
) -> None:
    for video, kind in [("v1", "expired"), ("v2", "expired"), ("v3", "bad_message")]:
        sqs_sync.send_message(
            QueueUrl=pair.dlq_url,
            MessageBody=_body(video),
            MessageAttributes={"error_class": {"DataType": "String", "StringValue": kind}},
        )

    status = cli.main(["redrive", "--from", pair.dlq_url, "--reason", "expired"])

    out, err = capsys.readouterr()
    assert status == 0, err
    assert out == f"moved 2 of 3 messages to {pair.url}: expired 2; left 1 (bad_message 1)\n"
    assert "2 moved, 3 seen" in err  # the progress line (stderr is not a terminal here)
    assert sorted(_video(m) for m in receive_all(sqs_sync, pair.url)) == ["v1", "v2"]


def test_cli_redrive_all_says_it_falls_back(
    sqs_sync: Any, pair: Queues, capsys: pytest.CaptureFixture[str]
) -> None:
    sqs_sync.send_message(QueueUrl=pair.dlq_url, MessageBody=_body("v1"))
    other = sqs_sync.create_queue(QueueName="redrive-cli-to")["QueueUrl"]

    status = cli.main(["redrive", "--from", pair.dlq_url, "--to", other])

    out, err = capsys.readouterr()
    assert status == 0, err
    assert out == f"moved 1 of 1 messages to {other}: max_receive_count 1\n"
    assert "StartMessageMoveTask" in err
    assert "copying" in err


def test_cli_dry_run(sqs_sync: Any, pair: Queues, capsys: pytest.CaptureFixture[str]) -> None:
    for kind in ("expired", "expired", "smtp_rejected"):
        sqs_sync.send_message(
            QueueUrl=pair.dlq_url,
            MessageBody="{}",
            MessageAttributes={"error_class": {"DataType": "String", "StringValue": kind}},
        )

    status = cli.main(["redrive", "--from", pair.dlq_url, "--dry-run", "--reason", "expired"])

    out, _ = capsys.readouterr()
    assert status == 0
    assert out == (
        f"dry run: would move 2 of 3 messages to {pair.url}: expired 2; "
        "would leave 1 (smtp_rejected 1)\n"
    )
    assert len(receive_all(sqs_sync, pair.dlq_url)) == 3


def test_cli_without_source_queue_or_to_exits_2(
    sqs_sync: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    lonely = sqs_sync.create_queue(QueueName="redrive-cli-lonely")["QueueUrl"]

    status = cli.main(["redrive", "--from", lonely])

    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert "no queue names it in its redrive policy" in err
    assert "--to QUEUE_URL" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reason", "Expired!"], "--reason: not a reason"),
        (["--max-per-second", "0"], "must be between 1 and 500"),
        (["--max-per-second", "501"], "must be between 1 and 500"),
        (["--to", "notifications"], "not a queue URL: 'notifications'"),
    ],
)
def test_cli_refuses_bad_options(
    aws: MotoServer, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = f"{aws.endpoint_url}/123456789012/anything"
    try:
        status = cli.main(["redrive", "--from", queue, *argv])
    except SystemExit as exit_:  # argparse's own refusals
        status = int(exit_.code or 0)
    assert status == 2
    assert message in capsys.readouterr().err


def test_cli_without_an_answer_names_the_endpoint(
    aws: MotoServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:  # a port nothing listens on any more
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)

    status = cli.main(["redrive", "--from", f"{endpoint}/123456789012/dlq"])

    assert status == 1
    assert f"(SQS at {endpoint})" in capsys.readouterr().err


def test_the_parser_knows_sqs_s_move_rate_limit() -> None:
    assert cli.MAX_MOVE_RATE == MAX_MOVE_RATE


def test_progress_bar_on_a_terminal_redraws_one_line() -> None:
    stream = io.StringIO()
    bar = cli.ProgressBar(stream, tty=True)
    bar(Progress(moved=0, seen=5, total=10))
    bar(Progress(moved=10, seen=10, total=10))
    bar.close()
    assert stream.getvalue() == (
        f"\r[{'#' * 15}{'-' * 15}] 0 moved, 5 seen of about 10"
        f"\r[{'#' * 30}] 10 moved, 10 seen of about 10\n"
    )


def test_progress_bar_elsewhere_writes_a_line_now_and_then() -> None:
    stream = io.StringIO()
    bar = cli.ProgressBar(stream, tty=False, interval=3600)
    bar(Progress(moved=1, seen=2, total=None))
    bar(Progress(moved=2, seen=4, total=None))  # within the interval: not written
    bar.close()
    assert stream.getvalue() == "1 moved, 2 seen\n"


# --------------------------------------------------------------------------- the move task


class FakeMoveTasks:
    """A stand-in for SQS's message move tasks (moto has none): the ListMessageMoveTasks
    answers are given in sequence, the requests recorded."""

    def __init__(self, listings: list[list[dict[str, Any]]]) -> None:
        self.listings = listings
        self.started: list[dict[str, Any]] = []
        self.listed = 0

    async def start_message_move_task(self, **request: Any) -> dict[str, Any]:
        self.started.append(request)
        return {"TaskHandle": "task-1"}

    async def list_message_move_tasks(self, **request: Any) -> dict[str, Any]:
        answer = self.listings[min(self.listed, len(self.listings) - 1)]
        self.listed += 1
        return {"Results": answer}

    async def get_queue_attributes(self, QueueUrl: str, **_: Any) -> dict[str, Any]:
        name = QueueUrl.rpartition("/")[2]
        return {
            "Attributes": {
                "QueueArn": f"arn:aws:sqs:us-east-1:123456789012:{name}",
                "ApproximateNumberOfMessages": "10",
            }
        }

    async def list_dead_letter_source_queues(self, **_: Any) -> dict[str, Any]:
        return {"queueUrls": ["https://sqs.example/123456789012/notifications"]}


def _task(status: str, moved: int, *, handle: str | None = None, started: int = 2**42) -> Any:
    entry = {
        "Status": status,
        "ApproximateNumberOfMessagesMoved": moved,
        "ApproximateNumberOfMessagesToMove": 10,
        "StartedTimestamp": started,
    }
    if handle is not None:
        entry["TaskHandle"] = handle
    return entry


OLD_TASK = _task("COMPLETED", 99, started=1_000)  # another run's, long ago


async def test_move_task_is_polled_until_it_ends() -> None:
    fake = FakeMoveTasks(
        [
            [OLD_TASK],  # not listed yet
            [_task("RUNNING", 2, handle="task-1"), OLD_TASK],
            [_task("RUNNING", 6, handle="task-1"), OLD_TASK],
            [_task("COMPLETED", 10), OLD_TASK],
        ]
    )
    progress: list[Progress] = []
    notices: list[str] = []

    task = await run_move_task(
        fake,
        "arn:dlq",
        "arn:queue",
        max_per_second=50,
        on_progress=progress.append,
        on_notice=notices.append,
        poll_interval=0,
    )

    assert fake.started == [
        {"SourceArn": "arn:dlq", "DestinationArn": "arn:queue", "MaxNumberOfMessagesPerSecond": 50}
    ]
    assert (task.status, task.moved, task.to_move, task.handle) == ("COMPLETED", 10, 10, "task-1")
    assert [p.moved for p in progress] == [2, 6, 10]
    assert notices == ["SQS message move task started: task-1"]


async def test_a_task_that_ended_before_the_first_poll_is_found_by_its_start() -> None:
    fake = FakeMoveTasks([[_task("FAILED", 3), OLD_TASK]])

    task = await run_move_task(fake, "arn:dlq", "arn:queue", poll_interval=0)

    assert (task.status, task.moved) == ("FAILED", 3)
    assert "MaxNumberOfMessagesPerSecond" not in fake.started[0]


async def test_only_a_refused_start_falls_back() -> None:
    """Once a task runs, a failure to list it is an error, not a reason to copy as well."""

    class ListingFails(FakeMoveTasks):
        async def list_message_move_tasks(self, **request: Any) -> dict[str, Any]:
            raise ClientError({"Error": {"Code": "UnsupportedOperation"}}, "ListMessageMoveTasks")

    fake = ListingFails([])

    with pytest.raises(ClientError):
        await redrive(fake, "https://sqs.example/123456789012/dlq", poll_interval=0)

    assert len(fake.started) == 1


async def test_redrive_all_uses_the_move_task_where_there_is_one() -> None:
    fake = FakeMoveTasks([[_task("CANCELLED", 4)]])

    result = await redrive(fake, "https://sqs.example/123456789012/dlq", poll_interval=0)

    assert result.method == "move_task"
    assert result.fallback is None
    assert fake.started[0]["DestinationArn"].endswith(":notifications")
    assert result.task is not None
    assert result.task.status == "CANCELLED"
    assert not result.ok
    assert cli.redrive_summary(result) == (
        "moved 4 of 10 messages to https://sqs.example/123456789012/notifications "
        "(SQS message move task CANCELLED)"
    )


def test_summary_of_a_copy_with_failures() -> None:
    result = RedriveResult("dlq", "queue", "copy", frozenset({"expired"}))
    result.moved.update(expired=2)
    result.failed.update(expired=1)
    result.left.update(bad_message=3)
    result.not_deleted.append("m-1")
    assert cli.redrive_summary(result) == (
        "moved 2 of 6 messages to queue: expired 2; not moved 1 (expired 1); left 3 (bad_message 3)"
    )
    problems = cli.redrive_problems(result)
    assert len(problems) == 2
    assert "m-1" in problems[1]
    assert "both queues" in problems[1]
    assert not result.ok
