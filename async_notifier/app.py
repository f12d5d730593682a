"""The notifier: what lives for the process, and what one invocation opens and closes.

Settings and compiled templates live as long as the process. Each batch gets one
S3 client, one SMTP pool and one scratch directory, shared by all its records,
and releases them (QUIT, files removed) before it returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from .batch import BatchResult, run_batch
from .config import Settings
from .logs import configure, get_logger
from .pipeline import Pipeline
from .render import Renderer
from .smtp_pool import SmtpPool
from .storage import ObjectStore, ScratchDir

log = get_logger()


class Notifier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.renderer = Renderer(settings.templates_dir, settings.default_locale)
        configure(settings.log_level)

    async def handle(self, event: Any) -> dict[str, list[dict[str, str]]]:
        """Process one Lambda SQS event; return the partial batch response."""
        result = await self.process(_records(event))
        return result.response()

    async def process(self, records: list[Any]) -> BatchResult:
        if not records:
            return BatchResult()
        async with self._pipeline() as pipeline:
            result = await run_batch(
                records, pipeline.process, concurrency=self.settings.max_concurrency
            )
        log.info(
            "batch done",
            extra={"records": len(records), "failed": len(result.failures)},
        )
        return result

    @contextlib.asynccontextmanager
    async def _pipeline(self) -> AsyncIterator[Pipeline]:
        s = self.settings
        async with contextlib.AsyncExitStack() as stack:
            s3 = await stack.enter_async_context(s3_client(s))
            pool = await stack.enter_async_context(SmtpPool(s))
            scratch = stack.enter_context(ScratchDir(s.tmp_dir))
            store = ObjectStore(
                s3, chunk_size=s.download_chunk_bytes, allowed_buckets=s.allowed_buckets
            )
            yield Pipeline(s, self.renderer, store, pool, scratch)


def s3_client(settings: Settings) -> Any:
    """One aiobotocore client with a connection pool sized for the record concurrency."""
    import aioboto3
    from aiobotocore.config import AioConfig

    config = AioConfig(
        max_pool_connections=settings.max_concurrency,
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=30,
    )
    return aioboto3.Session().client(
        "s3",
        region_name=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        config=config,
    )


def _records(event: Any) -> list[Any]:
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list):
        log.warning("event has no Records list; nothing to do")
        return []
    return records
