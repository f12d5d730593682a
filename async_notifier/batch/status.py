"""A batch's delivery statuses: each record's decided fate as a status, written alongside.

The status is a consequence of the fate `disposition` decides, never a decision of its own:
`status_of` reads a record's outcome and fate (an acknowledged send is `accepted`, a dead
letter `dead_lettered` or `expired`, a permanent failure left in the queue `failed`, a
suppressed recipient `suppressed`; a transient failure that will be retried says nothing
yet). The SES events function's records carry the status SES reported (`Outcome.reported`).

`StatusWriter` never holds a send back: `add` only queues the change, and one background
task writes the queue to the store (STATUS_TABLE) while the records go on, a few calls at
a time, then publishes what changed to the topic (STATUS_TOPIC_ARN) in batches. The
worker's verdicts go in batches (`StatusStore.write_batch`, 25 a call): the writer lets a
batch fill for a moment (`LINGER`) unless the queue already holds one or the batch is
settled. SES's changes go one by one (`write`), since the event told back for each says
whether it became the status. Each call
has the time limit of the work after the cutoff (`AfterCutoff`); a write that fails is tried
again a bounded number of times, then counted (`StatusWriteFailed`) and logged, and after
several changes in a row have failed the writer stops trying for the batch (a store that is
down must not cost every record its retries). When the batch is settled, `close` gives
what is still queued a few seconds, no more; whatever does not fit is counted as failed.
Nothing here fails a record.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

from ..after_cutoff import AfterCutoff, OutOfTime
from ..deadline import Deadline
from ..delivery_status import State, StatusChange, epoch_ms, status_event
from ..errors import Expired, RecipientSuppressed, redact
from ..logs import get_logger
from ..ports import StatusStore, StatusTopic
from .outcome import Ack, DeadLetter, Disposition, Outcome, StatusCounts

log = get_logger()

#: Writes in flight at once: few, so that they never crowd out the DynamoDB calls a send
#: waits for (idempotency claims, the suppression list) on the shared client.
CONCURRENCY = 4
#: Tries per change (botocore's own retries come on top of each).
ATTEMPTS = 3
RETRY_DELAY = 0.05  # seconds before the second try; doubling
#: Changes in a row whose every try failed before the writer gives up for the batch.
GIVE_UP_AFTER = 3
#: Seconds `close` gives what is still queued once the batch is settled.
DRAIN_SECONDS = 5.0
#: Seconds the writer waits for a batch of the worker's verdicts to fill.
LINGER = 0.25


def status_of(outcome: Outcome, fate: Disposition, *, now: float) -> StatusChange | None:
    """The status a record's decided fate means, or None when it means none (yet)."""
    if outcome.reported is not None:  # SES's word, recorded once its record is done
        return outcome.reported if isinstance(fate, Ack) else None
    tracking_id, error = outcome.tracking_id, outcome.error
    if tracking_id is None:  # its body was never a notification
        return None
    state: State
    reason: str | None = None
    if isinstance(fate, Ack):
        if outcome.receipt is None:  # a duplicate, or delivered earlier: nothing new
            return None
        state = "accepted"
    elif error is None:
        return None
    elif isinstance(fate, DeadLetter):
        if isinstance(fate.error, Expired):
            state = "expired"
        elif isinstance(error, RecipientSuppressed):
            state = "suppressed"
        else:
            state = "dead_lettered"
        reason = fate.reason
    elif error.transient:  # retried: the next attempt will say
        return None
    else:  # permanent, and left in the queue (no dead-letter queue, or its copy failed)
        state = "suppressed" if isinstance(error, RecipientSuppressed) else "failed"
        reason = f"{error.kind}: {error.reason}"
    receipt = outcome.receipt
    return StatusChange(
        tracking_id=tracking_id,
        state=state,
        at_ms=epoch_ms(now),
        source="worker",
        event_id=f"{state}:{outcome.message_id}:{outcome.attempt}",
        video_id=outcome.video_id,
        notification_id=outcome.notification_id,
        reason=reason,
        provider_id=receipt.provider_id if receipt is not None else None,
        transport=receipt.transport if receipt is not None else None,
        attempt=outcome.attempt,
    )


