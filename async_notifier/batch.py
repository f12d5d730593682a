"""Run every record of a batch concurrently and collect one outcome per record.

A fixed number of workers pull work from the batch, so memory and tasks stay
bounded by MAX_CONCURRENCY whether the batch holds 10 records or 10,000. A
record's failure, expected or not, becomes its outcome; it never ends the batch.
On a FIFO queue the unit of work is a message group, processed in order and
stopped at its first failure; groups still run concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .deadline import Deadline
from .errors import (
    BadMessage,
    DeadlineExceeded,
    GroupBlocked,
    InternalError,
    NotifierError,
)
from .logs import get_logger
from .messages import SqsRecord

log = get_logger()


@dataclass(slots=True)
class RecordResult:
    """What processing one record produced, beyond success: for logs and metrics."""

    video_id: str | None = None
    status: str | None = None
    bytes: int = 0
    retries: int = 0
    action: str = "sent"  # sent | sent_link | duplicate | already_delivered
    maybe_delivered: bool = False  # cancelled after its message data went out


@dataclass(slots=True)
class Outcome:
    message_id: str
    error: NotifierError | None
    result: RecordResult
    duration: float
    record: SqsRecord | None = None
    dead_lettered: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def acknowledged(self) -> bool:
        """Delivered, or parked in the dead-letter queue: either way SQS may delete it."""
        return self.ok or self.dead_lettered


@dataclass
class Delivered:
    """What the successful records add up to: all that metrics and logs need of them.

    Successes are counted, not kept: a batch of 10,000 records holds outcomes only for the
    ones that failed, so memory does not grow with the batch size.
    """

    count: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    bytes_attached: int = 0  # ZIPs sent as attachments (not as links)
    retried: int = 0  # records that needed at least one retry
    retries: int = 0

    def add(self, outcome: Outcome) -> None:
        result = outcome.result
        self.count += 1
        self.actions[result.action] += 1
        if result.action == "sent":
            self.bytes_attached += result.bytes
        self.retried += result.retries > 0
        self.retries += result.retries


@dataclass
class BatchResult:
    """The outcome of every record that failed, in batch order, and the tally of the rest."""

    errors: list[Outcome] = field(default_factory=list)
    delivered: Delivered = field(default_factory=Delivered)

    @classmethod
    def of(cls, outcomes: Iterable[Outcome]) -> BatchResult:
        result = cls()
        for outcome in outcomes:
            if outcome.ok:
                result.delivered.add(outcome)
            else:
                result.errors.append(outcome)
        return result

    @property
    def records(self) -> int:
        return self.delivered.count + len(self.errors)

    @property
    def failures(self) -> list[Outcome]:
        """Records SQS must deliver again."""
        return [o for o in self.errors if not o.acknowledged]

    def response(self) -> dict[str, list[dict[str, str]]]:
        """The partial batch response Lambda expects with ReportBatchItemFailures.

        A record without a messageId (Lambda never sends one) is left out: an empty
        identifier would make Lambda retry the whole batch and resend every email in it.
        """
        failures = self.failures
        return {
            "batchItemFailures": [
                {"itemIdentifier": o.message_id} for o in failures if o.message_id
            ]
        }


Processor = Callable[[SqsRecord, RecordResult], Awaitable[None]]


async def run_batch(
    raw_records: Sequence[Any],
    process: Processor,
    *,
    concurrency: int,
    deadline: Deadline | None = None,
) -> BatchResult:
    result = BatchResult()
    errors: list[tuple[int, Outcome]] = []
    units = _work_units(raw_records)

    def record(index: int, outcome: Outcome) -> None:
        if outcome.ok:
            result.delivered.add(outcome)
        else:
            errors.append((index, outcome))

    async def worker() -> None:
        for unit in units:  # a shared iterator: each unit is taken once
            blocked: Outcome | None = None
            for index, raw in unit:
                if blocked is not None:
                    error = GroupBlocked(
                        f"earlier message {blocked.message_id} of its group failed"
                    )
                    record(index, _finish(raw, None, error, RecordResult(), 0.0))
                    continue
                outcome = await _run_one(raw, process, deadline)
                record(index, outcome)
                if not outcome.ok:
                    blocked = outcome

    workers = max(1, min(concurrency, len(raw_records)))
    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())
    errors.sort(key=lambda item: item[0])
    result.errors = [outcome for _, outcome in errors]
    return result


def is_fifo(raw_records: Sequence[Any]) -> bool:
    return any(
        isinstance(r, dict) and str(r.get("eventSourceARN", "")).endswith(".fifo")
        for r in raw_records
    )


def _work_units(raw_records: Sequence[Any]) -> Iterator[list[tuple[int, Any]]]:
    if not is_fifo(raw_records):
        return ([(i, raw)] for i, raw in enumerate(raw_records))
    groups: dict[object, list[tuple[int, Any]]] = {}
    for index, raw in enumerate(raw_records):
        attributes = raw.get("attributes") if isinstance(raw, dict) else None
        group = attributes.get("MessageGroupId") if isinstance(attributes, dict) else None
        groups.setdefault(group if isinstance(group, str) else ("ungrouped", index), []).append(
            (index, raw)
        )
    return iter(list(groups.values()))


async def _run_one(raw: Any, process: Processor, deadline: Deadline | None) -> Outcome:
    started = time.monotonic()
    result = RecordResult()
    record: SqsRecord | None = None
    error: NotifierError | None = None
    try:
        record = SqsRecord.from_event(raw)
        if deadline is None:
            await process(record, result)
        elif deadline.expired():
            raise DeadlineExceeded("not started: the invocation ran out of time")
        else:
            try:
                async with asyncio.timeout_at(deadline.cutoff) as scope:
                    await process(record, result)
            except TimeoutError:
                if not scope.expired():
                    raise
                raise DeadlineExceeded("cancelled: the invocation ran out of time") from None
    except NotifierError as exc:
        error = exc
    except Exception as exc:
        log.exception("unexpected error", extra={"messageId": _message_id(raw)})
        error = InternalError(f"{type(exc).__name__}: {exc}")
    return _finish(raw, record, error, result, time.monotonic() - started)


def _message_id(raw: Any) -> str:
    message_id = raw.get("messageId") if isinstance(raw, dict) else None
    return message_id if isinstance(message_id, str) else ""


def _finish(
    raw: Any,
    record: SqsRecord | None,
    error: NotifierError | None,
    result: RecordResult,
    duration: float,
) -> Outcome:
    if record is None and isinstance(raw, dict):
        with contextlib.suppress(NotifierError):
            record = SqsRecord.from_event(raw)
    # Only a failure needs its record later (dead-letter queue, retry back-off).
    outcome = Outcome(_message_id(raw), error, result, duration, record if error else None)
    _log_outcome(outcome)
    return outcome


def _log_outcome(outcome: Outcome) -> None:
    fields: dict[str, Any] = {
        "messageId": outcome.message_id,
        "video_id": outcome.result.video_id,
        "status": outcome.result.status,
        "outcome": outcome.result.action if outcome.ok else "failed",
        "bytes": outcome.result.bytes,
        "retries": outcome.result.retries,
        "duration_ms": round(outcome.duration * 1000, 1),
    }
    if outcome.error is None:
        log.info("record done", extra=fields)
        return
    if outcome.result.maybe_delivered:
        fields["maybe_delivered"] = True  # ambiguous: the server may have accepted it
    fields.update(
        error_class=outcome.error.kind,
        transient=outcome.error.transient,
        reason=outcome.error.reason,
    )
    level = 30 if isinstance(outcome.error, BadMessage) else 40
    log.log(level, "record failed", extra=fields)
