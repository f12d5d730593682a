"""Bringing dead letters back: moving a dead-letter queue's messages to a queue again.

Two ways. Without a reason filter SQS does the work: a message move task
(`StartMessageMoveTask`), polled with `ListMessageMoveTasks` until it ends. With a filter,
for a dry run, or on an endpoint without move tasks (moto), the messages are copied: received
from the DLQ, those whose reason matches sent to the destination (body and message attributes
kept) and deleted from the DLQ only once the send succeeded. The others are held invisible
until the run ends, so that one run sees each message once, then made visible again.

A message's reason is its `error_class` attribute (`DeadLetterRouter` writes it), or
`max_receive_count` when it has none: SQS's own redrive policy moved it there.

Nothing here prints: `redrive` returns a `RedriveResult` and reports as it goes through
`on_progress` and `on_notice`. Every call has a time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from email.headerregistry import Address
from typing import Any, Literal, TypeVar

from ..config import Settings
from .clients import aws_client
from .errors import aws_error
from .sqs import MAX_BATCH_BYTES, MAX_BATCH_ENTRIES, batch_chunks

# A message with no `error_class` attribute was moved by SQS's redrive policy.
MAX_RECEIVE_COUNT = "max_receive_count"
REDRIVEN_FROM = "redriven_from"  # added to each copied message: the DLQ's ARN
MAX_MESSAGE_ATTRIBUTES = 10  # SQS's limit per message
FIFO_FALLBACK_GROUP = "redrive"  # a FIFO destination's group for a message that had none
REASON_RE = re.compile(r"^[a-z0-9_]{1,64}$")
MAX_MOVE_RATE = 500  # SQS's limit for MaxNumberOfMessagesPerSecond

# Time limits: the first call also resolves the credentials.
STARTUP_TIMEOUT = 10.0
CALL_TIMEOUT = 5.0
# An endpoint without move tasks may answer HTTP 500 (moto), which the SDK retries with its
# back-off before the fallback can start.
START_TIMEOUT = 15.0
RECEIVE_WAIT = 1  # seconds of long poll per receive: short, an empty answer ends the run
RECEIVE_GRACE = 10.0
EMPTY_RECEIVES = 2  # empty answers in a row that end the copy
# A received message stays hidden for one round (receive, send, delete: each call at most
# CALL_TIMEOUT, retries included); the ones that stay are then hidden for HOLD_VISIBILITY,
# and shown again when the run ends. A run longer than that sees them again, and counts
# them once.
ROUND_VISIBILITY = 60
HOLD_VISIBILITY = 900
MOVE_TASK_POLL = 2.0
MOVE_TASK_ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
CLOCK_SKEW_MS = 5_000  # between this machine and SQS, when matching a task by start time

# How an endpoint says it has no such operation. moto answers an action it lacks with a bare
# HTTP 500 page, which botocore reads as the code "500".
_UNSUPPORTED_CODES = frozenset(
    {
        "UnsupportedOperation",
        "AWS.SimpleQueueService.UnsupportedOperation",
        "InvalidAction",
        "NotImplemented",
        "NotImplementedException",
        "UnknownOperationException",
        "500",
        "501",
    }
)
_NO_QUEUE_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})

Method = Literal["move_task", "copy", "dry_run"]
_T = TypeVar("_T")


class RedriveError(Exception):
    """The command cannot run as asked (no such queue, no destination): nothing was moved."""


class MoveTasksUnsupported(Exception):
    """The endpoint refused StartMessageMoveTask as an operation it lacks: copy instead."""


@dataclass(frozen=True)
class Progress:
    """Where a run stands: `moved` of about `total` (None when unknown), `seen` received."""

    moved: int
    seen: int
    total: int | None


@dataclass(frozen=True)
class MoveTask:
    """The last state `ListMessageMoveTasks` gave of the run's move task."""

    handle: str
    status: str
    moved: int
    to_move: int | None
    failure_reason: str | None = None


