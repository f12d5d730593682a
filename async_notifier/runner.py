"""Consume an SQS queue outside Lambda, the way Lambda's SQS event source mapping does.

The worker has to run in a container, on a VM and in `make run-local` with exactly the batch
code Lambda runs, so this module does what the event source mapping does: long-poll, gather a
batch up to a size or a time window, shape each message like a Lambda SQS record, call
`Notifier.process` within a per-batch deadline (as Lambda bounds an invocation by its
timeout), delete the successes and leave the failures to come back after their visibility
timeout (and reach the dead-letter queue after `maxReceiveCount` receives). Unlike Lambda it
also keeps the messages it holds invisible while a batch runs (a visibility heartbeat), so a
batch longer than the queue's visibility timeout is not delivered to a second consumer. One
SQS client serves the whole run: aiobotocore clients belong to the event loop that opened
them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import signal
import time
from collections.abc import Awaitable, Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .aws.clients import aws_client
from .aws.errors import aws_error
from .batch.outcome import BatchResult, Outcome
from .config import Settings
from .deadline import MARGIN_FRACTION, MIN_MARGIN, Deadline
from .errors import TransientError
from .logs import get_logger

log = get_logger()

MAX_MESSAGES_PER_RECEIVE = 10  # SQS's limit for ReceiveMessage
MAX_ENTRIES_PER_DELETE = 10  # and for DeleteMessageBatch / ChangeMessageVisibilityBatch
MAX_WAIT_TIME = 20  # SQS's limit for WaitTimeSeconds
# SQS keeps a message hidden at most this long after it was received: no extension goes past.
MAX_VISIBILITY = 12 * 3600
MAX_POLLERS = 10
DRAIN_CHECK_INTERVAL = 1.0
DEFAULT_BATCH_TIMEOUT = 900.0  # the longest a Lambda invocation may run
# Time limits on the network: a receive gets its long poll plus RECEIVE_GRACE, any other SQS
# call CALL_TIMEOUT (the first one STARTUP_TIMEOUT: it also resolves the credentials).
RECEIVE_GRACE = 10.0
CALL_TIMEOUT = 5.0
STARTUP_TIMEOUT = 10.0
# A batch that ignores its deadline is cancelled this long after the deadline's end, as
# Lambda kills an invocation at its timeout.
KILL_GRACE = 1.0
# The heartbeat beats every third of the visibility timeout, at most once a second, and each
# beat hides the messages for at least MIN_EXTENSION seconds: on a 1-2 s queue (tests, the
# demo) a beat still has two more behind it before a message could reappear.
MIN_BEAT_PERIOD = 1.0
MIN_EXTENSION = 3
HEARTBEAT_TASK_NAME = "runner-heartbeat"
_EMPTY_ATTRIBUTES = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)

BatchCallback = Callable[[list[dict[str, Any]], BatchResult], None]


class BatchProcessor(Protocol):
    """What the runner hands each batch to: `Notifier` (emails) or `SesEventsRecorder`."""

    async def process(
        self,
        records: list[Any],
        *,
        deadline: Deadline | None = None,
        function_name: str | None = None,
    ) -> BatchResult: ...


@dataclass
class RunnerStats:
    """Counters for the whole run, logged at the end and returned to callers."""

    batches: int = 0
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    deleted: int = 0
    delete_failed: int = 0
    released: int = 0
    extended: int = 0  # visibility extensions SQS confirmed (one per message per beat)
    extend_failed: int = 0
    overran: int = 0  # batches cancelled for running past their deadline
    drained: bool = False


@dataclass(frozen=True)
class QueueInfo:
    url: str
    arn: str

    @property
    def region(self) -> str:
        """The region Lambda puts in `awsRegion`: the queue's, from its ARN."""
        return self.arn.split(":")[3]


@dataclass(slots=True)
class _Held:
    """A received message the runner has not finished with: the heartbeat keeps it hidden."""

    message: dict[str, Any]
    received_at: float  # monotonic; SQS counts its 12 h from here
    extended_at: float  # when its visibility was last reset (the request's start, to be safe)

    @property
    def handle(self) -> str:
        return str(self.message["ReceiptHandle"])

    @property
    def message_id(self) -> str:
        return str(self.message.get("MessageId", ""))


