"""One batch, start to end: deliver every record, settle each one's fate, report.

The notifier is the core's top. It is handed a `ports.Backend` (the SMTP and AWS adapters;
`wiring.py` makes the real ones) and keeps what outlives a batch: the settings and the
compiled templates. Each batch gets its own scratch directory (removed before it returns).
After the records, every failure gets its fate from `disposition` (the same for the
Lambda handler and the SQS runner): dead letters are copied, retries get their back-off,
within what is left until the deadline's end; only then do the pool's retiring connections
say QUIT, with whatever time remains.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from ..config import Settings
from ..deadline import Deadline
from ..errors import NotifierError, ProviderCondition
from ..logs import get_logger
from ..mail.render import Renderer
from ..messages import SqsRecord, parse_body
from ..ports import Adapters, Backend
from .delivery import Delivery
from .entry_point import BatchEntryPoint
from .outcome import BatchResult, Outcome
from .report import metrics_from_batch
from .scratch import ByteBudget, ScratchDir
from .settle import settle
from .suppression import SuppressionCheck
from .workers import run_batch

log = get_logger()


class Notifier(BatchEntryPoint):
    def __init__(self, settings: Settings, backend: Backend) -> None:
        super().__init__(settings, backend)
        self.renderer = Renderer(settings.templates_dir, settings.default_locale)

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
            held = adapters.transport.held()
            if held is not None:
                result = held_back(records, held)
            else:
                result = await self._deliver(records, adapters, deadline)
            # Dead letters and back-off first: saying QUIT is a courtesy, done with what
            # time remains.
            result.fates = await settle(result, adapters, self.policy, deadline)
        finally:
            pool_stats = await adapters.transport.finish_batch(
                until=deadline.end if deadline else None
            )
        metrics_from_batch(
            result,
            duration_s=time.monotonic() - started,
            pool=pool_stats,
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

    async def _deliver(
        self, records: list[Any], adapters: Adapters, deadline: Deadline | None
    ) -> BatchResult:
        s = self.settings
        suppression = await self._suppression(records, adapters, deadline)
        with ScratchDir(s.tmp_dir, deadline) as scratch:
            delivery = Delivery(
                s,
                self.renderer,
                adapters,
                scratch,
                budget=ByteBudget(s.max_tmp_bytes),
                deadline=deadline,
                suppression=suppression,
            )
            return await run_batch(records, delivery.deliver, concurrency=s.max_concurrency)

    async def _suppression(
        self, records: list[Any], adapters: Adapters, deadline: Deadline | None
    ) -> SuppressionCheck | None:
        """The batch's suppression check, with every address the records name read at once
        (within the cutoff: a slow list must not eat the records' time)."""
        if adapters.suppression is None:
            return None
        check = SuppressionCheck(adapters.suppression)
        addresses = set()
        for raw in records:
            body = raw.get("body") if isinstance(raw, dict) else None
            with contextlib.suppress(NotifierError):
                email = parse_body(body).email if isinstance(body, str) else None
                if email is not None:
                    addresses.add(email)
        cutoff = deadline.cutoff if deadline is not None else None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(cutoff):
                await check.preload(addresses)
        return check


def held_back(records: list[Any], held: ProviderCondition) -> BatchResult:
    """The whole batch sent back untouched: a provider-wide condition holds (the relay is
    down, the daily quota is spent, the login or the sender is refused), so no record is
    attempted, and each comes back when the pool will try again (`held.retry_after`)."""
    log.warning(
        "provider condition holds: batch sent back without an attempt",
        extra={
            "records": len(records),
            "condition": held.condition,
            "reason": held.reason,
            "retry_in": round(held.retry_after, 1),
        },
    )
    outcomes = []
    for raw in records:
        try:
            record: SqsRecord | None = SqsRecord.from_event(raw)
        except NotifierError:
            record = None
        message_id = record.message_id if record else ""
        outcomes.append(Outcome(message_id, error=held, record=record))
    return BatchResult.of(outcomes)
