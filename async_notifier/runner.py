"""Consume an SQS queue outside Lambda, the way Lambda's SQS event source mapping does.

The worker has to run in a container, on a VM and in `make run-local` with exactly the batch
code Lambda runs, so this module does only what the event source mapping does: long-poll with
several receives in flight, gather a batch up to a size or a time window, shape each message
like a Lambda SQS record, call `Notifier.process`, delete the successes and leave the failures
to come back after their visibility timeout (and reach the dead-letter queue after
`maxReceiveCount` receives). One SQS client serves the whole run: aiobotocore clients belong
to the event loop that opened them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .app import Notifier
from .batch import BatchResult, Outcome, RecordResult
from .config import Settings
from .errors import TransientError
from .logs import get_logger

log = get_logger()

MAX_MESSAGES_PER_RECEIVE = 10  # SQS's limit for ReceiveMessage
MAX_ENTRIES_PER_DELETE = 10  # and for DeleteMessageBatch / ChangeMessageVisibilityBatch
MAX_WAIT_TIME = 20  # SQS's limit for WaitTimeSeconds
MAX_POLLERS = 10
DRAIN_CHECK_INTERVAL = 1.0
_EMPTY_ATTRIBUTES = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)

BatchCallback = Callable[[list[dict[str, Any]], BatchResult], None]


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
    drained: bool = False


@dataclass(frozen=True)
class QueueInfo:
    url: str
    arn: str

    @property
    def region(self) -> str:
        """The region Lambda puts in `awsRegion`: the queue's, from its ARN."""
        return self.arn.split(":")[3]


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
    import aioboto3
    from aiobotocore.config import AioConfig

    config = AioConfig(
        max_pool_connections=pollers + MAX_POLLERS,
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=wait_time + 20,  # a long poll must not look like a dead server
    )
    return aioboto3.Session().client(
        "sqs",
        region_name=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        config=config,
    )


async def run(
    settings: Settings,
    queue_url: str,
    *,
    batch_size: int = 100,
    batch_window: float = 1.0,
    wait_time: int = MAX_WAIT_TIME,
    drain: bool = False,
    max_batches: int | None = None,
    pollers: int | None = None,
    stop: asyncio.Event | None = None,
    on_batch: BatchCallback | None = None,
    notifier: Notifier | None = None,
) -> RunnerStats:
    """Consume `queue_url` until `stop` is set, `max_batches` ran, or (with `drain`) it is empty.

    `stop` ends the run after the batch being processed; no receive starts after it is set.
    `on_batch(records, result)` sees every batch after its deletes (run-local's report).
    """
    if not 1 <= batch_size <= 10_000:
        raise ValueError("batch_size must be between 1 and 10000")
    if not 0 <= wait_time <= MAX_WAIT_TIME:
        raise ValueError(f"wait_time must be between 0 and {MAX_WAIT_TIME}")
    if batch_window < 0:
        raise ValueError("batch_window must not be negative")
    if max_batches is not None and max_batches < 1:
        raise ValueError("max_batches must be at least 1")
    if pollers is None:
        pollers = min(MAX_POLLERS, math.ceil(batch_size / MAX_MESSAGES_PER_RECEIVE))
    if pollers < 1:
        raise ValueError("pollers must be at least 1")
    own_notifier = notifier is None
    notifier = notifier or Notifier(settings)
    stop = stop or asyncio.Event()
    async with sqs_client(settings, pollers=pollers, wait_time=wait_time) as sqs:
        response = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
        queue = QueueInfo(queue_url, response["Attributes"]["QueueArn"])
        consumer = _Consumer(
            sqs,
            queue,
            notifier,
            batch_size=batch_size,
            batch_window=batch_window,
            wait_time=wait_time,
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
                "pollers": pollers,
                "drain": drain,
            },
        )
        try:
            await consumer.consume()
        finally:
            await consumer.close()
            if own_notifier:
                await notifier.aclose()  # the warm S3 client and SMTP pool
        stats = consumer.stats
    log.info("runner stopped", extra=vars(stats))
    return stats


