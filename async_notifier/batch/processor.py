"""One batch, for every entry point: from the SQS records to the settled `BatchResult`.

The processor owns a record's life; what differs per entry point (delivering an email,
recording an SES event) is its `RecordHandler`. Each raw record is parsed once into an
`SqsRecord` (one that cannot be becomes its own outcome, never reaching the handler); the
handler prepares the batch (within the cutoff), then the records run in an anyio task group
of at most MAX_CONCURRENCY workers, each record under the cutoff as a cancel scope (one
still running when it passes is cancelled and fails with `DeadlineExceeded`). On a FIFO
queue the unit of work is a message group, run in order and stopped at its first failure.
A record's failure, expected or not, becomes its outcome; it never ends the batch, and a
batch of 10,000 good records keeps counts, not outcomes (`BatchResult`).

What must follow the records runs in shielded scopes bounded by the deadline's end: each
record's own (its idempotency claim), then each failure's fate (`settle.py`: dead letters,
back-off), then what is left of the delivery statuses (`status.py`: each acknowledged
record's was queued as it finished and written alongside the others; the failures' follow
from their fates, with a few seconds at most), then the transport's `finish_batch` (QUIT):
settling comes first, saying QUIT is a courtesy done with what time remains. Then the
handler reports (metrics, summary log).

anyio's clock is the event loop's (`anyio.current_time()`, loop.time()); a `Deadline` is on
`time.monotonic()`. They are the same clock on asyncio, but the scopes convert anyway.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from ..after_cutoff import WITHOUT_DEADLINE
from ..deadline import Deadline
from ..errors import (
    BadMessage,
    DeadlineExceeded,
    GroupBlocked,
    InternalError,
    NotifierError,
    ProviderCondition,
)
from ..logs import get_logger
from ..messages import SqsRecord, message_id_of
from ..ports import Adapters, Backend, PoolStats
from .disposition import Policy, disposition
from .outcome import Action, BatchResult, Outcome
from .settle import settle, unsettled
from .status import StatusWriter, status_of

log = get_logger()

#: Seconds past the deadline's end before a shielded scope stops what still runs in it.
#: A backstop: every call after the cutoff has its own budget that ends at `end`
#: (`AfterCutoff`) and logs what it leaves undone; the scope only stops what ignores it.
BACKSTOP = 0.1


class RecordWork(Protocol):
    """One record's work, made by its handler (`RecordHandler.start`); the processor runs it."""

    async def run(self) -> Action:
        """The record's work, under the cutoff: cancelled when the cutoff passes."""
        ...

    async def finish(self, error: NotifierError | None) -> None:
        """What must follow the record, however it ended (`error`: None when it succeeded),
        in a shielded scope, each call within `AfterCutoff`; never raises."""
        ...

    def annotate(self, outcome: Outcome) -> None:
        """Add to the record's outcome what the work found out (video id, bytes, retries...)."""
        ...


class RecordHandler(Protocol):
    """What an entry point does with one batch's records; made for that batch."""

    async def prepare(self, records: Sequence[SqsRecord]) -> None:
        """Before any record starts, under the cutoff: what the whole batch needs at once
        (e.g. the bodies parsed, the suppression list read). Cut off, the records still run."""
        ...

    def start(self, record: SqsRecord) -> RecordWork: ...

    def close(self) -> None:
        """Release what the batch held (a scratch directory), once its records are over."""
        ...

    def report(
        self,
        result: BatchResult,
        *,
        duration_s: float,
        pool: PoolStats,
        function_name: str | None,
    ) -> None:
        """The settled batch's metrics and summary log."""
        ...


MakeHandler = Callable[[Adapters, Deadline | None], RecordHandler]
RunRecord = Callable[[SqsRecord], Awaitable[Outcome]]