def lambda_record(message: Mapping[str, Any], queue: QueueInfo) -> dict[str, Any]:
    """One ReceiveMessage result in the exact shape of a Lambda SQS event record."""
    record: dict[str, Any] = {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message.get("Body", ""),
        "attributes": {str(k): str(v) for k, v in message.get("Attributes", {}).items()},
        "messageAttributes": {
            name: _message_attribute(value)
            for name, value in message.get("MessageAttributes", {}).items()
        },
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue.arn,
        "awsRegion": queue.region,
    }
    if message.get("MD5OfMessageAttributes"):
        record["md5OfMessageAttributes"] = message["MD5OfMessageAttributes"]
    return record


def _message_attribute(value: Mapping[str, Any]) -> dict[str, Any]:
    """SDK shape (`StringValue`, bytes) to Lambda's (`stringValue`, base64 text)."""
    converted: dict[str, Any] = {}
    if "StringValue" in value:
        converted["stringValue"] = value["StringValue"]
    if "BinaryValue" in value:
        converted["binaryValue"] = _b64(value["BinaryValue"])
    converted["stringListValues"] = list(value.get("StringListValues", []))
    converted["binaryListValues"] = [_b64(v) for v in value.get("BinaryListValues", [])]
    converted["dataType"] = value.get("DataType", "String")
    return converted


def _b64(value: bytes | str) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return base64.b64encode(raw).decode("ascii")


def sqs_client(settings: Settings, *, pollers: int, wait_time: int) -> Any:
    """The run's single SQS client, with room for every poll plus the deletes."""
    return aws_client(
        "sqs",
        settings,
        max_pool_connections=pollers + MAX_POLLERS,
        read_timeout=wait_time + 20,  # a long poll must not look like a dead server
    )


async def run(
    settings: Settings,
    queue_url: str,
    *,
    notifier: BatchProcessor,
    batch_size: int = 100,
    batch_window: float = 1.0,
    wait_time: int = MAX_WAIT_TIME,
    batch_timeout: float = DEFAULT_BATCH_TIMEOUT,
    drain: bool = False,
    max_batches: int | None = None,
    pollers: int | None = None,
    stop: asyncio.Event | None = None,
    on_batch: BatchCallback | None = None,
) -> RunnerStats:
    """Consume `queue_url` until `stop` is set, `max_batches` ran, or (with `drain`) it is empty.

    Each batch gets `batch_timeout` seconds (less if its messages could not stay hidden that
    long), with the cutoff `settings.deadline_margin` before it, as a Lambda invocation gets
    its timeout. `stop` ends the run after the batch being processed; no receive starts
    after it is set. `on_batch(records, result)` sees every batch after its deletes
    (run-local's report). The caller owns `notifier` (`wiring.build_notifier`) and closes it.
    """
    if not 1 <= batch_size <= 10_000:
        raise ValueError("batch_size must be between 1 and 10000")
    if not 0 <= wait_time <= MAX_WAIT_TIME:
        raise ValueError(f"wait_time must be between 0 and {MAX_WAIT_TIME}")
    if batch_window < 0:
        raise ValueError("batch_window must not be negative")
    if not 0 < batch_timeout < math.inf:
        raise ValueError("batch_timeout must be a positive number of seconds")
    if max_batches is not None and max_batches < 1:
        raise ValueError("max_batches must be at least 1")
    if pollers is None:
        pollers = min(MAX_POLLERS, math.ceil(batch_size / MAX_MESSAGES_PER_RECEIVE))
    if pollers < 1:
        raise ValueError("pollers must be at least 1")
    stop = stop or asyncio.Event()
    async with sqs_client(settings, pollers=pollers, wait_time=wait_time) as sqs:
        attributes = await _queue_attributes(sqs, queue_url)
        queue = QueueInfo(queue_url, attributes["QueueArn"])
        consumer = _Consumer(
            sqs,
            queue,
            notifier,
            batch_size=batch_size,
            batch_window=batch_window,
            wait_time=wait_time,
            batch_timeout=batch_timeout,
            margin=settings.deadline_margin,
            visibility_timeout=int(attributes.get("VisibilityTimeout", 30)),
            drain=drain,
            max_batches=max_batches,
            pollers=pollers,
            stop=stop,
            on_batch=on_batch,
        )
        log.info(
            "runner started",
            extra={
                "queue_url": queue_url,
                "queue_arn": queue.arn,
                "batch_size": batch_size,
                "batch_window": batch_window,
                "wait_time": wait_time,
                "batch_timeout": batch_timeout,
                "visibility_timeout": consumer.visibility_timeout,
                "heartbeat_period": consumer.beat_period,
                "pollers": pollers,
                "drain": drain,
            },
        )
        try:
            await consumer.consume()
        finally:
            await consumer.close()
        stats = consumer.stats
    log.info("runner stopped", extra=vars(stats))
    return stats