class _Consumer:
    """The receive → process → delete loop of one run."""

    def __init__(
        self,
        sqs: Any,
        queue: QueueInfo,
        notifier: Notifier,
        *,
        batch_size: int,
        batch_window: float,
        wait_time: int,
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
        self.drain = drain
        self.max_batches = max_batches
        self.max_pollers = pollers
        self.stop = stop
        self.on_batch = on_batch
        self.stats = RunnerStats()
        # Receives in flight, each with the number of messages it asked for. A poll still
        # running when a batch closes is kept: its messages start the next batch, so no
        # received message is dropped on the floor while the worker is alive.
        self._polls: dict[asyncio.Task[list[dict[str, Any]] | None], int] = {}
        self._buffer: list[dict[str, Any]] = []
        self._backoff = 0.0

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
        """Collect up to batch_size messages; the window opens with the first message."""
        loop = asyncio.get_running_loop()
        batch = self._take(self.batch_size)
        deadline = loop.time() + self.batch_window if batch else None
        stop_wait = asyncio.ensure_future(self.stop.wait())
        try:
            while len(batch) < self.batch_size and not self.stop.is_set():
                now = loop.time()
                if deadline is not None and now >= deadline:
                    break
                # Before the first message a poll may wait the full wait_time; after it, no
                # longer than the window (rounded up to SQS's whole seconds).
                wait = self.wait_time
                if deadline is not None:
                    wait = min(wait, math.ceil(deadline - now))
                self._top_up(self.batch_size - len(batch), wait)
                timeout = None if deadline is None else deadline - now
                if self.drain and not batch:
                    timeout = DRAIN_CHECK_INTERVAL
                done, _ = await asyncio.wait(
                    [*self._polls, stop_wait],
                    timeout=timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                came_back_empty = False
                for task in [t for t in self._polls if t in done]:
                    del self._polls[task]
                    messages = task.result()
                    if messages is None:
                        continue  # failed and already backed off
                    if not messages:
                        came_back_empty = True
                    room = self.batch_size - len(batch)
                    batch.extend(messages[:room])
                    self._buffer.extend(messages[room:])
                if batch and deadline is None:
                    deadline = loop.time() + self.batch_window
                nothing_came = came_back_empty or not done
                if self.drain and not batch and nothing_came and await self._queue_is_empty():
                    self.stats.drained = True
                    break
        finally:
            stop_wait.cancel()
        return batch

    def _take(self, count: int) -> list[dict[str, Any]]:
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        return taken

    def _top_up(self, room: int, wait: int) -> None:
        """Start receives until those in flight could fill the room left in the batch."""
        if self.stop.is_set():
            return
        asked = sum(self._polls.values()) + len(self._buffer)
        while len(self._polls) < self.max_pollers and asked < room:
            count = min(MAX_MESSAGES_PER_RECEIVE, room - asked)
            task = asyncio.create_task(self._receive(count, wait))
            self._polls[task] = count
            asked += count

    async def _receive(self, count: int, wait: int) -> list[dict[str, Any]] | None:
        """One ReceiveMessage; None after a failure (logged, then backed off)."""
        try:
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
            log.warning(
                "receive failed",
                extra={"error": f"{type(exc).__name__}: {exc}", "retry_in": self._backoff},
            )
            await asyncio.sleep(self._backoff)
            return None
        self._backoff = 0.0
        messages: list[dict[str, Any]] = response.get("Messages", [])
        return messages

    async def _queue_is_empty(self) -> bool:
        """Nothing visible, in flight (failures waiting out their timeout) or delayed."""
        try:
            response = await self.sqs.get_queue_attributes(
                QueueUrl=self.queue.url, AttributeNames=list(_EMPTY_ATTRIBUTES)
            )
        except Exception as exc:
            log.warning("cannot read queue attributes", extra={"error": str(exc)})
            return False
        attributes = response.get("Attributes", {})
        return all(int(attributes.get(name, 0)) == 0 for name in _EMPTY_ATTRIBUTES)

    # -- processing

    async def _handle(self, messages: list[dict[str, Any]]) -> None:
        records = [lambda_record(m, self.queue) for m in messages]
        self.stats.batches += 1
        self.stats.received += len(records)
        started = time.monotonic()
        try:
            result = await self.notifier.process(records)
        except Exception as exc:
            # Lambda retries the whole batch when the function raises; so do we.
            log.exception("batch raised; every record will be retried")
            result = _failed_batch(records, f"{type(exc).__name__}: {exc}")
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
            response = await self.sqs.delete_message_batch(QueueUrl=self.queue.url, Entries=entries)
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

    # -- shutdown

    async def close(self) -> None:
        """Cancel the polls in flight and hand back messages received but not processed."""
        polls = list(self._polls)
        self._polls.clear()
        for task in polls:
            task.cancel()
        results = await asyncio.gather(*polls, return_exceptions=True)
        for result in results:
            if isinstance(result, list):  # finished just before the cancel
                self._buffer.extend(result)
        leftover, self._buffer = self._buffer, []
        if leftover:
            await self._release(leftover)

    async def _release(self, messages: Sequence[dict[str, Any]]) -> None:
        """Make unprocessed messages visible again at once instead of after their timeout."""
        for chunk in _chunks(messages, MAX_ENTRIES_PER_DELETE):
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                for i, m in enumerate(chunk)
            ]
            try:
                response = await self.sqs.change_message_visibility_batch(
                    QueueUrl=self.queue.url, Entries=entries
                )
            except Exception as exc:
                log.warning("cannot release messages", extra={"error": str(exc)})
                continue
            self.stats.released += len(response.get("Successful", []))


def _failed_batch(records: Sequence[Mapping[str, Any]], reason: str) -> BatchResult:
    error = TransientError(f"batch failed: {reason}")
    return BatchResult.of(Outcome(str(r["messageId"]), error, RecordResult(), 0.0) for r in records)


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