@dataclass
class RedriveResult:
    """What a run did, by reason. On the move-task path SQS reports only totals (`task`)."""

    source_url: str
    destination_url: str
    method: Method
    reasons: frozenset[str] | None  # the --reason filter; None: every reason
    moved: Counter[str] = field(default_factory=Counter)  # sent to the destination
    selected: Counter[str] = field(default_factory=Counter)  # dry run: would be moved
    left: Counter[str] = field(default_factory=Counter)  # not selected: still in the DLQ
    failed: Counter[str] = field(default_factory=Counter)  # selected, not sent: in the DLQ
    not_deleted: list[str] = field(default_factory=list)  # sent, and still in the DLQ too
    not_released: int = 0  # held messages left hidden (until HOLD_VISIBILITY runs out)
    task: MoveTask | None = None
    fallback: str | None = None  # why the move task gave way to copying
    error: str | None = None  # the failure that stopped the run early

    @property
    def moved_count(self) -> int:
        if self.task is not None:
            return self.task.moved
        return sum(self.moved.values())

    @property
    def seen_count(self) -> int:
        if self.task is not None:
            return max(self.task.moved, self.task.to_move or 0)
        return sum((self.moved + self.selected + self.left + self.failed).values())

    @property
    def ok(self) -> bool:
        """Every selected message moved, none left behind twice, the run not cut short."""
        if self.error is not None or self.failed or self.not_deleted:
            return False
        return self.task is None or self.task.status == "COMPLETED"


ProgressCallback = Callable[[Progress], None]
NoticeCallback = Callable[[str], None]


def sqs_client(region: str, endpoint_url: str | None) -> Any:
    """An SQS client for the command: `aws_client` needs only the AWS part of `Settings`,
    so the command does not ask for the worker's SMTP settings."""
    settings = Settings(
        smtp_server="", email_from=Address(), aws_region=region, aws_endpoint_url=endpoint_url
    )
    return aws_client(
        "sqs", settings, max_pool_connections=4, read_timeout=RECEIVE_WAIT + RECEIVE_GRACE
    )


def parse_reasons(text: str) -> frozenset[str]:
    """`expired,smtp_throttled` as a set; ValueError for an empty or malformed name."""
    names = [name.strip() for name in text.split(",")]
    bad = [name for name in names if not REASON_RE.match(name)]
    if bad:
        raise ValueError(
            f"not a reason: {', '.join(repr(name) for name in bad)} "
            "(lower-case letters, digits and _, e.g. expired,smtp_throttled)"
        )
    return frozenset(names)


def reason_of(message: dict[str, Any]) -> str:
    """The message's `error_class`, or `max_receive_count` when the router did not write one."""
    value = (message.get("MessageAttributes") or {}).get("error_class") or {}
    reason = value.get("StringValue")
    return reason if isinstance(reason, str) and reason else MAX_RECEIVE_COUNT


def is_unsupported(exc: BaseException) -> bool:
    """The endpoint does not implement the operation (moto has no message move tasks)."""
    error = aws_error(exc)
    return error.code in _UNSUPPORTED_CODES or error.status == 501