async def _queue_attributes(sqs: Any, queue_url: str) -> dict[str, str]:
    """The queue's ARN (for the records) and visibility timeout (for the heartbeat)."""
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            response = await sqs.get_queue_attributes(
                QueueUrl=queue_url, AttributeNames=["QueueArn", "VisibilityTimeout"]
            )
    except TimeoutError:
        raise TimeoutError(
            f"GetQueueAttributes got no answer within {STARTUP_TIMEOUT:g} s"
        ) from None
    return dict(response["Attributes"])


class _Consumer:
    """The receive → process → delete loop of one run."""

    def __init__(
        self,
        sqs: Any,
        queue: QueueInfo,
        notifier: BatchProcessor,
        *,
        batch_size: int,
        batch_window: float,
        wait_time: int,
        batch_timeout: float,
        margin: float | None,
        visibility_timeout: int,
        drain: bool,
        max_batches: int | None,
        pollers: int,
        stop: asyncio.Event,
        on_batch: BatchCallback | None,
    ) -> None:
        self.sqs = sqs
        self.queue = queue
        self.notifier = notifier
        self.batch_size = batch_size
        self.batch_window = batch_window
        self.wait_time = wait_time
        self.batch_timeout = batch_timeout
        self.margin = margin
        self.drain = drain
        self.max_batches = max_batches
        self.max_pollers = pollers
        self.stop = stop
        self.on_batch = on_batch
        self.stats = RunnerStats()
        self.visibility_timeout = visibility_timeout
        self.beat_period = max(MIN_BEAT_PERIOD, visibility_timeout / 3)
        self.extension = max(visibility_timeout, MIN_EXTENSION)
        # A beat that has not answered by half the period is given up: the next one retries.
        self.beat_timeout = min(CALL_TIMEOUT, self.beat_period / 2)
        # Receives in flight, each with the number of messages it asked for. None is left
        # running while a batch is processed: a receive would hide messages nobody works on.
        self._polls: dict[asyncio.Task[list[dict[str, Any]] | None], int] = {}
        # Received but not in a batch yet: what a window's last polls brought beyond its size.
        self._buffer: list[dict[str, Any]] = []
        # Every message received and not finished with (deleted, left to SQS after its batch,
        # or released), by receipt handle: what the heartbeat extends and close() releases.
        self._held: dict[str, _Held] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._backoff = 0.0
        self._retry_at = 0.0  # after a failed receive, none starts before this (loop time)

    async def consume(self) -> None:
        while not self.stop.is_set():
            messages = await self._gather()
            if messages:
                await self._handle(messages)
            if self.stats.drained:
                return
            if self.max_batches is not None and self.stats.batches >= self.max_batches:
                return

    # -- receiving

    async def _gather(self) -> list[dict[str, Any]]:
        """Collect up to batch_size messages; the window opens with the first message.

        Until then one long poll waits for work. Once the window is open, top-up polls wait
        no longer than the rest of it (rounded up to SQS's whole seconds); when it closes, the
        polls still in flight are waited for and what they bring joins this batch, rather than
        waiting, hidden and unextended, through the next one.
        """
        loop = asyncio.get_running_loop()
        batch = self._take(self.batch_size)
        closes = loop.time() + self.batch_window if batch else None
        stop_wait = asyncio.ensure_future(self.stop.wait())
        try:
            while len(batch) < self.batch_size and not self.stop.is_set():
                now = loop.time()
                if closes is not None and now >= closes:
                    break
                timeout: float | None = None
                if closes is not None:
                    timeout = closes - now
                elif self.drain:
                    timeout = DRAIN_CHECK_INTERVAL
                if now < self._retry_at:  # a receive failed: back off before the next
                    timeout = min(timeout or math.inf, self._retry_at - now)
                elif closes is None:
                    if not self._polls:
                        count = min(MAX_MESSAGES_PER_RECEIVE, self.batch_size)
                        self._start_poll(count, self.wait_time)
                else:
                    wait = min(self.wait_time, math.ceil(closes - now))
                    self._top_up(self.batch_size - len(batch), wait)
                done, _ = await asyncio.wait(
                    [*self._polls, stop_wait],
                    timeout=timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                came_back_empty = self._collect(done, batch)
                if batch and closes is None:
                    closes = loop.time() + self.batch_window
                nothing_came = came_back_empty or not done
                if self.drain and not batch and nothing_came and await self._queue_is_empty():
                    self.stats.drained = True
                    break
            if batch and self._polls:
                # Only short top-ups can be in flight once a message came: each ends within
                # its wait (and its time limit).
                done, _ = await asyncio.wait(list(self._polls))
                self._collect(done, batch)
        finally:
            stop_wait.cancel()
        return batch

    def _collect(self, done: Container[object], batch: list[dict[str, Any]]) -> bool:
        """Move finished polls' messages into `batch` (the excess into the buffer).

        Returns whether one of them came back empty.
        """
        came_back_empty = False
        for task in [t for t in self._polls if t in done]:
            del self._polls[task]
            messages = task.result()
            if messages is None:
                continue  # failed: the next receive waits out the back-off
            if not messages:
                came_back_empty = True
            room = self.batch_size - len(batch)
            batch.extend(messages[:room])
            self._buffer.extend(messages[room:])
        return came_back_empty

    def _take(self, count: int) -> list[dict[str, Any]]:
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        return taken

    def _start_poll(self, count: int, wait: int) -> None:
        self._polls[asyncio.create_task(self._receive(count, wait))] = count

    def _top_up(self, room: int, wait: int) -> None:
        """Start receives until those in flight could fill the room left in the batch."""
        if self.stop.is_set():
            return
        asked = sum(self._polls.values()) + len(self._buffer)
        while len(self._polls) < self.max_pollers and asked < room:
            count = min(MAX_MESSAGES_PER_RECEIVE, room - asked)
            self._start_poll(count, wait)
            asked += count

    async def _receive(self, count: int, wait: int) -> list[dict[str, Any]] | None:
        """One ReceiveMessage; None after a failure (logged, and the next receive delayed).

        What it returns is held from the moment it arrives: the heartbeat and close() see it
        even before the batch does.
        """
        try:
            async with asyncio.timeout(wait + RECEIVE_GRACE):
                response = await self.sqs.receive_message(
                    QueueUrl=self.queue.url,
                    MaxNumberOfMessages=count,
                    WaitTimeSeconds=wait,
                    AttributeNames=["All"],
                    MessageAttributeNames=["All"],
                )
        except Exception as exc:
            # Endpoint down, throttled, queue gone: keep trying, as the event source mapping
            # does, but back off so a broken endpoint is not hammered.
            self._backoff = min(MAX_WAIT_TIME, max(1.0, self._backoff * 2))
            self._retry_at = asyncio.get_running_loop().time() + self._backoff
            log.warning(
                "receive failed",
                extra={"error": f"{type(exc).__name__}: {exc}", "retry_in": self._backoff},
            )
            return None
        received_at = time.monotonic()
        self._backoff = 0.0
        messages: list[dict[str, Any]] = response.get("Messages", [])
        for message in messages:
            self._held[str(message["ReceiptHandle"])] = _Held(message, received_at, received_at)
        return messages

    async def _queue_is_empty(self) -> bool:
        """Nothing visible, in flight (failures waiting out their timeout) or delayed."""
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                response = await self.sqs.get_queue_attributes(
                    QueueUrl=self.queue.url, AttributeNames=list(_EMPTY_ATTRIBUTES)
                )
        except Exception as exc:
            log.warning("cannot read queue attributes", extra={"error": aws_error(exc).name})
            return False
        attributes = response.get("Attributes", {})
        return all(int(attributes.get(name, 0)) == 0 for name in _EMPTY_ATTRIBUTES)

    # -- processing

    async def _handle(self, messages: list[dict[str, Any]]) -> None:
        records = [lambda_record(m, self.queue) for m in messages]
        handles = [str(m["ReceiptHandle"]) for m in messages]
        self.stats.batches += 1
        self.stats.received += len(records)
        deadline = self._deadline(handles)
        started = time.monotonic()
        self._start_heartbeat()
        try:
            result = await self._process(records, deadline)
        finally:
            await self._stop_heartbeat()
            for handle in handles:  # deleted below, or left to come back: no longer ours
                self._held.pop(handle, None)
        to_delete = self._successes(records, result)
        self.stats.succeeded += len(to_delete)
        self.stats.failed += len(records) - len(to_delete)
        await self._delete(to_delete)
        log.info(
            "batch finished",
            extra={
                "records": len(records),
                "succeeded": len(to_delete),
                "failed": len(records) - len(to_delete),
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        if self.on_batch is not None:
            self.on_batch(records, result)

    def _deadline(self, handles: Sequence[str]) -> Deadline:
        """`batch_timeout` from now, with the margin before it; but the deletes after the
        batch need the receipt handles, so it ends a margin before the oldest message's
        12 hours are up (after them SQS shows it again whatever the heartbeat asks)."""
        now = time.monotonic()
        oldest = min((self._held[h].received_at for h in handles if h in self._held), default=now)
        left = MAX_VISIBILITY - (now - oldest)
        margin = self.margin
        if margin is None:  # Deadline's default, fixed here so that both limits use it
            margin = max(MIN_MARGIN, min(self.batch_timeout, left) * MARGIN_FRACTION)
        seconds = min(self.batch_timeout, left - margin)
        return Deadline.within(seconds, margin)

    async def _process(self, records: list[dict[str, Any]], deadline: Deadline) -> BatchResult:
        """`Notifier.process` within the deadline; if it overruns it anyway, it is cancelled
        and the whole batch fails, as when Lambda kills an invocation at its timeout."""
        try:
            async with asyncio.timeout(deadline.remaining_to_end() + KILL_GRACE) as scope:
                return await self.notifier.process(records, deadline=deadline)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and scope.expired():
                self.stats.overran += 1
                log.error(
                    "batch overran its deadline; every record will be retried",
                    extra={"records": len(records)},
                )
                return _failed_batch(records, "the batch overran its deadline")
            # Lambda retries the whole batch when the function raises; so do we.
            log.exception("batch raised; every record will be retried")
            return _failed_batch(records, f"{type(exc).__name__}: {exc}")

    def _successes(
        self, records: Sequence[dict[str, Any]], result: BatchResult
    ) -> list[dict[str, Any]]:
        """Records to delete, read from the partial batch response as Lambda reads it."""
        failed = {item["itemIdentifier"] for item in result.response()["batchItemFailures"]}
        known = {record["messageId"] for record in records}
        if not failed <= known:
            # Lambda treats a response naming an unknown (or empty) id as a failed batch.
            log.error("batch response names unknown records; retrying the whole batch")
            return []
        return [record for record in records if record["messageId"] not in failed]

    async def _delete(self, records: Sequence[dict[str, Any]]) -> None:
        await asyncio.gather(
            *(self._delete_chunk(chunk) for chunk in _chunks(records, MAX_ENTRIES_PER_DELETE))
        )

    async def _delete_chunk(self, records: Sequence[dict[str, Any]]) -> None:
        entries = [
            {"Id": str(index), "ReceiptHandle": record["receiptHandle"]}
            for index, record in enumerate(records)
        ]
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                response = await self.sqs.delete_message_batch(
                    QueueUrl=self.queue.url, Entries=entries
                )
        except Exception as exc:
            # The messages come back after their visibility timeout and are sent again
            # (same Message-ID); nothing is lost.
            self.stats.delete_failed += len(records)
            log.error(
                "delete failed",
                extra={
                    "messageIds": [r["messageId"] for r in records],
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )
            return
        self.stats.deleted += len(response.get("Successful", []))
        for failure in response.get("Failed", []):
            self.stats.delete_failed += 1
            record = records[int(failure["Id"])]
            log.error(
                "delete failed",
                extra={
                    "messageId": record["messageId"],
                    "code": failure.get("Code"),
                    "reason": failure.get("Message"),
                    "sender_fault": failure.get("SenderFault"),
                },
            )

    # -- the visibility heartbeat

    def _start_heartbeat(self) -> None:
        if self.visibility_timeout > 0:  # a queue with none gives nobody exclusivity anyway
            self._heartbeat = asyncio.create_task(self._beat_forever(), name=HEARTBEAT_TASK_NAME)

    async def _stop_heartbeat(self) -> None:
        """Cancel the heartbeat and wait until it is gone (a beat in flight is abandoned)."""
        task = self._heartbeat
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])
        self._heartbeat = None
        if not task.cancelled() and task.exception() is not None:
            log.error("visibility heartbeat crashed", exc_info=task.exception())

    async def _beat_forever(self) -> None:
        """Beat once the oldest held message is a period past its last extension (at once if
        the batch started later than that), then every period."""
        last_beat = -math.inf
        while True:
            now = time.monotonic()
            oldest = min((h.extended_at for h in self._held.values()), default=now)
            due = max(oldest, last_beat) + self.beat_period
            await asyncio.sleep(max(0.0, due - now))
            last_beat = time.monotonic()
            try:
                await self._beat()
            except Exception:  # never into the batch: the next beat tries again
                log.exception("visibility heartbeat failed")

    async def _beat(self) -> None:
        """Hide every held message for the full extension again, 10 per call, concurrently."""
        started = time.monotonic()
        due: list[tuple[_Held, int]] = []
        for held in self._held.values():
            # SQS refuses an extension that reaches past 12 h after the receive.
            left = math.floor(MAX_VISIBILITY - (started - held.received_at)) - 1
            if left > 0:
                due.append((held, min(self.extension, left)))
        await asyncio.gather(
            *(self._extend(chunk, started) for chunk in _chunks(due, MAX_ENTRIES_PER_DELETE))
        )

    async def _extend(self, chunk: Sequence[tuple[_Held, int]], started: float) -> None:
        entries = [
            {"Id": str(index), "ReceiptHandle": held.handle, "VisibilityTimeout": seconds}
            for index, (held, seconds) in enumerate(chunk)
        ]
        try:
            async with asyncio.timeout(self.beat_timeout):
                response = await self.sqs.change_message_visibility_batch(
                    QueueUrl=self.queue.url, Entries=entries
                )
        except Exception as exc:
            self.stats.extend_failed += len(chunk)
            log.warning(
                "visibility extension failed; retrying at the next beat",
                extra={
                    "messageIds": [h.message_id for h, _ in chunk],
                    "error": aws_error(exc).name,
                },
            )
            return
        for success in response.get("Successful", []):
            held, _ = chunk[int(success["Id"])]
            held.extended_at = started
            self.stats.extended += 1
        for failure in response.get("Failed", []):
            self.stats.extend_failed += 1
            held, _ = chunk[int(failure["Id"])]
            # Not failure["Message"]: SQS quotes the receipt handle in it.
            log.warning(
                "visibility extension failed; retrying at the next beat",
                extra={"messageId": held.message_id, "code": failure.get("Code")},
            )

    # -- shutdown

    async def close(self) -> None:
        """Stop the heartbeat, cancel the polls in flight and hand back every message
        received but not processed (buffered, or in a batch still being gathered)."""
        await self._stop_heartbeat()
        polls = list(self._polls)
        self._polls.clear()
        for task in polls:
            task.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
        # A poll that finished before the cancel has put its messages in `_held` already.
        leftover = [held.message for held in self._held.values()]
        self._held.clear()
        self._buffer.clear()
        if leftover:
            await self._release(leftover)

    async def _release(self, messages: Sequence[dict[str, Any]]) -> None:
        """Make unprocessed messages visible again at once instead of after their timeout."""
        await asyncio.gather(
            *(self._release_chunk(chunk) for chunk in _chunks(messages, MAX_ENTRIES_PER_DELETE))
        )

    async def _release_chunk(self, messages: Sequence[dict[str, Any]]) -> None:
        entries = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
            for i, m in enumerate(messages)
        ]
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                response = await self.sqs.change_message_visibility_batch(
                    QueueUrl=self.queue.url, Entries=entries
                )
        except Exception as exc:
            log.warning(
                "cannot release messages",
                extra={
                    "messageIds": [m.get("MessageId") for m in messages],
                    "error": aws_error(exc).name,
                },
            )
            return
        self.stats.released += len(response.get("Successful", []))


def _failed_batch(records: Sequence[Mapping[str, Any]], reason: str) -> BatchResult:
    error = TransientError(f"batch failed: {reason}")
    return BatchResult.of(Outcome(str(r["messageId"]), error=error) for r in records)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextlib.contextmanager
def stop_on_signals(
    stop: asyncio.Event, on_second: Callable[[], object] | None = None
) -> Iterator[None]:
    """SIGTERM/SIGINT set `stop` (finish the batch in flight); a second one calls `on_second`.

    Must be entered inside the running loop. Handlers are removed on exit.
    """
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)

    def handle(signum: int) -> None:
        if stop.is_set() and on_second is not None:
            log.warning("second signal: stopping now", extra={"signal": signum})
            on_second()
            return
        log.info("signal received: stopping after the batch in flight", extra={"signal": signum})
        stop.set()

    for signum in signals:
        loop.add_signal_handler(signum, handle, signum)
    try:
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def run_until_signal(work: Callable[[asyncio.Event], Awaitable[RunnerStats]]) -> RunnerStats:
    """Run `work(stop)` with SIGTERM/SIGINT wired to `stop`; a second signal cancels it."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(work(stop))
    with stop_on_signals(stop, on_second=task.cancel):
        return await task