class BatchProcessor:
    """Runs every batch of one entry point on the adapters its backend opens."""

    def __init__(self, backend: Backend, policy: Policy, *, concurrency: int) -> None:
        self.backend = backend
        self.policy = policy
        self.concurrency = concurrency

    async def process(
        self,
        raw_records: Sequence[Any],
        handler_for: MakeHandler,
        *,
        deadline: Deadline | None = None,
        function_name: str | None = None,
    ) -> BatchResult:
        """Run one batch and settle it; the handler reports it."""
        if not raw_records:
            return BatchResult()
        started = time.monotonic()
        adapters = await self.backend.open(connections=len(raw_records))
        pool = PoolStats()
        status = StatusWriter(adapters.status_store, adapters.status_topic, deadline)
        try:
            handler = handler_for(adapters, deadline)
            batch = Batch.parse(raw_records)
            transport = adapters.transport
            held = transport.held() if transport is not None else None
            if held is not None:
                result = held_back(batch, held)
            else:
                try:
                    result = await self._run(batch, handler, deadline, status)
                finally:
                    handler.close()
            with anyio.CancelScope(shield=True, deadline=_after_end(deadline)) as scope:
                result.fates = await settle(result, adapters, self.policy, deadline)
            if scope.cancelled_caught:
                result.fates = unsettled(result, self.policy)
            if status.active:
                # The failures' statuses follow from their fates, now decided.
                now = status.clock()
                for outcome, fate in result.settled():
                    status.add(status_of(outcome, fate, now=now))
                with anyio.CancelScope(shield=True, deadline=_after_end(deadline)):
                    await status.close()
            result.status = status.counts
        finally:
            status.abort()
            if adapters.transport is not None:
                with anyio.CancelScope(shield=True, deadline=_after_end(deadline)):
                    pool = await adapters.transport.finish_batch(
                        until=deadline.end if deadline else None
                    )
        handler.report(
            result,
            duration_s=time.monotonic() - started,
            pool=pool,
            function_name=function_name or os.environ.get("AWS_LAMBDA_FUNCTION_NAME"),
        )
        return result

    async def _run(
        self,
        batch: Batch,
        handler: RecordHandler,
        deadline: Deadline | None,
        status: StatusWriter,
    ) -> BatchResult:
        with anyio.CancelScope(deadline=_cutoff(deadline)):
            await handler.prepare(batch.records)

        async def one(record: SqsRecord) -> Outcome:
            outcome = await run_record(handler.start(record), record, deadline)
            if outcome.ok and status.active:  # acknowledged: its status is known now
                status.add(status_of(outcome, disposition(outcome, self.policy), now=time.time()))
            return outcome

        return await run_batch(batch, one, concurrency=self.concurrency)


async def run_record(work: RecordWork, record: SqsRecord, deadline: Deadline | None) -> Outcome:
    """One record's outcome: its work under the cutoff, then what must follow it, shielded."""
    started = time.monotonic()
    action: Action | None = None
    error: NotifierError | None = None
    try:
        action = await _within_cutoff(work.run, deadline)
    except NotifierError as exc:
        error = exc
    except Exception as exc:
        log.exception("unexpected error", extra={"messageId": record.message_id})
        error = InternalError(f"{type(exc).__name__}: {exc}")
    except anyio.get_cancelled_exc_class():  # the whole batch was cancelled from outside
        with anyio.CancelScope(shield=True):
            await work.finish(DeadlineExceeded("cancelled"))
        raise
    with anyio.CancelScope(shield=True):
        await work.finish(error)
    outcome = Outcome(
        record.message_id,
        error=error,
        action=action if error is None else None,
        # Only a failure needs its record later (dead-letter queue, retry back-off).
        record=record if error is not None else None,
        attempt=record.receive_count,
    )
    work.annotate(outcome)
    outcome.duration = time.monotonic() - started
    return outcome


async def _within_cutoff(run: Callable[[], Awaitable[Action]], deadline: Deadline | None) -> Action:
    if deadline is None:
        return await run()
    if deadline.expired():
        raise DeadlineExceeded("not started: the invocation ran out of time")
    with anyio.CancelScope(deadline=_cutoff(deadline)):
        return await run()
    raise DeadlineExceeded("cancelled: the invocation ran out of time")


# --------------------------------------------------------------------------- the records


@dataclass
class Batch:
    """A batch's records, each parsed once: its `SqsRecord`, or the outcome of one that is
    not an SQS record (`BadMessage`, kept under its messageId when it has one)."""

    entries: list[SqsRecord | Outcome]
    groups: list[list[int]] | None  # a FIFO queue's message groups (indices), in order

    @classmethod
    def parse(cls, raw_records: Sequence[Any]) -> Batch:
        entries: list[SqsRecord | Outcome] = []
        for raw in raw_records:
            try:
                entries.append(SqsRecord.from_event(raw))
            except BadMessage as error:
                entries.append(Outcome(message_id_of(raw), error=error))
        return cls(entries, _fifo_groups(raw_records))

    @property
    def records(self) -> list[SqsRecord]:
        return [e for e in self.entries if isinstance(e, SqsRecord)]

    def units(self) -> Iterator[list[int]]:
        """The units of work: a message group on a FIFO queue, else each record alone."""
        if self.groups is None:
            return ([i] for i in range(len(self.entries)))
        return iter(self.groups)


def is_fifo(raw_records: Sequence[Any]) -> bool:
    return any(
        isinstance(r, dict) and str(r.get("eventSourceARN", "")).endswith(".fifo")
        for r in raw_records
    )


