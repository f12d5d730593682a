"""The notifier: what lives for the process, and what one batch opens and closes.

Settings, compiled templates, the S3 client and the SMTP pool live as long as the
process (Lambda keeps it warm between invocations, and a warm pool skips the
TCP, TLS and AUTH handshakes); they are bound to the event loop that made them
and rebuilt if a different loop calls. Each batch gets its own scratch directory
(removed before it returns). After the records, permanent failures go to the
dead-letter queue and the rest get a retry back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .after_cutoff import AfterCutoff
from .aws.clients import aws_client, new_session
from .aws.cognito import CognitoRecipients
from .aws.idempotency import DynamoIdempotencyStore
from .aws.s3 import ObjectStore
from .aws.secrets import SecretSource
from .aws.sqs import DeadLetterRouter, VisibilityBackoff
from .batch import BatchResult, run_batch
from .config import Settings
from .deadline import Deadline
from .delivery import Pipeline
from .logs import configure, get_logger
from .metrics import metrics_from_batch
from .render import Renderer
from .scratch import ByteBudget, ScratchDir
from .smtp.pool import SmtpPool

log = get_logger()


@dataclass
class _Clients:
    """Long-lived clients, owned by one event loop."""

    loop: asyncio.AbstractEventLoop
    stack: contextlib.AsyncExitStack
    s3: Any
    pool: SmtpPool
    idempotency: DynamoIdempotencyStore | None
    recipients: CognitoRecipients | None
    sqs: Any = None  # opened when a batch first has failures to report


class Notifier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.renderer = Renderer(settings.templates_dir, settings.default_locale)
        self._clients: _Clients | None = None
        self._aws_session: Any = None  # one aioboto3 Session: its clients share loaded models
        # Not a client: its cache outlives a change of event loop (see SecretSource).
        self.secret = (
            SecretSource(
                lambda: aws_client("secretsmanager", settings),
                settings.smtp_password_secret_id,
                ttl=settings.smtp_secret_ttl,
                default_username=settings.smtp_user,
                username_required=True,
            )
            if settings.smtp_password_secret_id
            else None
        )
        configure(settings.log_level)

    async def aclose(self) -> None:
        """Close the S3 client and QUIT the pooled SMTP connections."""
        clients, self._clients = self._clients, None
        if clients is not None and clients.loop is asyncio.get_running_loop():
            await clients.stack.aclose()

    @property
    def pool(self) -> SmtpPool | None:
        return self._clients.pool if self._clients else None

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
        """Run one batch; emit its metrics (CloudWatch EMF) and log its summary."""
        if not records:
            return BatchResult()
        started = time.monotonic()
        clients = await self._open_clients(connections=len(records))
        try:
            async with self._pipeline(clients, deadline) as pipeline:
                result = await run_batch(
                    records,
                    pipeline.process,
                    concurrency=self.settings.max_concurrency,
                    deadline=deadline,
                )
        finally:
            pool_stats = await clients.pool.finish_batch(until=deadline.end if deadline else None)
        await self._feedback(result, deadline)
        metrics_from_batch(
            result,
            duration_s=time.monotonic() - started,
            connections_opened=pool_stats.connections_opened,
            namespace=self.settings.metrics_namespace,
            function_name=function_name or os.environ.get("AWS_LAMBDA_FUNCTION_NAME"),
        ).emit()
        log.info(
            "batch done",
            extra={
                "records": len(records),
                "failed": len(result.failures),
                "dead_lettered": sum(o.dead_lettered for o in result.errors),
            },
        )
        return result

    async def _open_clients(self, connections: int = 0) -> _Clients:
        """The process's clients, opened on first use, with a batch started on the pool
        (`connections` SMTP connections warmed up) when `connections` is set."""
        loop = asyncio.get_running_loop()
        if self._clients is not None and self._clients.loop is loop:
            if connections:
                self._clients.pool.start_batch(connections)
            return self._clients
        self._clients = None  # made by a loop that is gone: aiobotocore clients can't move
        s = self.settings
        stack = contextlib.AsyncExitStack()
        try:
            pool = await stack.enter_async_context(SmtpPool(s, secret=self.secret))
            if connections:  # the SMTP handshakes run while aioboto3 loads
                pool.start_batch(connections)
            session = await self._session()
            s3 = await stack.enter_async_context(aws_client("s3", s, session))
            idempotency = None
            if s.idempotency_table:
                dynamodb = await stack.enter_async_context(aws_client("dynamodb", s, session))
                idempotency = DynamoIdempotencyStore(
                    dynamodb, s.idempotency_table, ttl_seconds=s.idempotency_ttl
                )
            recipients = None
            if s.cognito_user_pool_id:
                cognito = await stack.enter_async_context(aws_client("cognito-idp", s, session))
                recipients = CognitoRecipients(cognito, s.cognito_user_pool_id)
        except BaseException:
            await stack.aclose()
            raise
        self._clients = _Clients(loop, stack, s3, pool, idempotency, recipients)
        return self._clients

    async def _session(self) -> Any:
        if self._aws_session is None:
            self._aws_session = await asyncio.to_thread(new_session)
        return self._aws_session

    async def _sqs(self) -> Any:
        clients = await self._open_clients()
        if clients.sqs is None:
            client = aws_client("sqs", self.settings, await self._session())
            clients.sqs = await clients.stack.enter_async_context(client)
        return clients.sqs

    @contextlib.asynccontextmanager
    async def _pipeline(
        self, clients: _Clients, deadline: Deadline | None
    ) -> AsyncIterator[Pipeline]:
        s = self.settings
        with ScratchDir(s.tmp_dir, deadline) as scratch:
            store = ObjectStore(
                clients.s3, chunk_size=s.download_chunk_bytes, allowed_buckets=s.allowed_buckets
            )
            yield Pipeline(
                s,
                self.renderer,
                store,
                clients.pool,
                scratch,
                budget=ByteBudget(s.max_tmp_bytes),
                deadline=deadline,
                idempotency=clients.idempotency,
                recipients=clients.recipients,
            )

    async def _feedback(self, result: BatchResult, deadline: Deadline | None = None) -> None:
        """Dead-letter the permanent failures, then slow down the retries of the rest.

        Both run after the records, within what is left until `deadline.end` (see
        `AfterCutoff`); a record whose dead-letter send did not fit is reported failed.
        """
        s = self.settings
        permanent = [o for o in result.failures if o.error and not o.error.transient and o.record]
        if not (s.dead_letter_queue_url and permanent) and not (
            s.retry_backoff and result.failures
        ):
            return
        budget = AfterCutoff(deadline)
        # Without time left no call is made: not even the client is worth creating.
        sqs = await self._sqs() if budget.remaining() > 0 else None
        if s.dead_letter_queue_url and permanent:
            router = DeadLetterRouter(sqs, s.dead_letter_queue_url)
            routed = await router.route(
                [(o.record, o.error) for o in permanent if o.record and o.error], budget
            )
            for outcome in permanent:
                outcome.dead_lettered = outcome.message_id in routed
        if s.retry_backoff:
            retry = [o.record for o in result.failures if o.record is not None]
            if retry:
                backoff = VisibilityBackoff(sqs, endpoint_url=s.aws_endpoint_url)
                await backoff.apply(retry, budget)


def _records(event: Any) -> list[Any]:
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list):
        log.warning("event has no Records list; nothing to do")
        return []
    return records
