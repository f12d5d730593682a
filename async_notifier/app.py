"""The notifier: what lives for the process, and what one invocation opens and closes.

Settings and compiled templates live as long as the process. Each batch gets one
S3 client, one SMTP pool and one scratch directory, shared by all its records,
and releases them (QUIT, files removed) before it returns. After the records,
permanent failures go to the dead-letter queue and the rest get a retry back-off.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from .batch import BatchResult, run_batch
from .config import Settings
from .deadline import Deadline
from .logs import configure, get_logger
from .pipeline import Pipeline
from .render import Renderer
from .smtp_pool import SmtpPool
from .storage import ByteBudget, ObjectStore, ScratchDir

log = get_logger()


class Notifier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.renderer = Renderer(settings.templates_dir, settings.default_locale)
        configure(settings.log_level)

    async def handle(self, event: Any, context: Any = None) -> dict[str, list[dict[str, str]]]:
        """Process one Lambda SQS event; return the partial batch response."""
        deadline = Deadline.from_context(context, self.settings.deadline_margin)
        result = await self.process(_records(event), deadline=deadline)
        return result.response()

    async def process(self, records: list[Any], *, deadline: Deadline | None = None) -> BatchResult:
        if not records:
            return BatchResult()
        async with self._pipeline(deadline) as pipeline:
            result = await run_batch(
                records,
                pipeline.process,
                concurrency=self.settings.max_concurrency,
                deadline=deadline,
            )
        await self._feedback(result)
        log.info(
            "batch done",
            extra={
                "records": len(records),
                "failed": len(result.failures),
                "dead_lettered": sum(o.dead_lettered for o in result.outcomes),
            },
        )
        return result

    @contextlib.asynccontextmanager
    async def _pipeline(self, deadline: Deadline | None) -> AsyncIterator[Pipeline]:
        s = self.settings
        async with contextlib.AsyncExitStack() as stack:
            s3 = await stack.enter_async_context(aws_client("s3", s))
            idempotency = None
            if s.idempotency_table:
                from .idempotency import DynamoIdempotencyStore

                dynamodb = await stack.enter_async_context(aws_client("dynamodb", s))
                idempotency = DynamoIdempotencyStore(
                    dynamodb, s.idempotency_table, ttl_seconds=s.idempotency_ttl
                )
            pool = await stack.enter_async_context(SmtpPool(s))
            scratch = stack.enter_context(ScratchDir(s.tmp_dir))
            store = ObjectStore(
                s3, chunk_size=s.download_chunk_bytes, allowed_buckets=s.allowed_buckets
            )
            yield Pipeline(
                s,
                self.renderer,
                store,
                pool,
                scratch,
                budget=ByteBudget(s.max_tmp_bytes),
                deadline=deadline,
                idempotency=idempotency,
            )

    async def _feedback(self, result: BatchResult) -> None:
        """Dead-letter the permanent failures, then slow down the retries of the rest."""
        s = self.settings
        permanent = [o for o in result.failures if o.error and not o.error.transient and o.record]
        if not (s.dead_letter_queue_url and permanent) and not (
            s.retry_backoff and result.failures
        ):
            return
        from .sqs_feedback import DeadLetterRouter, VisibilityBackoff

        async with aws_client("sqs", s) as sqs:
            if s.dead_letter_queue_url and permanent:
                router = DeadLetterRouter(sqs, s.dead_letter_queue_url)
                routed = await router.route(
                    [(o.record, o.error) for o in permanent if o.record and o.error]
                )
                for outcome in permanent:
                    outcome.dead_lettered = outcome.message_id in routed
            if s.retry_backoff:
                retry = [o.record for o in result.failures if o.record is not None]
                if retry:
                    await VisibilityBackoff(sqs, endpoint_url=s.aws_endpoint_url).apply(retry)


def aws_client(service: str, settings: Settings) -> Any:
    """An aiobotocore client with a connection pool sized for the record concurrency."""
    import aioboto3
    from aiobotocore.config import AioConfig

    config = AioConfig(
        max_pool_connections=settings.max_concurrency,
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=min(10.0, settings.s3_timeout),
        read_timeout=settings.s3_timeout,
    )
    return aioboto3.Session().client(
        service,
        region_name=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        config=config,
    )


def s3_client(settings: Settings) -> Any:
    return aws_client("s3", settings)


def _records(event: Any) -> list[Any]:
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list):
        log.warning("event has no Records list; nothing to do")
        return []
    return records