async def redrive(
    sqs: Any,
    source_url: str,
    *,
    destination_url: str | None = None,
    reasons: Collection[str] | None = None,
    dry_run: bool = False,
    max_per_second: int | None = None,
    on_progress: ProgressCallback | None = None,
    on_notice: NoticeCallback | None = None,
    wait_time: int = RECEIVE_WAIT,
    poll_interval: float = MOVE_TASK_POLL,
) -> RedriveResult:
    """Move the messages of the DLQ at `source_url` (those of `reasons`, or all) back.

    The destination is `destination_url`, else the DLQ's one source queue. Raises
    RedriveError when the run cannot start; failures once started end up in the result.
    """
    if max_per_second is not None and not 1 <= max_per_second <= MAX_MOVE_RATE:
        raise ValueError(f"max_per_second must be between 1 and {MAX_MOVE_RATE}")
    source = await _queue(sqs, source_url, limit=STARTUP_TIMEOUT)
    if destination_url is None:
        destination_url = await _source_queue(sqs, source_url)
    destination = await _queue(sqs, destination_url, limit=CALL_TIMEOUT)
    if destination.arn == source.arn:
        raise RedriveError(f"the destination is the dead-letter queue itself: {source_url}")
    wanted = frozenset(reasons) if reasons else None
    notice = on_notice or (lambda text: None)
    progress = on_progress or (lambda state: None)
    fallback: str | None = None
    if not dry_run and wanted is None:
        try:
            task = await run_move_task(
                sqs,
                source.arn,
                destination.arn,
                max_per_second=max_per_second,
                on_progress=progress,
                on_notice=notice,
                poll_interval=poll_interval,
            )
        except MoveTasksUnsupported as exc:
            fallback = str(exc)
            notice(f"{fallback}: copying the messages instead")
        else:
            return RedriveResult(source_url, destination_url, "move_task", None, task=task)
    copier = _Copier(
        sqs,
        source,
        destination,
        wanted=wanted,
        dry_run=dry_run,
        max_per_second=max_per_second,
        wait_time=wait_time,
        on_progress=progress,
    )
    result = await copier.run()
    result.fallback = fallback
    return result


async def run_move_task(
    sqs: Any,
    source_arn: str,
    destination_arn: str,
    *,
    max_per_second: int | None = None,
    on_progress: ProgressCallback | None = None,
    on_notice: NoticeCallback | None = None,
    poll_interval: float = MOVE_TASK_POLL,
) -> MoveTask:
    """Start an SQS message move task and poll it until it ends; its last state.

    Raises MoveTasksUnsupported when the endpoint lacks move tasks (the caller copies
    instead), else what the calls raise. A task not listed yet (SQS is eventually
    consistent) is polled again.
    """
    request: dict[str, Any] = {"SourceArn": source_arn, "DestinationArn": destination_arn}
    if max_per_second is not None:
        request["MaxNumberOfMessagesPerSecond"] = max_per_second
    asked_ms = int(time.time() * 1000) - CLOCK_SKEW_MS
    try:
        started = await _call(
            "StartMessageMoveTask", lambda: sqs.start_message_move_task(**request), START_TIMEOUT
        )
    except Exception as exc:
        if is_unsupported(exc):
            name = aws_error(exc).name
            raise MoveTasksUnsupported(
                f"this endpoint has no StartMessageMoveTask ({name})"
            ) from exc
        raise
    handle = str(started["TaskHandle"])
    if on_notice is not None:
        on_notice(f"SQS message move task started: {handle}")
    tracker = _TaskTracker(handle, asked_ms)
    while True:
        await asyncio.sleep(poll_interval)
        listed = await _call(
            "ListMessageMoveTasks",
            lambda: sqs.list_message_move_tasks(SourceArn=source_arn, MaxResults=10),
            CALL_TIMEOUT,
        )
        task = tracker.find(listed.get("Results") or [])
        if task is None:
            continue  # not listed yet: SQS is eventually consistent
        if on_progress is not None:
            on_progress(Progress(task.moved, task.moved, task.to_move))
        if task.status in MOVE_TASK_ENDED:
            return task


class _TaskTracker:
    """Finds our task in ListMessageMoveTasks' answers (the newest first).

    Only a running task is listed with its handle: once it has ended, ours is the entry
    started when we saw it running, or, if it ended before the first poll, the newest one
    started since we asked for it.
    """

    def __init__(self, handle: str, asked_ms: int) -> None:
        self._handle = handle
        self._asked_ms = asked_ms
        self._started_ms: int | None = None

    def find(self, results: Sequence[dict[str, Any]]) -> MoveTask | None:
        for entry in results:
            started = entry.get("StartedTimestamp")
            started_ms = int(started) if isinstance(started, int | float) else None
            if entry.get("TaskHandle") == self._handle:
                self._started_ms = started_ms
                return self._task(entry)
            if entry.get("TaskHandle") or started_ms is None:
                continue
            if self._started_ms is not None:
                if started_ms == self._started_ms:
                    return self._task(entry)
            elif started_ms >= self._asked_ms:
                return self._task(entry)
        return None

    def _task(self, entry: dict[str, Any]) -> MoveTask:
        to_move = entry.get("ApproximateNumberOfMessagesToMove")
        return MoveTask(
            handle=self._handle,
            status=str(entry.get("Status", "RUNNING")),
            moved=int(entry.get("ApproximateNumberOfMessagesMoved") or 0),
            to_move=int(to_move) if to_move is not None else None,
            failure_reason=entry.get("FailureReason"),
        )


