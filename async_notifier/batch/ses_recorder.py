"""The second entry point's batch: SES bounce and complaint notifications, remembered.

Each SQS record carries one SES notification (`ses_events.py`); its address events are
written to the suppression list, and the record's fate is decided like any other
(`disposition`): a malformed or foreign notification is a bad message, an unreachable
table a transient failure. The worker then never mails a suppressed address again.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from typing import Any

from ..config import Settings
from ..deadline import Deadline
from ..errors import DeadlineExceeded, NotifierError
from ..logs import get_logger
from ..messages import SqsRecord
from ..metrics import InvocationMetrics
from ..ports import Backend, SuppressionList
from ..ses_events import AddressEvent, parse_ses_event
from .entry_point import BatchEntryPoint
from .outcome import BatchResult, Outcome
from .settle import settle
from .workers import run_batch

log = get_logger()


class SesEventsRecorder(BatchEntryPoint):
    """Records SES events in the suppression list; handed its adapters like `Notifier`."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        if not settings.suppression_table:
            raise ValueError("SES events are recorded in SUPPRESSION_TABLE, which is not set")
        super().__init__(settings, backend)

    async def process(
        self,
        records: list[Any],
        *,
        deadline: Deadline | None = None,
        function_name: str | None = None,
    ) -> BatchResult:
        if not records:
            return BatchResult()
        started = time.monotonic()
        adapters = await self.backend.open(connections=0)
        store = adapters.suppression
        assert store is not None  # SUPPRESSION_TABLE is set (checked at start)
        counts = {"hard": 0, "soft": 0, "complaints": 0}

        async def record_one(raw: Any) -> Outcome:
            message_id = raw.get("messageId", "") if isinstance(raw, dict) else ""
            record: SqsRecord | None = None
            try:
                record = SqsRecord.from_event(raw)
                events = parse_ses_event(record.body)
                await _within(deadline, _record(store, events))
            except NotifierError as error:
                return Outcome(str(message_id), error=error, record=record)
            for event in events:
                key = (
                    "complaints" if event.kind == "complaint" else "hard" if event.hard else "soft"
                )
                counts[key] += 1
            return Outcome(str(message_id), action="recorded")

        try:
            result = await run_batch(records, record_one, concurrency=self.settings.max_concurrency)
        finally:
            await adapters.transport.finish_batch(until=deadline.end if deadline else None)
        result.fates = await settle(result, adapters, self.policy, deadline)
        metrics = InvocationMetrics(
            self.settings.metrics_namespace,
            dimensions={"FunctionName": name}
            if (name := function_name or os.environ.get("AWS_LAMBDA_FUNCTION_NAME"))
            else None,
        )
        metrics.set("SesEventsReceived", result.records, "Count")
        metrics.set("SesEventsFailed", len(result.errors), "Count")
        metrics.set("HardBounces", counts["hard"], "Count")
        metrics.set("SoftBounces", counts["soft"], "Count")
        metrics.set("Complaints", counts["complaints"], "Count")
        metrics.set("InvocationDuration", (time.monotonic() - started) * 1000, "Milliseconds")
        metrics.emit()
        log.info("ses events recorded", extra={"records": len(records), **counts})
        return result


async def _record(store: SuppressionList, events: list[AddressEvent]) -> None:
    if events:
        await store.record(events)


async def _within(deadline: Deadline | None, work: Coroutine[Any, Any, None]) -> None:
    if deadline is None:
        await work
        return
    if deadline.expired():
        work.close()
        raise DeadlineExceeded("not started: the invocation ran out of time")
    try:
        async with asyncio.timeout_at(deadline.cutoff) as scope:
            await work
    except TimeoutError:
        if not scope.expired():
            raise
        raise DeadlineExceeded("cancelled: the invocation ran out of time") from None