def _fifo_groups(raw_records: Sequence[Any]) -> list[list[int]] | None:
    if not is_fifo(raw_records):
        return None
    groups: dict[object, list[int]] = {}
    for index, raw in enumerate(raw_records):
        attributes = raw.get("attributes") if isinstance(raw, dict) else None
        group = attributes.get("MessageGroupId") if isinstance(attributes, dict) else None
        groups.setdefault(group if isinstance(group, str) else ("ungrouped", index), []).append(
            index
        )
    return list(groups.values())


async def run_batch(batch: Batch, run: RunRecord, *, concurrency: int) -> BatchResult:
    """Every record's outcome, from at most `concurrency` workers in one task group (memory
    and tasks stay bounded whether the batch holds 10 records or 10,000); the failures in
    batch order."""
    result = BatchResult()
    errors: list[tuple[int, Outcome]] = []
    units = batch.units()

    def record(index: int, outcome: Outcome) -> None:
        _log_outcome(outcome)
        if outcome.ok:
            result.add(outcome)
        else:
            errors.append((index, outcome))

    async def worker() -> None:
        for unit in units:  # a shared iterator: each unit is taken once
            blocked: Outcome | None = None
            for index in unit:
                entry = batch.entries[index]
                if blocked is not None:
                    reason = f"earlier message {blocked.message_id} of its group failed"
                    record(index, _blocked(entry, reason))
                    continue
                outcome = entry if isinstance(entry, Outcome) else await _guarded(run, entry)
                record(index, outcome)
                if not outcome.ok:
                    blocked = outcome

    workers = max(1, min(concurrency, len(batch.entries)))
    async with anyio.create_task_group() as group:
        for _ in range(workers):
            group.start_soon(worker)
    errors.sort(key=lambda item: item[0])
    result.errors = [outcome for _, outcome in errors]
    return result


async def _guarded(run: RunRecord, record: SqsRecord) -> Outcome:
    """A record's run returns its outcome; one that raises is a bug, and still only one
    record's."""
    try:
        return await run(record)
    except Exception as exc:
        log.exception("unexpected error", extra={"messageId": record.message_id})
        return Outcome(
            record.message_id, error=InternalError(f"{type(exc).__name__}: {exc}"), record=record
        )


def _blocked(entry: SqsRecord | Outcome, reason: str) -> Outcome:
    record = entry if isinstance(entry, SqsRecord) else None
    return Outcome(entry.message_id, error=GroupBlocked(reason), record=record)


def held_back(batch: Batch, held: ProviderCondition) -> BatchResult:
    """The whole batch sent back untouched: a provider-wide condition holds (the relay is
    down, the daily quota is spent, the login or the sender is refused), so no record is
    attempted, and each comes back when the pool will try again (`held.retry_after`)."""
    log.warning(
        "provider condition holds: batch sent back without an attempt",
        extra={
            "records": len(batch.entries),
            "condition": held.condition,
            "reason": held.reason,
            "retry_in": round(held.retry_after, 1),
        },
    )
    return BatchResult.of(
        Outcome(e.message_id, error=held, record=e if isinstance(e, SqsRecord) else None)
        for e in batch.entries
    )


def _log_outcome(outcome: Outcome) -> None:
    fields: dict[str, Any] = {
        "messageId": outcome.message_id,
        "video_id": outcome.video_id,
        "status": outcome.status,
        "outcome": outcome.action if outcome.ok else "failed",
        "bytes": outcome.bytes,
        "retries": outcome.retries,
        "duration_ms": round(outcome.duration * 1000, 1),
    }
    if outcome.error is None:
        if outcome.receipt is not None:
            fields["transport"] = outcome.receipt.transport
            fields["provider_id"] = outcome.receipt.provider_id
        log.info("record done", extra=fields)
        return
    if outcome.maybe_delivered:
        fields["maybe_delivered"] = True  # ambiguous: the server may have accepted it
    fields.update(
        error_class=outcome.error.kind,
        transient=outcome.error.transient,
        reason=outcome.error.reason,
    )
    level = 30 if isinstance(outcome.error, BadMessage) else 40
    log.log(level, "record failed", extra=fields)


# --------------------------------------------------------------------------- clocks


def _loop_time(monotonic: float) -> float:
    """A `time.monotonic()` instant on anyio's clock (the event loop's)."""
    return anyio.current_time() + (monotonic - time.monotonic())


def _cutoff(deadline: Deadline | None) -> float:
    return math.inf if deadline is None else _loop_time(deadline.cutoff)


def _after_end(deadline: Deadline | None) -> float:
    """When a shielded scope after the records stops: the deadline's end (or, without one,
    the time `AfterCutoff` gives), and the backstop."""
    end = deadline.end if deadline is not None else time.monotonic() + WITHOUT_DEADLINE
    return _loop_time(end) + BACKSTOP