@dataclass(frozen=True)
class _Queue:
    url: str
    arn: str
    fifo: bool
    approximate: int


async def _queue(sqs: Any, url: str, *, limit: float) -> _Queue:
    try:
        response = await _call(
            "GetQueueAttributes",
            lambda: sqs.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=["QueueArn", "FifoQueue", "ApproximateNumberOfMessages"],
            ),
            limit,
        )
    except Exception as exc:
        if aws_error(exc).code in _NO_QUEUE_CODES:
            raise RedriveError(f"no such queue: {url}") from None
        raise
    attributes = response["Attributes"]
    return _Queue(
        url,
        attributes["QueueArn"],
        attributes.get("FifoQueue") == "true",
        int(attributes.get("ApproximateNumberOfMessages", 0)),
    )


async def _source_queue(sqs: Any, dlq_url: str) -> str:
    """The one queue whose redrive policy names the DLQ, else RedriveError."""
    response = await _call(
        "ListDeadLetterSourceQueues",
        lambda: sqs.list_dead_letter_source_queues(QueueUrl=dlq_url),
        CALL_TIMEOUT,
    )
    urls: list[str] = response.get("queueUrls") or []
    if len(urls) == 1:
        return urls[0]
    if not urls:
        found = "no queue names it in its redrive policy"
    else:
        found = f"{len(urls)} queues name it in their redrive policy ({', '.join(urls[:5])})"
    raise RedriveError(
        f"cannot tell where to send the messages of {dlq_url}: {found}; "
        "name the destination with --to QUEUE_URL"
    )


async def _call(what: str, call: Callable[[], Awaitable[_T]], limit: float) -> _T:
    try:
        async with asyncio.timeout(limit):
            return await call()
    except TimeoutError:
        raise TimeoutError(f"{what} got no answer within {limit:g} s") from None


@dataclass
class _Held:
    handle: str
    reason: str


