"""The composition root: the real SMTP and AWS adapters, made and handed to the core.

The SMTP pool and the AWS clients live as long as the process (Lambda keeps it warm
between invocations, and a warm pool skips the TCP, TLS and AUTH handshakes). They are
bound to the event loop that made them, and made anew if a different loop calls. The
Secrets Manager source is not a client: its cache outlives a change of event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from .account.limits import SendLimits
from .aws.clients import aws_client, new_session
from .aws.cognito import CognitoRecipients
from .aws.errors import aws_error
from .aws.idempotency import DynamoIdempotencyStore
from .aws.s3 import LinkSigner, ObjectStore
from .aws.secrets import KeyPairSource, SecretSource
from .aws.ses_quota import SesQuotaReader
from .aws.ses_transport import SesTransport
from .aws.sqs import SqsFeedback
from .aws.status import DynamoStatusReader, DynamoStatusStore
from .aws.status_topic import SnsStatusTopic
from .aws.suppression import DynamoSuppressionList
from .batch.notifier import Notifier
from .batch.ses_recorder import SesEventsRecorder
from .canary import CanaryRequest, CanaryResult, run_canary
from .config import ConfigError, Settings
from .errors import ProviderCondition, SecretUnavailable, SecretWithoutUsername
from .failover import FailoverTransport
from .logs import configure, get_logger
from .metrics import InvocationMetrics
from .ports import MailTransport
from .smtp.pool import SmtpPool

log = get_logger()
# The SMTP secret is read at start to check its shape; an answer slower than this is left
# to the first login (the init phase must not wait on Secrets Manager for long).
SECRET_CHECK_TIMEOUT = 5.0


def build_notifier(settings: Settings) -> Notifier:
    """The worker, wired to SMTP and AWS: what the Lambda handler and the runner run."""
    return Notifier(settings, AwsBackend(settings))


def build_ses_recorder(settings: Settings) -> SesEventsRecorder:
    """The SES events consumer (bounces, complaints), wired to DynamoDB and SQS only: it
    sends no email, so it gets no SMTP pool and no S3 client (`SesEventsBackend`)."""
    return SesEventsRecorder(settings, SesEventsBackend(settings))


async def run_canary_on(settings: Settings, queue_url: str, **options: Any) -> CanaryResult:
    """The canary (`canary.run_canary`, `options` its own) wired to SQS, to send the probes
    to `queue_url`, and to STATUS_TABLE, to read their statuses: what `async-notifier
    canary` and `handler.canary_handler` run, with the caller's credentials."""
    session = await asyncio.to_thread(new_session)
    async with (
        aws_client("sqs", settings, session) as sqs,
        aws_client("dynamodb", settings, session) as dynamodb,
    ):
        reader = DynamoStatusReader(dynamodb, settings.status_table or "")

        async def send(body: str) -> None:
            try:
                await sqs.send_message(QueueUrl=queue_url, MessageBody=body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise RuntimeError(aws_error(exc).describe()) from None

        return await run_canary(send, reader.get, **options)


def canary_lambda(event: Any, context: Any) -> dict[str, Any]:
    """The scheduled canary (`handler.canary_handler`): the event names the queue
    (`queue_url`, and optionally `timeout_seconds`, `zip`), settings come from the
    environment (`Settings.for_status`). Its verdict is the metric `CanaryFailed` (1 or 0,
    dimension `FunctionName`, with `CanaryMissing`: the probes without their status) and
    the returned summary; an error in the canary itself is a `CanaryFailed` too, then
    raised (the function's `Errors`)."""
    settings = Settings.for_status()
    configure(settings.log_level)
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    request = CanaryRequest.from_event(event, remaining() / 1000 if remaining else None)
    name = getattr(context, "function_name", None)
    metrics = InvocationMetrics(
        settings.metrics_namespace,
        dimensions={"FunctionName": name} if isinstance(name, str) and name else None,
    )
    try:
        result = asyncio.run(
            run_canary_on(
                settings,
                request.queue_url,
                wait=request.timeout,
                zip_location=request.zip_location,
            )
        )
    except BaseException:
        metrics.set("CanaryFailed", 1, "Count")
        metrics.emit()
        raise
    summary = result.summary()
    metrics.set("CanaryFailed", 0 if result.ok else 1, "Count")
    metrics.set("CanaryMissing", len(summary["missing"]), "Count")
    metrics.set("CanarySeconds", result.seconds, "Seconds")
    metrics.emit()
    if result.ok:
        log.info("canary passed", extra={"canary": summary})
    else:
        log.error("canary failed", extra={"canary": summary})
    return summary


@dataclass
class _SesEventsAdapters:
    """The SES events function's adapters of one event loop: the suppression list and the
    queue feedback; no mail transport, no objects, no idempotency, no recipients."""

    loop: asyncio.AbstractEventLoop
    stack: contextlib.AsyncExitStack
    settings: Settings
    session: Any
    suppression: DynamoSuppressionList
    status_store: DynamoStatusStore | None = None
    status_topic: SnsStatusTopic | None = None
    transport: None = None
    objects: None = None
    idempotency: None = None
    recipients: None = None
    _feedback: SqsFeedback | None = None

    async def feedback(self) -> SqsFeedback:
        """Made when a batch first has something to tell the queue."""
        if self._feedback is None:
            self._feedback = await _queue_feedback(self.stack, self.settings, self.session)
        return self._feedback


class SesEventsBackend:
    """`ports.Backend` of the SES events function: DynamoDB and SQS, through aioboto3."""

    def __init__(self, settings: Settings) -> None:
        if not settings.suppression_table:
            raise ValueError("SES events are recorded in SUPPRESSION_TABLE, which is not set")
        self.settings = settings
        self._adapters: _SesEventsAdapters | None = None
        self._session: Any = None

    async def prepare(self) -> None:
        await self._adapters_of_this_loop()
        await self._session.get_credentials()  # found now, with no request made

    def held(self) -> ProviderCondition | None:
        return None  # it sends no email: no provider condition holds it back

    def forget_secrets(self) -> None:
        pass  # it reads no secret

    async def check_secrets(self) -> None:
        pass  # it reads no secret

    async def open(self, connections: int) -> _SesEventsAdapters:
        return await self._adapters_of_this_loop()

    async def _adapters_of_this_loop(self) -> _SesEventsAdapters:
        loop = asyncio.get_running_loop()
        if self._adapters is not None and self._adapters.loop is loop:
            return self._adapters
        self._adapters = None  # made by a loop that is gone: aiobotocore clients can't move
        s = self.settings
        assert s.suppression_table is not None  # checked when made
        if self._session is None:
            self._session = await asyncio.to_thread(new_session)
        stack = contextlib.AsyncExitStack()
        try:
            dynamodb = await stack.enter_async_context(aws_client("dynamodb", s, self._session))
            status_store, status_topic = await _status(stack, s, self._session, dynamodb)
        except BaseException:
            await stack.aclose()
            raise
        suppression = DynamoSuppressionList(
            dynamodb, s.suppression_table, soft_ttl=s.suppression_soft_ttl
        )
        self._adapters = _SesEventsAdapters(
            loop, stack, s, self._session, suppression, status_store, status_topic
        )
        return self._adapters

    async def aclose(self) -> None:
        """Close the AWS clients."""
        adapters, self._adapters = self._adapters, None
        if adapters is not None and adapters.loop is asyncio.get_running_loop():
            await adapters.stack.aclose()


@dataclass
class _Adapters:
    """The adapters of one event loop (`ports.Adapters`)."""

    loop: asyncio.AbstractEventLoop
    stack: contextlib.AsyncExitStack
    settings: Settings
    session: Any
    transport: MailTransport
    pool: SmtpPool | None  # the SMTP transport, when one of the two is SMTP
    objects: ObjectStore
    idempotency: DynamoIdempotencyStore | None
    recipients: CognitoRecipients | None
    suppression: DynamoSuppressionList | None
    status_store: DynamoStatusStore | None = None
    status_topic: SnsStatusTopic | None = None
    _feedback: SqsFeedback | None = None

    async def feedback(self) -> SqsFeedback:
        """Made when a batch first has something to tell the queue."""
        if self._feedback is None:
            self._feedback = await _queue_feedback(self.stack, self.settings, self.session)
        return self._feedback


class AwsBackend:
    """`ports.Backend` over aiosmtplib and aioboto3."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._adapters: _Adapters | None = None
        self._session: Any = None  # one aioboto3 Session: its clients share loaded models
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
        self.link_keys = (
            KeyPairSource(
                lambda: aws_client("secretsmanager", settings),
                settings.link_signing_secret_id,
                ttl=settings.smtp_secret_ttl,
            )
            if settings.link_signing_secret_id
            else None
        )

    @property
    def pool(self) -> SmtpPool | None:
        return self._adapters.pool if self._adapters else None

    async def prepare(self) -> None:
        adapters = await self._adapters_of_this_loop()
        # Credentials are found on the first request otherwise (environment, container
        # endpoint...): find them now, with no request made.
        await self._session.get_credentials()
        # With SMTP_RATE_LIMIT=auto, the account's rate before the first batch (bounded).
        await adapters.transport.refresh_limits()
        await self.check_secrets()

    async def check_secrets(self) -> None:
        """Refuse to start on an SMTP secret that no login can use: a password alone with
        no SMTP_USER would fail every record, and only reading the secret shows its shape.
        A secret that cannot be read now is left to the first login (`secret_unavailable`,
        transient): Secrets Manager being slow is no broken setting."""
        s = self.settings
        if self.secret is None or "smtp" not in (s.transport, s.fallback_transport):
            return
        try:
            async with asyncio.timeout(SECRET_CHECK_TIMEOUT):
                await self.secret.get()
        except SecretWithoutUsername:
            raise ConfigError(
                "invalid configuration: SMTP_PASSWORD_SECRET_ID names a secret that holds a "
                "password alone, and SMTP_USER is not set: set SMTP_USER, or store the secret "
                'as JSON {"username": ..., "password": ...}'
            ) from None
        except SecretUnavailable:
            pass  # logged by the source; the first login reads it again
        except TimeoutError:
            log.warning(
                "smtp secret not checked at start: no answer in time",
                extra={"secret_id": self.secret.secret_id, "timeout": SECRET_CHECK_TIMEOUT},
            )

    def held(self) -> ProviderCondition | None:
        adapters = self._adapters
        return adapters.transport.held() if adapters is not None else None

    def forget_secrets(self) -> None:
        for source in (self.secret, self.link_keys):
            if source is not None:
                source.invalidate()

    async def open(self, connections: int) -> _Adapters:
        adapters = await self._adapters_of_this_loop(connections)
        await adapters.transport.refresh_limits()  # the account's quota, when due
        adapters.transport.start_batch(connections)
        return adapters

    async def _adapters_of_this_loop(self, connections: int = 0) -> _Adapters:
        loop = asyncio.get_running_loop()
        if self._adapters is not None and self._adapters.loop is loop:
            return self._adapters
        self._adapters = None  # made by a loop that is gone: aiobotocore clients can't move
        s = self.settings
        stack = contextlib.AsyncExitStack()
        try:
            pool = None
            if "smtp" in (s.transport, s.fallback_transport):
                pool = await stack.enter_async_context(SmtpPool(s, secret=self.secret))
                if s.transport == "smtp":
                    pool.prewarm(connections)  # the SMTP handshakes run while aioboto3 loads
            if self._session is None:  # about 180 ms on a cold start: off the event loop
                self._session = await asyncio.to_thread(new_session)
            session = self._session
            s3 = await stack.enter_async_context(aws_client("s3", s, session))
            signer = None
            if self.link_keys is not None:
                keys = self.link_keys
                signer = LinkSigner(keys, lambda pair: aws_client("s3", s, session, keys=pair))
                stack.push_async_callback(signer.aclose)
            objects = ObjectStore(s3, chunk_size=s.download_chunk_bytes, signer=signer)
            ses_api = None
            if "ses" in (s.transport, s.fallback_transport):
                sesv2 = await stack.enter_async_context(
                    aws_client("sesv2", s, session, region=s.ses_region)
                )
                ses_api = SesTransport(
                    sesv2, s, limits=SendLimits(s), max_inflight_bytes=s.ses_max_inflight_bytes
                )
            transport = _transport(s, pool, ses_api)
            if s.smtp_rate_limit == "auto":  # pace to the account's quota, read from SES
                ses = await stack.enter_async_context(
                    aws_client("ses", s, session, region=s.quota_region)
                )
                reader = SesQuotaReader(ses)
                for limits in (pool.limits if pool else None, ses_api.limits if ses_api else None):
                    if limits is not None:
                        limits.use_quota(reader)
            dynamodb = None
            if s.idempotency_table or s.suppression_table or s.status_table:
                dynamodb = await stack.enter_async_context(aws_client("dynamodb", s, session))
            status_store, status_topic = await _status(stack, s, session, dynamodb)
            idempotency = None
            if dynamodb is not None and s.idempotency_table:
                idempotency = DynamoIdempotencyStore(
                    dynamodb, s.idempotency_table, ttl_seconds=s.idempotency_ttl
                )
            suppression = None
            if dynamodb is not None and s.suppression_table:
                suppression = DynamoSuppressionList(
                    dynamodb, s.suppression_table, soft_ttl=s.suppression_soft_ttl
                )
            recipients = None
            if s.cognito_user_pool_id:
                cognito = await stack.enter_async_context(aws_client("cognito-idp", s, session))
                recipients = CognitoRecipients(
                    cognito,
                    s.cognito_user_pool_id,
                    require_verified_email=not s.allow_unverified_email,
                )
        except BaseException:
            await stack.aclose()
            raise
        self._adapters = _Adapters(
            loop,
            stack,
            s,
            session,
            transport,
            pool,
            objects,
            idempotency,
            recipients,
            suppression,
            status_store,
            status_topic,
        )
        return self._adapters

    async def aclose(self) -> None:
        """Close the AWS clients and QUIT the pooled SMTP connections."""
        adapters, self._adapters = self._adapters, None
        if adapters is not None and adapters.loop is asyncio.get_running_loop():
            await adapters.stack.aclose()


def _transport(
    settings: Settings, pool: SmtpPool | None, ses_api: SesTransport | None
) -> MailTransport:
    """TRANSPORT, with FALLBACK_TRANSPORT behind it when one is set (`failover.py`)."""
    by_name: dict[str, MailTransport | None] = {"smtp": pool, "ses": ses_api}
    primary = by_name[settings.transport]
    assert primary is not None
    if settings.fallback_transport is None:
        return primary
    fallback = by_name[settings.fallback_transport]
    assert fallback is not None
    return FailoverTransport(primary, fallback)


async def _status(
    stack: contextlib.AsyncExitStack, settings: Settings, session: Any, dynamodb: Any
) -> tuple[DynamoStatusStore | None, SnsStatusTopic | None]:
    """The delivery-status table (on the shared DynamoDB client) and topic, when set."""
    store = None
    if settings.status_table and dynamodb is not None:
        store = DynamoStatusStore(dynamodb, settings.status_table, ttl_seconds=settings.status_ttl)
    topic = None
    if settings.status_topic_arn:
        sns = await stack.enter_async_context(aws_client("sns", settings, session))
        topic = SnsStatusTopic(sns, settings.status_topic_arn)
    return store, topic


async def _queue_feedback(
    stack: contextlib.AsyncExitStack, settings: Settings, session: Any
) -> SqsFeedback:
    """Dead letters and back-off over an SQS client that lives as long as `stack`."""
    sqs = await stack.enter_async_context(aws_client("sqs", settings, session))
    return SqsFeedback(
        sqs,
        dead_letter_queue_url=settings.dead_letter_queue_url,
        endpoint_url=settings.aws_endpoint_url,
    )
