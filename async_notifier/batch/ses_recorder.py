"""The second entry point's batch: SES notifications, remembered.

Each SQS record carries one SES notification (`ses_events.py`); its address events are
written to the suppression list, and the record's fate is decided like any other
(`disposition`): a malformed or foreign notification is a bad message, an unreachable
table a transient failure. The worker then never mails a suppressed address again. The
delivery status the notification reports (delivered, delayed, bounced, complained,
rejected) rides on the record's outcome and is written once the record is acknowledged
(`status.py`, with STATUS_TABLE); an event whose email carries no tracking tag is counted
(`StatusEventsUntracked`), not an error. The batch is the processor's (`processor.py`);
what is this entry point's is `SesEventHandler`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ..config import Settings
from ..deadline import Deadline
from ..delivery_status import StatusChange
from ..errors import NotifierError
from ..logs import get_logger
from ..messages import SqsRecord
from ..metrics import InvocationMetrics
from ..ports import Adapters, Backend, PoolStats, SuppressionList
from ..ses_events import parse_ses_notification
from .entry_point import BatchEntryPoint
from .outcome import Action, BatchResult, Outcome
from .report import add_status_metrics

log = get_logger()


class SesEventsRecorder(BatchEntryPoint):
    """Records SES events in the suppression list; handed its adapters like `Notifier`."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        if not settings.suppression_table:
            raise ValueError("SES events are recorded in SUPPRESSION_TABLE, which is not set")
        super().__init__(settings, backend)

    def handler(self, adapters: Adapters, deadline: Deadline | None) -> SesEventHandler:
        store = adapters.suppression
        assert store is not None  # SUPPRESSION_TABLE is set (checked at start)
        return SesEventHandler(self.settings, store)


class SesEventHandler:
    """One batch of SES notifications (`processor.RecordHandler`)."""

    def __init__(self, settings: Settings, store: SuppressionList) -> None:
        self._settings = settings
        self._store = store
        self.counts: Counter[str] = Counter({"hard": 0, "soft": 0, "complaints": 0, "untracked": 0})
        # SES's events that say what became of an accepted email (docs/delivery-status.md).
        self.events: Counter[str] = Counter({"Delivery": 0, "DeliveryDelay": 0, "Reject": 0})

    async def prepare(self, records: Sequence[SqsRecord]) -> None:
        """Nothing the whole batch needs: each record is parsed when it runs."""

    def start(self, record: SqsRecord) -> RecordEvents:
        return RecordEvents(self, record)

    def close(self) -> None:
        pass

    def report(
        self,
        result: BatchResult,
        *,
        duration_s: float,
        pool: PoolStats,
        function_name: str | None,
    ) -> None:
        counts = self.counts
        metrics = InvocationMetrics(
            self._settings.metrics_namespace,
            dimensions={"FunctionName": function_name} if function_name else None,
        )
        metrics.set("SesEventsReceived", result.records, "Count")
        metrics.set("SesEventsFailed", len(result.errors), "Count")
        metrics.set("HardBounces", counts["hard"], "Count")
        metrics.set("SoftBounces", counts["soft"], "Count")
        metrics.set("Complaints", counts["complaints"], "Count")
        metrics.set("Deliveries", self.events["Delivery"], "Count")
        metrics.set("DeliveryDelays", self.events["DeliveryDelay"], "Count")
        metrics.set("Rejects", self.events["Reject"], "Count")
        add_status_metrics(metrics, result.status)
        if result.status.active:
            metrics.set("StatusEventsUntracked", counts["untracked"], "Count")
        metrics.set("InvocationDuration", duration_s * 1000, "Milliseconds")
        metrics.emit()
        log.info("ses events recorded", extra={"records": result.records, **counts})


class RecordEvents:
    """One record's SES events, written to the suppression list (`processor.RecordWork`)."""

    def __init__(self, handler: SesEventHandler, record: SqsRecord) -> None:
        self._handler = handler
        self._record = record
        self._status: StatusChange | None = None

    async def run(self) -> Action:
        notification = parse_ses_notification(self._record.body)
        events = notification.addresses
        if events:
            await self._handler._store.record(events)
        counts = self._handler.counts
        for event in events:
            kind = "complaints" if event.kind == "complaint" else "hard" if event.hard else "soft"
            counts[kind] += 1
        self._status = notification.status
        if notification.event_type in self._handler.events:
            self._handler.events[notification.event_type] += 1
        if notification.untracked:
            counts["untracked"] += 1
            log.info(
                "ses event for no tracked notification",
                extra={"messageId": self._record.message_id, "event": notification.event_type},
            )
        return "recorded"

    async def finish(self, error: NotifierError | None) -> None:
        """Nothing follows a record: writing it is all (its status is the processor's)."""

    def annotate(self, outcome: Outcome) -> None:
        outcome.reported = self._status