class _Copier:
    """The copy path: receive, sort by reason, send and delete the selected, hold the rest."""

    def __init__(
        self,
        sqs: Any,
        source: _Queue,
        destination: _Queue,
        *,
        wanted: frozenset[str] | None,
        dry_run: bool,
        max_per_second: int | None,
        wait_time: int,
        on_progress: ProgressCallback,
    ) -> None:
        self._sqs = sqs
        self._source = source
        self._destination = destination
        self._wanted = wanted
        self._dry_run = dry_run
        self._rate = max_per_second
        self._wait_time = wait_time
        self._on_progress = on_progress
        self._held: dict[str, _Held] = {}  # messageId -> latest receipt handle, reason
        self._sent: set[str] = set()  # messageIds sent (a failed delete shows them again)
        method: Method = "dry_run" if dry_run else "copy"
        self.result = RedriveResult(source.url, destination.url, method, wanted)

    async def run(self) -> RedriveResult:
        started = time.monotonic()
        try:
            empty = 0
            while empty < EMPTY_RECEIVES:
                messages = await self._receive()
                empty = 0 if messages else empty + 1
                if messages:
                    await self._round(messages)
                    self._on_progress(
                        Progress(
                            self.result.moved_count,
                            self.result.seen_count,
                            self._source.approximate or None,
                        )
                    )
                    await self._pace(started)
        except Exception as exc:
            self.result.error = _describe(exc)
        finally:
            await self._release()
        return self.result

    async def _receive(self) -> list[dict[str, Any]]:
        response = await _call(
            "ReceiveMessage",
            lambda: self._sqs.receive_message(
                QueueUrl=self._source.url,
                MaxNumberOfMessages=MAX_BATCH_ENTRIES,
                WaitTimeSeconds=self._wait_time,
                VisibilityTimeout=ROUND_VISIBILITY,
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
            ),
            self._wait_time + RECEIVE_GRACE,
        )
        messages: list[dict[str, Any]] = response.get("Messages") or []
        return messages

    async def _round(self, messages: list[dict[str, Any]]) -> None:
        to_hold: list[dict[str, Any]] = []
        to_move: list[dict[str, Any]] = []
        for message in messages:
            message_id = message["MessageId"]
            reason = reason_of(message)
            if message_id in self._held or message_id in self._sent:
                # Seen before (a hold ran out, or a delete failed): hold it, count it once.
                to_hold.append(message)
                self._held[message_id] = _Held(message["ReceiptHandle"], reason)
            elif self._wanted is not None and reason not in self._wanted:
                self.result.left[reason] += 1
                to_hold.append(message)
            elif self._dry_run:
                self.result.selected[reason] += 1
                to_hold.append(message)
            else:
                to_move.append(message)
        await self._hold(to_hold)
        if to_move:
            await self._move(to_move)

    async def _hold(self, messages: list[dict[str, Any]]) -> None:
        """Keep `messages` hidden until the run ends (best effort: a run sees one again at
        worst, and counts it once)."""
        for message in messages:
            self._held[message["MessageId"]] = _Held(message["ReceiptHandle"], reason_of(message))
        if messages:
            with contextlib.suppress(Exception):
                await self._change_visibility(
                    [message["ReceiptHandle"] for message in messages], HOLD_VISIBILITY
                )

    async def _move(self, messages: list[dict[str, Any]]) -> None:
        """Send `messages` to the destination; delete from the DLQ those that arrived."""
        entries = {f"m{i}": message for i, message in enumerate(messages)}
        sent: list[dict[str, Any]] = []
        unsent: list[dict[str, Any]] = []
        try:
            for chunk in _by_size([(key, self._entry(key, m)) for key, m in entries.items()]):
                response = await _call(
                    "SendMessageBatch",
                    functools.partial(
                        self._sqs.send_message_batch, QueueUrl=self._destination.url, Entries=chunk
                    ),
                    CALL_TIMEOUT,
                )
                ok = {entry["Id"] for entry in response.get("Successful") or []}
                for entry in chunk:
                    (sent if entry["Id"] in ok else unsent).append(entries[entry["Id"]])
        except Exception:
            # The call's outcome is unknown: whatever was not confirmed stays in the DLQ.
            done = {m["MessageId"] for m in sent} | {m["MessageId"] for m in unsent}
            unsent += [m for m in messages if m["MessageId"] not in done]
            self._book(sent, unsent)
            await self._delete(sent)
            raise
        self._book(sent, unsent)
        await self._delete(sent)

    def _book(self, sent: list[dict[str, Any]], unsent: list[dict[str, Any]]) -> None:
        for message in sent:
            self._sent.add(message["MessageId"])
            self.result.moved[reason_of(message)] += 1
        for message in unsent:
            self.result.failed[reason_of(message)] += 1
            self._held[message["MessageId"]] = _Held(message["ReceiptHandle"], reason_of(message))

    async def _delete(self, messages: list[dict[str, Any]]) -> None:
        if not messages:
            return
        by_key = {f"d{i}": message for i, message in enumerate(messages)}
        deleted: set[str] = set()
        try:
            response = await _call(
                "DeleteMessageBatch",
                lambda: self._sqs.delete_message_batch(
                    QueueUrl=self._source.url,
                    Entries=[
                        {"Id": key, "ReceiptHandle": message["ReceiptHandle"]}
                        for key, message in by_key.items()
                    ],
                ),
                CALL_TIMEOUT,
            )
            deleted = {entry["Id"] for entry in response.get("Successful") or []}
        finally:
            for key, message in by_key.items():
                if key not in deleted:
                    self.result.not_deleted.append(message["MessageId"])

    def _entry(self, key: str, message: dict[str, Any]) -> dict[str, Any]:
        attributes = _send_attributes(message.get("MessageAttributes") or {})
        if REDRIVEN_FROM in attributes or len(attributes) < MAX_MESSAGE_ATTRIBUTES:
            attributes[REDRIVEN_FROM] = {"DataType": "String", "StringValue": self._source.arn}
        entry: dict[str, Any] = {"Id": key, "MessageBody": message["Body"]}
        if attributes:
            entry["MessageAttributes"] = attributes
        if self._destination.fifo:
            system = message.get("Attributes") or {}
            entry["MessageGroupId"] = system.get("MessageGroupId") or FIFO_FALLBACK_GROUP
            # One id per DLQ message: a send retried after an unknown outcome is not
            # delivered twice, and a later copy of the same notification is not dropped.
            entry["MessageDeduplicationId"] = hashlib.sha256(
                f"redrive:{message['MessageId']}".encode()
            ).hexdigest()
        return entry

    async def _change_visibility(self, handles: list[str], seconds: int) -> int:
        """Set the visibility of `handles`; how many SQS confirmed."""
        changed = 0
        for start in range(0, len(handles), MAX_BATCH_ENTRIES):
            chunk = handles[start : start + MAX_BATCH_ENTRIES]
            response = await _call(
                "ChangeMessageVisibilityBatch",
                functools.partial(
                    self._sqs.change_message_visibility_batch,
                    QueueUrl=self._source.url,
                    Entries=[
                        {"Id": f"v{i}", "ReceiptHandle": handle, "VisibilityTimeout": seconds}
                        for i, handle in enumerate(chunk)
                    ],
                ),
                CALL_TIMEOUT,
            )
            changed += len(response.get("Successful") or [])
        return changed

    async def _release(self) -> None:
        """Make every held message visible again, for the next run or the next consumer."""
        handles = [held.handle for held in self._held.values()]
        try:
            released = await self._change_visibility(handles, 0)
        except Exception:
            released = 0
        self.result.not_released = len(handles) - released
        self._held.clear()

    async def _pace(self, started: float) -> None:
        """With `max_per_second`, wait until the messages moved so far are within the rate."""
        if self._rate is None:
            return
        ahead = self.result.moved_count / self._rate - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)


