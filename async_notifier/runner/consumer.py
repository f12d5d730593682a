"""The receive -> process -> delete loop of one run, as Lambda's event source mapping runs it.

Long polls gather a batch up to its size or time window; the batch is processed within its
deadline; the successes are deleted and the failures left to come back after their
visibility timeout. At the end of a run, messages received but never processed are made
visible again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any, Protocol

from ..aws.errors import aws_error
from ..batch.outcome import BatchResult, Outcome
from ..deadline import MARGIN_FRACTION, MIN_MARGIN, Deadline
from ..errors import TransientError
from ..logs import get_logger
from .heartbeat import VisibilityHeartbeat
from .limits import (
    CALL_TIMEOUT,
    MAX_MESSAGES_PER_RECEIVE,
    MAX_VISIBILITY,
    MAX_WAIT_TIME,
    RECEIVE_GRACE,
    chunks,
)
from .records import QueueInfo, lambda_record
from .stats import RunnerStats

log = get_logger()

DRAIN_CHECK_INTERVAL = 1.0
# A batch that ignores its deadline is cancelled this long after the deadline's end, as
# Lambda kills an invocation at its timeout.
KILL_GRACE = 1.0
_EMPTY_ATTRIBUTES = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)

BatchCallback = Callable[[list[dict[str, Any]], BatchResult], None]


class BatchWorker(Protocol):
    """What the runner hands each batch to: `Notifier` (emails) or `SesEventsRecorder`."""

    async def check_secrets(self) -> None:
        """Before the first receive: ConfigError on an SMTP secret no login can use."""
        ...

    async def process(
        self,
        records: list[Any],
        *,
        deadline: Deadline | None = None,
        function_name: str | None = None,
    ) -> BatchResult: ...

    def held_for(self) -> float:
        """Seconds a provider-wide condition still holds (0: none)."""
        ...


class Consumer:
    """The receive → process → delete loop of one run."""

    def __init__(
        self,
        sqs: Any,
        queue: QueueInfo,
        notifier: BatchWorker,
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
        self.heartbeat = VisibilityHeartbeat(
            sqs, queue.url, visibility_timeout=visibility_timeout, stats=self.stats
        )
        # Receives in flight, each with the number of messages it asked for. None is left
        # running while a batch is processed: a receive would hide messages nobody works on.
        self._polls: dict[asyncio.Task[list[dict[str, Any]] | None], int] = {}
        # Received but not in a batch yet: what a window's last polls brought beyond its size.
        self._buffer: list[dict[str, Any]] = []
        self._backoff = 0.0
        self._retry_at = 0.0  # after a failed receive, none starts before this (loop time)

    async def consume(self) -> None:
        while not self.stop.is_set():
            if await self._held_back():
                continue
            messages = await self._gather()
            if messages:
                await self._handle(messages)
            if self.stats.drained:
                return
            if self.max_batches is not None and self.stats.batches >= self.max_batches:
                return

    # -- back-pressure

    async def _held_back(self) -> bool:
        """While a provider-wide condition holds (the relay is down, the daily quota spent,
        the login refused...), receive nothing: what is received could only go back. The
        wait ends when the pool will try again; the next batch is its probe. True when it
        waited (or `stop` was set meanwhile)."""
        if self._buffer:  # received already: those go through the batch (and back at once)
            return False
        wait = self.notifier.held_for()
        if wait <= 0:
            return False
        self.stats.paused += 1
        self.stats.paused_seconds += wait
        log.info("provider condition holds: not receiving", extra={"resume_in": round(wait, 1)})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self.stop.wait()
        return True

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
        self._backoff = 0.0
        messages: list[dict[str, Any]] = response.get("Messages", [])
        self.heartbeat.hold(messages)
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
        self.heartbeat.start()
        try:
            result = await self._process(records, deadline)
        finally:
            await self.heartbeat.stop()
            self.heartbeat.let_go(handles)  # deleted below, or left to come back
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
        oldest = self.heartbeat.oldest_receive(handles) or now
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
        await asyncio.gather(*(self._delete_chunk(chunk) for chunk in chunks(records)))

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

    # -- shutdown

    async def close(self) -> None:
        """Stop the heartbeat, cancel the polls in flight and hand back every message
        received but not processed (buffered, or in a batch still being gathered)."""
        await self.heartbeat.stop()
        polls = list(self._polls)
        self._polls.clear()
        for task in polls:
            task.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
        # A poll that finished before the cancel has put its messages in the heartbeat already.
        leftover = self.heartbeat.take_all()
        self._buffer.clear()
        if leftover:
            await self._release(leftover)

    async def _release(self, messages: Sequence[dict[str, Any]]) -> None:
        """Make unprocessed messages visible again at once instead of after their timeout."""
        await asyncio.gather(*(self._release_chunk(chunk) for chunk in chunks(messages)))

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
