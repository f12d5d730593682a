"""The work for one record: parse, deduplicate, fetch, render, build, send, clean up."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .after_cutoff import AfterCutoff
from .aws.cognito import CognitoRecipients, Recipient
from .aws.idempotency import DynamoIdempotencyStore, idempotency_key
from .aws.s3 import ObjectStore, S3Object
from .batch import RecordResult
from .config import Settings
from .deadline import Deadline
from .dedup import InBatchDeduplicator
from .errors import DeliveryUnknown, InProgressElsewhere, LookupFailed, NotifierError, TooLarge
from .logs import get_logger
from .messages import Notification, SqsRecord, parse_body
from .mime import attachment_filename, build_streamed_email
from .render import Renderer
from .retry import RetryPolicy, retrying
from .scratch import ByteBudget, ScratchDir
from .smtp.pool import SmtpPool

log = get_logger()
# Headers, text and HTML parts, MIME boundaries: generous, so the estimate errs high.
MESSAGE_OVERHEAD = 256 * 1024


def encoded_size(raw: int) -> int:
    """Bytes a base64 attachment takes in the message: 4/3, plus CRLF per 76 characters."""
    b64 = 4 * ((raw + 2) // 3)
    return b64 + 2 * ((b64 + 75) // 76)


@dataclass
class Attachment:
    path: Path | None = None
    name: str | None = None
    size: int = 0
    link: str | None = None
    link_expires_at: datetime | None = None


class Pipeline:
    """Shared by all records of one batch; owns that batch's deduplication."""

    def __init__(
        self,
        settings: Settings,
        renderer: Renderer,
        store: ObjectStore,
        pool: SmtpPool,
        scratch: ScratchDir,
        *,
        budget: ByteBudget,
        deadline: Deadline | None = None,
        idempotency: DynamoIdempotencyStore | None = None,
        recipients: CognitoRecipients | None = None,
    ) -> None:
        self._settings = settings
        self._renderer = renderer
        self._store = store
        self.pool = pool
        self._scratch = scratch
        self._budget = budget
        self._deadline = deadline
        self._idempotency = idempotency
        self._recipients = recipients
        self._dedup = InBatchDeduplicator()
        self._retry = RetryPolicy(settings.retry_attempts, settings.retry_base_delay)

    async def process(self, record: SqsRecord, result: RecordResult) -> None:
        notification = parse_body(record.body)
        result.video_id = notification.video_id
        result.status = notification.status
        # Two records for the same email in one batch: send once, both share the outcome.
        first = await self._dedup.run(
            notification.identity,
            lambda: self._deliver_once(notification, result, record.message_id),
        )
        if first is None:
            result.action = "duplicate"

    async def _deliver_once(
        self, notification: Notification, result: RecordResult, message_id: str = ""
    ) -> bool:
        """Across deliveries: skip what an earlier delivery already sent (IDEMPOTENCY_TABLE).

        A claim whose send failed or was cancelled without reaching the server is released
        within `AfterCutoff`: a record cut off at the cutoff releases it after the cutoff, and
        a release that does not fit is left to expire (logged), never allowed to overrun.
        """
        if self._idempotency is None:
            await self._deliver(notification, result)
            return True
        key = idempotency_key(notification.identity)
        store = self._idempotency
        state = await retrying(
            lambda: store.begin(key, self._in_progress_until()),
            self._retry,
            deadline=self._deadline,
            on_retry=lambda _: _count_retry(result),
        )
        if state == "completed":
            result.action = "already_delivered"
            return True
        if state == "in_progress":
            raise InProgressElsewhere("another delivery of this email is in progress")
        try:
            await self._deliver(notification, result)
        except DeliveryUnknown:
            raise  # may have been delivered: keep the mark until it expires
        except BaseException:
            if not result.maybe_delivered:
                await AfterCutoff(self._deadline).attempt(
                    "idempotency_release", [message_id], lambda: store.release(key)
                )
            raise
        try:
            await self._idempotency.complete(key)
        except NotifierError as exc:
            # The email is out; failing the record now would only send it twice.
            log.warning("could not mark email delivered", extra={"reason": exc.reason})
        return True

    def _in_progress_until(self) -> float:
        """Wall-clock time after which an unfinished mark may be taken over."""
        remaining = self._deadline.remaining() if self._deadline else 900.0
        return time.time() + max(remaining, 0.0) + 60.0

    async def _deliver(self, notification: Notification, result: RecordResult) -> None:
        lookup = self._lookup(notification)  # runs while the ZIP downloads
        attachment = Attachment()
        try:
            if notification.status == "COMPLETED":
                attachment = await self._fetch(notification, result)
            if lookup is not None:
                recipient = await lookup
                notification = dataclasses.replace(
                    notification, email=recipient.email, name=notification.name or recipient.name
                )
            rendered = self._renderer.render(
                notification,
                attachment_name=attachment.name,
                download_url=attachment.link,
                link_expires_at=attachment.link_expires_at,
            )
            email = build_streamed_email(
                notification,
                rendered,
                sender=self._settings.email_from,
                attachment=attachment.path,
                attachment_name=attachment.name,
            )
            await retrying(
                lambda: self.pool.send(
                    email, on_cancelled_after_data=lambda: _maybe_delivered(result)
                ),
                self._retry,
                deadline=self._deadline,
                on_retry=lambda _: _count_retry(result),
            )
            result.action = "sent_link" if attachment.link else "sent"
        finally:
            if lookup is not None and not lookup.done():
                lookup.cancel()
            if attachment.path is not None:
                attachment.path.unlink(missing_ok=True)
                await self._budget.release(attachment.size)

    def _lookup(self, notification: Notification) -> asyncio.Future[Recipient] | None:
        """Start resolving a Cognito user id to an address, or None when there is one."""
        if notification.email is not None:
            return None
        user_id = notification.cognito_user_id
        assert user_id is not None
        if self._recipients is None:
            raise LookupFailed(
                "the message names a Cognito user but COGNITO_USER_POOL_ID is not set"
            )
        lookup = asyncio.ensure_future(self._recipients.lookup(user_id))
        # Retrieved even when the download fails first and nobody awaits it.
        lookup.add_done_callback(lambda f: f.cancelled() or f.exception())
        return lookup

    async def _fetch(self, notification: Notification, result: RecordResult) -> Attachment:
        """Download the ZIP within the temp-dir budget, or sign a link when it cannot go."""
        bucket, key = notification.bucket, notification.key
        assert bucket is not None
        assert key is not None
        opened: S3Object | None = await retrying(
            lambda: self._store.open(bucket, key),
            self._retry,
            deadline=self._deadline,
            on_retry=lambda _: _count_retry(result),
        )
        assert opened is not None
        size = opened.size
        # No Content-Length: reserve the most that could be attached and count as it streams.
        limit = None if size >= 0 else min(self._settings.max_attachment_bytes, self._budget.total)
        reserved = size if limit is None else limit
        try:
            too_big = await self._too_big(size)
        except BaseException:
            opened.close()  # or the S3 connection stays checked out of the client's pool
            raise
        if too_big:
            opened.close()
            return await self._link(bucket, key, size)
        if not self._budget.try_reserve(reserved):
            opened.close()  # don't hold an S3 connection while waiting for disk space
            opened = None
            await self._budget.reserve(reserved)
        path = self._scratch.new_file()

        async def download() -> int:
            nonlocal opened
            obj, opened = opened, None
            if obj is None:
                obj = await self._store.open(bucket, key)
            return await self._store.save(obj, path, limit)

        try:
            written = await retrying(
                download,
                self._retry,
                deadline=self._deadline,
                on_retry=lambda _: _count_retry(result),
            )
        except TooLarge as exc:
            await self._budget.release(reserved)
            return await self._link(bucket, key, exc.written)
        except BaseException:
            if opened is not None:
                opened.close()
            await self._budget.release(reserved)
            raise
        if limit is not None:
            await self._budget.release(reserved - written)  # what it did not need
            reserved = written
            try:
                too_big = await self._too_big(written)  # the SMTP server's SIZE, now known
            except BaseException:
                path.unlink(missing_ok=True)
                await self._budget.release(reserved)
                raise
            if too_big:
                path.unlink(missing_ok=True)
                await self._budget.release(reserved)
                return await self._link(bucket, key, written)
        result.bytes = written
        return Attachment(path=path, name=attachment_filename(notification), size=reserved)

    async def _too_big(self, size: int) -> bool:
        """Whether `size` bytes cannot be attached; an unknown size (-1) is counted later."""
        s = self._settings
        if size < 0:
            return False
        if size > s.max_attachment_bytes or size > self._budget.total:
            return True
        limit = await self.pool.server_size_limit()
        return bool(limit) and encoded_size(size) + MESSAGE_OVERHEAD > (limit or 0)

    async def _link(self, bucket: str, key: str, size: int) -> Attachment:
        expiry = self._settings.link_expiry_seconds
        url = await self._store.presign(bucket, key, expiry)
        return Attachment(
            size=size, link=url, link_expires_at=datetime.now(UTC) + timedelta(seconds=expiry)
        )


def _maybe_delivered(result: RecordResult) -> None:
    result.maybe_delivered = True


def _count_retry(result: RecordResult) -> None:
    result.retries += 1