def _send_attributes(received: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Received message attributes as SendMessage takes them (SQS's empty list fields out)."""
    attributes: dict[str, dict[str, Any]] = {}
    for name, value in received.items():
        kind = value.get("DataType")
        if not kind:
            continue
        if "StringValue" in value:
            attributes[name] = {"DataType": kind, "StringValue": value["StringValue"]}
        elif "BinaryValue" in value:
            attributes[name] = {"DataType": kind, "BinaryValue": value["BinaryValue"]}
    return attributes


def _entry_size(entry: dict[str, Any]) -> int:
    """Bytes SQS counts towards the payload limit: body plus attribute names, types, values."""
    size = len(entry["MessageBody"].encode("utf-8", "surrogatepass"))
    for name, value in (entry.get("MessageAttributes") or {}).items():
        data = value.get("StringValue", value.get("BinaryValue", b""))
        size += len(name) + len(value["DataType"])
        size += len(data.encode() if isinstance(data, str) else data)
    return size


def _by_size(entries: list[tuple[str, dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """SendMessageBatch calls within SQS's entry and payload limits."""
    sizes = [(index, _entry_size(entry)) for index, (_, entry) in enumerate(entries)]
    return [
        [entries[index][1] for index in chunk]
        for chunk in batch_chunks(sizes, max_bytes=MAX_BATCH_BYTES)
    ]


def _describe(exc: BaseException) -> str:
    """A failure in words, without the request: the AWS code and message, or a time limit."""
    if isinstance(exc, TimeoutError):
        return str(exc) or "a call got no answer in time"
    return aws_error(exc).describe()
