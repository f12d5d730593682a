"""Run every record of a batch concurrently and collect one outcome per record.

A fixed number of workers pull work from the batch, so memory and tasks stay
bounded by MAX_CONCURRENCY whether the batch holds 10 records or 10,000. A
record's failure, expected or not, becomes its outcome; it never ends the batch.
On a FIFO queue the unit of work is a message group, processed in order and
stopped at its first failure; groups still run concurrently.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from ..errors import BadMessage, GroupBlocked, InternalError, NotifierError
from ..logs import get_logger
from ..messages import SqsRecord
from .outcome import BatchResult, Outcome

log = get_logger()

Deliver = Callable[[Any], Awaitable[Outcome]]


async def run_batch(
    raw_records: Sequence[Any], deliver: Deliver, *, concurrency: int
) -> BatchResult:
    """Every record's outcome; the failures in batch order."""
    result = BatchResult()
    errors: list[tuple[int, Outcome]] = []
    units = _work_units(raw_records)

    def record(index: int, outcome: Outcome) -> None:
        _log_outcome(outcome)
        if outcome.ok:
            result.add(outcome)
        else:
            errors.append((index, outcome))

    async def worker() -> None:
        for unit in units:  # a shared iterator: each unit is taken once
            blocked: Outcome | None = None
            for index, raw in unit:
                if blocked is not None:
                    reason = f"earlier message {blocked.message_id} of its group failed"
                    record(index, _blocked(raw, reason))
                    continue
                outcome = await _guarded(deliver, raw)
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


async def _guarded(deliver: Deliver, raw: Any) -> Outcome:
    """A delivery returns its outcome; one that raises is a bug, and still only one record's."""
    try:
        return await deliver(raw)
    except Exception as exc:
        log.exception("unexpected error", extra={"messageId": _message_id(raw)})
        return Outcome(
            _message_id(raw),
            error=InternalError(f"{type(exc).__name__}: {exc}"),
            record=_record(raw),
        )


def _blocked(raw: Any, reason: str) -> Outcome:
    return Outcome(_message_id(raw), error=GroupBlocked(reason), record=_record(raw))


def _message_id(raw: Any) -> str:
    message_id = raw.get("messageId") if isinstance(raw, dict) else None
    return message_id if isinstance(message_id, str) else ""


def _record(raw: Any) -> SqsRecord | None:
    try:
        return SqsRecord.from_event(raw)
    except NotifierError:
        return None


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