class StatusWriter:
    """Writes one batch's status changes in the background (see the module's docstring)."""

    def __init__(
        self,
        store: StatusStore | None,
        topic: StatusTopic | None,
        deadline: Deadline | None,
        *,
        concurrency: int = CONCURRENCY,
        attempts: int = ATTEMPTS,
        retry_delay: float = RETRY_DELAY,
        drain_seconds: float = DRAIN_SECONDS,
        linger: float = LINGER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._topic = topic
        self._deadline = deadline
        self._concurrency = concurrency
        self._attempts = attempts
        self._retry_delay = retry_delay
        self._drain_seconds = drain_seconds
        self._linger = linger
        self._batch_size = store.max_batch if store is not None else 1
        self.clock = clock
        self.counts = StatusCounts(active=store is not None or topic is not None)
        self._pending: collections.deque[StatusChange] = collections.deque()
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._failed_in_row = 0
        self._writing = 0  # changes taken from the queue and not yet counted
        self._publishing = 0  # events taken from the queue and not yet counted

    @property
    def active(self) -> bool:
        return self.counts.active

    def add(self, change: StatusChange | None) -> None:
        """Queue a change (None: nothing to record); the writer starts on the first."""
        if change is None or not self.active or self._closing:
            return
        self._pending.append(change)
        # Woken for the first change, a full batch, or one that goes alone: not for every
        # verdict while a batch fills (2,000 wake-ups of a batch that takes 80 calls).
        queued = len(self._pending)
        if queued == 1 or queued >= self._batch_size or not self._batched(change):
            self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Let the queue drain, for `drain_seconds` at most (and never past the deadline's
        end); what is left is counted as failed. Never raises."""
        self._closing = True
        self._wake.set()
        task = self._task
        if task is None:
            return
        limit = min(self._drain_seconds, AfterCutoff(self._deadline).remaining())
        try:
            # The writer's own end (a bug included) is read by `_retrieve`, not raised here.
            _, running = await asyncio.wait({task}, timeout=max(limit, 0.0))
            if running:
                log.warning(
                    "status writes left undone",
                    extra={
                        "changes": len(self._pending) + self._writing,
                        "events": len(self._events),
                    },
                )
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop at once (the batch is over or cancelled): what is queued counts as failed."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()  # a no-op once it is done
            task.add_done_callback(_retrieve)
        self.counts.failed += len(self._pending) + self._writing
        self.counts.publish_failed += len(self._events) + self._publishing
        self._pending.clear()
        self._events.clear()
        self._writing = self._publishing = 0

    async def _run(self) -> None:
        while True:
            if self._pending:
                await self._let_fill()
                calls = self._take_calls()
                self._writing += sum(len(group) for group in calls)
                await asyncio.gather(*(self._write(group) for group in calls))
            topic = self._topic
            if topic is not None:
                # Full batches as they fill; the rest once nothing is waiting to be written.
                while len(self._events) >= topic.max_batch or (self._events and not self._pending):
                    await self._publish(topic)
            if self._pending:
                continue
            if self._closing:
                return
            self._wake.clear()
            await self._wake.wait()

    def _batched(self, change: StatusChange) -> bool:
        return self._store is not None and change.source == "worker"

    async def _let_fill(self) -> None:
        """Wait `linger` seconds at most for a full batch of the worker's verdicts (not
        when closing: what is queued then is all there will be)."""
        if not self._batched(self._pending[0]):
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + self._linger
        while len(self._pending) < self._batch_size and not self._closing:
            self._wake.clear()
            try:
                async with asyncio.timeout(until - loop.time()):
                    await self._wake.wait()
            except TimeoutError:
                return

    def _take_calls(self) -> list[list[StatusChange]]:
        """The next calls (`concurrency` at most): a batch of the worker's verdicts, or one
        change of SES's. A batch short of `max_batch` goes only as the first call (the
        linger is over) or when closing: otherwise a short tail waits for more."""
        calls: list[list[StatusChange]] = []
        size = self._batch_size
        while self._pending and len(calls) < self._concurrency:
            short = len(self._pending) < size and self._batched(self._pending[0])
            if calls and short and not self._closing:
                break
            group = [self._pending.popleft()]
            if self._batched(group[0]):
                while self._pending and len(group) < size and self._batched(self._pending[0]):
                    group.append(self._pending.popleft())
            calls.append(group)
        return calls

    async def _write(self, group: list[StatusChange]) -> None:
        if len(group) == 1 and not self._batched(group[0]):
            events = [await self._try_write(group[0])]
        else:
            events = await self._try_write_batch(group)
        self._writing -= len(group)  # not reached when cancelled: `abort` counts them failed
        self._events.extend(event for event in events if event is not None)

    async def _try_write_batch(self, group: list[StatusChange]) -> list[dict[str, Any] | None]:
        """Write the worker's verdicts, trying what is left unwritten again; the events to
        publish for those written (their own state is their status: the store is not read)."""
        store = self._store
        assert store is not None
        left = group
        problem = "given up for this batch"
        for attempt in range(self._attempts):
            if self._failed_in_row >= GIVE_UP_AFTER:
                break
            try:
                write = functools.partial(store.write_batch, left)
                left = await AfterCutoff(self._deadline).call(write)
            except OutOfTime as exc:
                problem = str(exc)
                break
            except Exception as exc:  # any failure is the store's: counted, never raised
                problem = f"{type(exc).__name__}: {redact(str(exc))[:300]}"
            else:
                self._failed_in_row = 0
                if not left:
                    break
                problem = f"{len(left)} left unprocessed by DynamoDB"
            if attempt + 1 < self._attempts:
                await asyncio.sleep(self._retry_delay * 2**attempt)
        unwritten = {id(change) for change in left}
        self.counts.written += len(group) - len(unwritten)
        if unwritten:
            self._failed_in_row += 1
            self.counts.failed += len(unwritten)
            log.warning(
                "status writes failed",
                extra={"changes": len(unwritten), "error": problem},
            )
        if self._topic is None:
            return []
        return [status_event(change) for change in group if id(change) not in unwritten]

    async def _try_write(self, change: StatusChange) -> dict[str, Any] | None:
        """Write one change; the event to publish for it, if there is one to publish."""
        store = self._store
        if store is None:  # a topic without a table: every change is news
            return status_event(change) if self._topic is not None else None
        problem = "given up for this batch"
        for attempt in range(self._attempts):
            if self._failed_in_row >= GIVE_UP_AFTER:
                break
            try:
                write = await AfterCutoff(self._deadline).call(lambda: store.write(change))
            except OutOfTime as exc:
                problem = str(exc)
                break
            except Exception as exc:  # any failure is the store's: counted, never raised
                problem = f"{type(exc).__name__}: {redact(str(exc))[:300]}"
                if attempt + 1 < self._attempts:
                    await asyncio.sleep(self._retry_delay * 2**attempt)
                continue
            self._failed_in_row = 0
            if write.result == "duplicate":
                self.counts.duplicates += 1
                return None
            self.counts.written += 1
            if not write.known and change.source == "ses":
                self.counts.unknown += 1
                log.info(
                    "status for a notification the table does not know yet",
                    extra={"tracking_id": change.tracking_id, "state": change.state},
                )
            return status_event(change, write) if self._topic is not None else None
        self._failed_in_row += 1
        self.counts.failed += 1
        log.warning(
            "status write failed",
            extra={"tracking_id": change.tracking_id, "state": change.state, "error": problem},
        )
        return None

    async def _publish(self, topic: StatusTopic) -> None:
        size = min(topic.max_batch, len(self._events))
        events = [self._events.popleft() for _ in range(size)]
        self._publishing = size
        refused = size
        for attempt in range(self._attempts):
            try:
                result = await AfterCutoff(self._deadline).call(lambda: topic.publish(events))
            except OutOfTime:
                break
            except Exception as exc:
                log.warning(
                    "status publish failed",
                    extra={"events": size, "error": f"{type(exc).__name__}: {exc}"[:300]},
                )
                if attempt + 1 < self._attempts:
                    await asyncio.sleep(self._retry_delay * 2**attempt)
                continue
            refused = result
            break
        self._publishing = 0  # not reached when cancelled: `abort` counts them as failed
        self.counts.published += size - refused
        self.counts.publish_failed += refused


def _retrieve(task: asyncio.Task[None]) -> None:
    """Read a stopped writer's end, so that asyncio never reports it as unretrieved."""
    with contextlib.suppress(asyncio.CancelledError):
        error = task.exception()
        if error is not None:
            log.error("status writer failed", exc_info=error)
