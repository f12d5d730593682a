"""The first entry point: videos' notifications to email.

`Notifier` keeps what outlives a batch (the settings, the compiled templates); the batch
itself is the processor's (`processor.py`). What is the notifier's is its `EmailHandler`:
each record's body parsed once, before the records run (the suppression list is read for
every address they name at once, within the cutoff), a scratch directory and a temp-disk
budget for the batch, each record delivered by `Delivery`, and the batch's metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import Settings
from ..deadline import Deadline
from ..logs import get_logger
from ..mail.render import Renderer
from ..messages import Notification, SqsRecord, parse_body
from ..ports import Adapters, Backend, PoolStats
from .delivery import Delivery, RecordDelivery
from .entry_point import BatchEntryPoint
from .outcome import BatchResult
from .report import metrics_from_batch
from .scratch import ByteBudget, ScratchDir
from .suppression import SuppressionCheck

log = get_logger()


class Notifier(BatchEntryPoint):
    def __init__(self, settings: Settings, backend: Backend) -> None:
        super().__init__(settings, backend)
        self.renderer = Renderer(settings.templates_dir, settings.default_locale)

    def handler(self, adapters: Adapters, deadline: Deadline | None) -> EmailHandler:
        return EmailHandler(self.settings, self.renderer, adapters, deadline)


class EmailHandler:
    """One batch of notifications (`processor.RecordHandler`)."""

    def __init__(
        self,
        settings: Settings,
        renderer: Renderer,
        adapters: Adapters,
        deadline: Deadline | None,
    ) -> None:
        self._settings = settings
        self._renderer = renderer
        self._adapters = adapters
        self._deadline = deadline
        self._scratch: ScratchDir | None = None
        self._delivery: Delivery | None = None
        # Each record's notification (or why its body is not one), by the record's identity:
        # two records may share a messageId, never an object.
        self._parsed: dict[int, Notification | Exception] = {}

    async def prepare(self, records: Sequence[SqsRecord]) -> None:
        s = self._settings
        addresses = set()
        for record in records:
            try:
                notification = parse_body(record.body)
            except Exception as exc:  # the record's error, raised when it runs
                self._parsed[id(record)] = exc
                continue
            self._parsed[id(record)] = notification
            if notification.email is not None:
                addresses.add(notification.email)
        store = self._adapters.suppression
        suppression = SuppressionCheck(store) if store is not None else None
        self._scratch = ScratchDir(s.tmp_dir, self._deadline)
        self._delivery = Delivery(
            s,
            self._renderer,
            self._adapters,
            self._scratch,
            budget=ByteBudget(s.max_tmp_bytes),
            deadline=self._deadline,
            suppression=suppression,
        )
        if suppression is not None:
            # Every address the records name, read at once (a slow list is cut off with
            # the rest of `prepare`: it must not eat the records' time).
            await suppression.preload(addresses)

    def start(self, record: SqsRecord) -> RecordDelivery:
        assert self._delivery is not None  # prepared
        return self._delivery.start(record, self._parsed.pop(id(record)))

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.close()

    def report(
        self,
        result: BatchResult,
        *,
        duration_s: float,
        pool: PoolStats,
        function_name: str | None,
    ) -> None:
        metrics_from_batch(
            result,
            duration_s=duration_s,
            pool=pool,
            namespace=self._settings.metrics_namespace,
            function_name=function_name,
        ).emit()
        log.info(
            "batch done",
            extra={
                "records": result.records,
                "failed": len(result.failures),
                "dead_lettered": len(result.dead_lettered),
            },
        )
