"""One batch, start to end: deliver every record, settle each one's fate, report.

The notifier is the core's top. It is handed a `ports.Backend` (the SMTP and AWS adapters;
`wiring.py` makes the real ones) and keeps what outlives a batch: the settings and the
compiled templates. Each batch gets its own scratch directory (removed before it returns).
After the records, every failure gets its fate from `disposition` (the same for the
Lambda handler and the SQS runner): dead letters are copied, retries get their back-off,
within what is left until the deadline's end.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..after_cutoff import AfterCutoff
from ..config import Settings
from ..deadline import Deadline
from ..logs import configure, get_logger
from ..mail.render import Renderer
from ..ports import Adapters, Backend
from .delivery import Delivery
from .disposition import Policy, disposition
from .outcome import BatchResult, DeadLetter, Disposition, Retry
from .report import metrics_from_batch
from .scratch import ByteBudget, ScratchDir
from .workers import run_batch

log = get_logger()


class Notifier:
    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.renderer = Renderer(settings.templates_dir, settings.default_locale)
        self.policy = Policy.from_settings(settings)
        configure(settings.log_level)

    async def prepare(self) -> None:
        """Make the clients now, connecting nothing: Lambda's init phase, off the clock of
        the first invocation."""
        await self.backend.prepare()

    def forget_secrets(self) -> None:
        self.backend.forget_secrets()

    async def aclose(self) -> None:
        """Close the clients and QUIT the pooled SMTP connections."""
        await self.backend.aclose()

    async def __aenter__(self) -> Notifier:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def handle(self, event: Any, context: Any = None) -> dict[str, list[dict[str, str]]]:
        """Process one Lambda SQS event; return the partial batch response."""
        deadline = Deadline.from_context(context, self.settings.deadline_margin)
        function_name = getattr(context, "function_name", None)
        result = await self.process(_records(event), deadline=deadline, function_name=function_name)
        return result.response()

    async def process(
        self,
        records: list[Any],
        *,
        deadline: Deadline | None = None,
        function_name: str | None = None,
    ) -> BatchResult:
        """Run one batch and settle it; emit its metrics (CloudWatch EMF), log its summary."""
        if not records:
            return BatchResult()
        started = time.monotonic()
        s = self.settings
        adapters = await self.backend.open(connections=len(records))
        try:
            with ScratchDir(s.tmp_dir, deadline) as scratch:
                delivery = Delivery(
                    s,
                    self.renderer,
                    adapters,
                    scratch,
                    budget=ByteBudget(s.max_tmp_bytes),
                    deadline=deadline,
                )
                result = await run_batch(records, delivery.deliver, concurrency=s.max_concurrency)
        finally:
            pool_stats = await adapters.transport.finish_batch(
                until=deadline.end if deadline else None
            )
        result.fates = await self._settle(result, adapters, deadline)
        metrics_from_batch(
            result,
            duration_s=time.monotonic() - started,
            connections_opened=pool_stats.connections_opened,
            circuit_opened=pool_stats.circuit_opened,
            namespace=s.metrics_namespace,
            function_name=function_name or os.environ.get("AWS_LAMBDA_FUNCTION_NAME"),
        ).emit()
        log.info(
            "batch done",
            extra={
                "records": len(records),
                "failed": len(result.failures),
                "dead_lettered": len(result.dead_lettered),
            },
        )
        return result

    async def _settle(
        self, result: BatchResult, adapters: Adapters, deadline: Deadline | None
    ) -> list[Disposition]:
        """Each failure's fate, carried out: dead letters copied (one that did not arrive
        stays in the queue as a retry), then retries given their back-off.

        Both run after the records, within what is left until `deadline.end` (see
        `AfterCutoff`); without time left no call is made, not even the client is made.
        """
        fates = [disposition(o, self.policy) for o in result.errors]
        letters = [
            (i, o)
            for i, (o, f) in enumerate(zip(result.errors, fates, strict=True))
            if isinstance(f, DeadLetter)
        ]
        budget = AfterCutoff(deadline)
        feedback = None
        if budget.remaining() > 0 and any(
            isinstance(f, DeadLetter) or (isinstance(f, Retry) and f.delay is not None)
            for f in fates
        ):
            feedback = await adapters.feedback()
        if letters:
            routed: set[str] = set()
            if feedback is not None:
                items = [(o.record, o.error) for _, o in letters if o.record and o.error]
                routed = await feedback.dead_letter(items, budget)
            for i, outcome in letters:
                if outcome.message_id not in routed:
                    fates[i] = disposition(outcome, self.policy, dead_letter_failed=True)
        delays = [
            (o.record, f.delay)
            for o, f in zip(result.errors, fates, strict=True)
            if isinstance(f, Retry) and f.delay is not None and o.record is not None
        ]
        if delays and feedback is not None:
            await feedback.delay(delays, budget)
        return fates


def _records(event: Any) -> list[Any]:
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list):
        log.warning("event has no Records list; nothing to do")
        return []
    return records
