"""Run every record of a batch concurrently and collect one outcome per record.

A fixed number of workers pull records from the batch, so memory and tasks stay
bounded by MAX_CONCURRENCY whether the batch holds 10 records or 10,000. A
record's failure, expected or not, becomes its outcome; it never ends the batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import BadMessage, NotifierError
from .logs import get_logger
from .messages import SqsRecord

log = get_logger()


@dataclass
class RecordResult:
    """What processing one record produced, beyond success: for logs and metrics."""

    video_id: str | None = None
    status: str | None = None
    bytes: int = 0


@dataclass(frozen=True)
class Outcome:
    message_id: str
    error: NotifierError | None
    result: RecordResult
    duration: float

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class BatchResult:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def response(self) -> dict[str, list[dict[str, str]]]:
        """The partial batch response Lambda expects with ReportBatchItemFailures."""
        return {"batchItemFailures": [{"itemIdentifier": o.message_id} for o in self.failures]}


Processor = Callable[[SqsRecord, RecordResult], Awaitable[None]]


class _InternalError(NotifierError):
    """A bug, not the record's fault: retried, and logged with its traceback."""

    transient = True
    kind = "internal"


async def run_batch(
    raw_records: Sequence[Any], process: Processor, *, concurrency: int
) -> BatchResult:
    outcomes: list[Outcome | None] = [None] * len(raw_records)
    queue: Iterable[tuple[int, Any]] = iter(enumerate(raw_records))

    async def worker() -> None:
        for index, raw in queue:  # a shared iterator: each record is taken once
            outcomes[index] = await _run_one(raw, process)

    workers = max(1, min(concurrency, len(raw_records)))
    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())
    return BatchResult([o for o in outcomes if o is not None])


async def _run_one(raw: Any, process: Processor) -> Outcome:
    started = time.monotonic()
    result = RecordResult()
    message_id = raw.get("messageId") if isinstance(raw, dict) else None
    error: NotifierError | None = None
    try:
        record = SqsRecord.from_event(raw)
        await process(record, result)
    except NotifierError as exc:
        error = exc
    except Exception as exc:
        log.exception("unexpected error", extra={"messageId": message_id})
        error = _InternalError(f"{type(exc).__name__}: {exc}")
    outcome = Outcome(
        message_id=message_id if isinstance(message_id, str) else "",
        error=error,
        result=result,
        duration=time.monotonic() - started,
    )
    _log_outcome(outcome)
    return outcome


def _log_outcome(outcome: Outcome) -> None:
    fields: dict[str, Any] = {
        "messageId": outcome.message_id,
        "video_id": outcome.result.video_id,
        "status": outcome.result.status,
        "outcome": "sent" if outcome.ok else "failed",
        "bytes": outcome.result.bytes,
        "duration_ms": round(outcome.duration * 1000, 1),
    }
    if outcome.error is None:
        log.info("record sent", extra=fields)
        return
    fields.update(
        error_class=outcome.error.kind,
        transient=outcome.error.transient,
        reason=outcome.error.reason,
    )
    level = 30 if isinstance(outcome.error, BadMessage) else 40
    log.log(level, "record failed", extra=fields)
