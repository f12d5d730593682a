"""Deliver one record: deduplicate, fetch, render, build, send, clean up.

The notifier's record work (`processor.RecordWork`): `RecordDelivery.run` is what runs
under the invocation's cutoff (the processor cancels it there); `finish` is what must
follow it (completing or releasing its idempotency claim), within the time left until the
deadline's end (`AfterCutoff`); `annotate` adds what the delivery found out to the outcome
the processor makes. The record's body comes parsed (`notifier.EmailHandler.prepare`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..after_cutoff import AfterCutoff
from ..config import Settings
from ..deadline import Deadline
from ..errors import (
    DeliveryUnknown,
    InProgressElsewhere,
    LookupFailed,
    MessageTooLarge,
    NotifierError,
    RecipientSuppressed,
    TooLarge,
)
from ..logs import get_logger
from ..mail.mime import StreamedEmail, attachment_filename, build_streamed_email
from ..mail.render import Renderer
from ..messages import Notification, SqsRecord
from ..ports import Adapters, Download, Receipt, Recipient
from .access import check_location
from .dedup import InBatchDeduplicator
from .outcome import Action, Outcome
from .retry import Retrier, RetryPolicy
from .scratch import ByteBudget, ScratchDir
from .suppression import SuppressionCheck

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
    size: int = 0  # bytes reserved in the temp-dir budget (or the object's, for a link)
    link: str | None = None
    link_expires_at: datetime | None = None


@dataclass
class _Record:
    """One record's delivery as it goes: what its outcome is made of."""

    retry: Retrier
    video_id: str | None = None
    status: str | None = None
    tracking_id: str | None = None  # the notification's (`Notification.tracking_id`)
    notification_id: str | None = None  # the producer's, when the message says one
    bytes: int = 0
    maybe_delivered: bool = False
    receipt: Receipt | None = None  # what the provider said when it accepted the email
    claimed: str | None = None  # the identity this delivery claimed in the idempotency store


class RecordDelivery:
    """One record's delivery, as the processor runs it (`processor.RecordWork`)."""

    def __init__(
        self,
        delivery: Delivery,
        record: SqsRecord,
        notification: Notification | Exception,
        state: _Record,
    ) -> None:
        self._delivery = delivery
        self._record = record
        self._notification = notification
        self._state = state

    async def run(self) -> Action:
        return await self._delivery._process(self._notification, self._state)

    async def finish(self, error: NotifierError | None) -> None:
        await self._delivery._settle_claim(self._state, error, self._record.message_id)

    def annotate(self, outcome: Outcome) -> None:
        state = self._state
        outcome.video_id = state.video_id
        outcome.status = state.status
        outcome.tracking_id = state.tracking_id
        outcome.notification_id = state.notification_id
        outcome.bytes = state.bytes
        outcome.retries = state.retry.retries
        outcome.maybe_delivered = state.maybe_delivered
        outcome.receipt = state.receipt


class Delivery:
    """Shared by all records of one batch; owns that batch's deduplication."""

    def __init__(
        self,
        settings: Settings,
        renderer: Renderer,
        adapters: Adapters,
        scratch: ScratchDir,
        *,
        budget: ByteBudget,
        deadline: Deadline | None = None,
        suppression: SuppressionCheck | None = None,
    ) -> None:
        self._settings = settings
        self._renderer = renderer
        if adapters.transport is None or adapters.objects is None:
            raise ValueError("delivering email needs a mail transport and an object source")
        self._transport = adapters.transport
        self._objects = adapters.objects
        self._idempotency = adapters.idempotency
        self._recipients = adapters.recipients
        self._scratch = scratch
        self._budget = budget
        self._deadline = deadline
        self._suppression = suppression
        self._dedup = InBatchDeduplicator()
        self._policy = RetryPolicy(settings.retry_attempts, settings.retry_base_delay)

    def start(self, record: SqsRecord, notification: Notification | Exception) -> RecordDelivery:
        """One record's delivery (`processor.RecordWork`), its body already parsed (or the
        error that parsing it raised)."""
        state = _Record(Retrier(self._policy, self._deadline))
        return RecordDelivery(self, record, notification, state)

    async def _process(self, notification: Notification | Exception, state: _Record) -> Action:
        if isinstance(notification, Exception):
            raise notification
        state.video_id = notification.video_id
        state.status = notification.status
        state.tracking_id = notification.tracking_id  # before a Cognito lookup changes it
        state.notification_id = notification.notification_id
        check_location(notification, self._settings)
        # Two records for the same email in one batch: send once, both share the outcome.
        first = await self._dedup.run(
            notification.identity, lambda: self._deliver_once(notification, state)
        )
        return "duplicate" if first is None else first

    async def _deliver_once(self, notification: Notification, state: _Record) -> Action:
        """Across deliveries: skip what an earlier delivery already sent (IDEMPOTENCY_TABLE).

        Nothing starts while a provider-wide condition holds (no claim, no download): the
        record goes back to the queue at once."""
        held = self._transport.held()
        if held is not None:
            raise held
        store = self._idempotency
        if store is None:
            return await self._deliver(notification, state)
        identity = notification.identity
        claim = await state.retry.run(lambda: store.begin(identity, self._in_progress_until()))
        if claim == "completed":
            return "already_delivered"
        if claim == "in_progress":
            raise InProgressElsewhere("another delivery of this email is in progress")
        state.claimed = identity
        return await self._deliver(notification, state)

    async def _settle_claim(
        self, state: _Record, error: NotifierError | None, message_id: str
    ) -> None:
        """After the record, within the time left: mark its email sent, or give its claim
        back when nothing can have reached the server (a claim that may cover a delivered
        email is kept until it expires, so the retry does not send it twice)."""
        store, identity = self._idempotency, state.claimed
        if store is None or identity is None:
            return
        budget = AfterCutoff(self._deadline)
        if error is None:
            await budget.attempt(
                "idempotency_complete", [message_id], lambda: store.complete(identity)
            )
        elif not (state.maybe_delivered or isinstance(error, DeliveryUnknown)):
            await budget.attempt(
                "idempotency_release", [message_id], lambda: store.release(identity)
            )

    def _in_progress_until(self) -> float:
        """Wall-clock time after which an unfinished mark may be taken over."""
        remaining = self._deadline.remaining() if self._deadline else 900.0
        return time.time() + max(remaining, 0.0) + 60.0

    async def _deliver(self, notification: Notification, state: _Record) -> Action:
        if notification.email is not None:
            await self._check_suppressed(notification.email)  # before any download
        lookup = self._lookup(notification)  # runs while the ZIP downloads
        attachment = Attachment()
        try:
            if notification.status == "COMPLETED":
                attachment = await self._fetch(notification, state)
            if lookup is not None:
                recipient = await lookup
                await self._check_suppressed(recipient.email)
                notification = dataclasses.replace(
                    notification, email=recipient.email, name=notification.name or recipient.name
                )
            email = self._compose(notification, attachment, state.tracking_id)
            try:
                state.receipt = await state.retry.run(lambda: self._send(email, state))
            except MessageTooLarge:
                if attachment.path is None:
                    raise
                # The server's limit was below what it advertised (or it advertised none):
                # the pool knows it now, and this email goes out with a link instead.
                attached, attachment = attachment, Attachment()
                await self._discard(attached)
                assert notification.bucket is not None
                assert notification.key is not None
                log.info(
                    "too large for the SMTP server: sending a link", extra={"bytes": email.size}
                )
                attachment = await self._link(notification.bucket, notification.key, attached.size)
                state.bytes = 0
                email = self._compose(notification, attachment, state.tracking_id)
                state.receipt = await state.retry.run(lambda: self._send(email, state))
            return "sent_link" if attachment.link else "sent"
        finally:
            if lookup is not None and not lookup.done():
                lookup.cancel()
            await self._discard(attachment)

    def _compose(
        self, notification: Notification, attachment: Attachment, tracking_id: str | None
    ) -> StreamedEmail:
        rendered = self._renderer.render(
            notification,
            attachment_name=attachment.name,
            download_url=attachment.link,
            link_expires_at=attachment.link_expires_at,
        )
        return build_streamed_email(
            notification,
            rendered,
            sender=self._settings.email_from,
            attachment=attachment.path,
            attachment_name=attachment.name,
            reply_to=self._settings.reply_to,
            configuration_set=self._settings.ses_configuration_set,
            tracking_id=tracking_id,
        )

    async def _discard(self, attachment: Attachment) -> None:
        """Remove a downloaded ZIP and give its room back (once: the path is forgotten)."""
        if attachment.path is not None:
            path, attachment.path = attachment.path, None
            path.unlink(missing_ok=True)
            await self._budget.release(attachment.size)

    async def _send(self, email: StreamedEmail, state: _Record) -> Receipt:
        reached = False

        def mark() -> None:
            nonlocal reached
            reached = True

        try:
            return await self._transport.deliver(email, reached=mark)
        except asyncio.CancelledError:
            if reached:  # cut off after the message went out: the provider may accept it
                state.maybe_delivered = True
            raise

    async def _check_suppressed(self, address: str) -> None:
        """A hard-bounced or complaining address is never mailed again."""
        if self._suppression is None:
            return
        reason = await self._suppression.reason(address)
        if reason is not None:
            raise RecipientSuppressed(f"{address} is on the suppression list ({reason})")

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

    async def _fetch(self, notification: Notification, state: _Record) -> Attachment:
        """Download the ZIP within the temp-dir budget, or sign a link when it cannot go."""
        bucket, key = notification.bucket, notification.key
        assert bucket is not None
        assert key is not None
        opened: Download | None = await state.retry.run(lambda: self._objects.open(bucket, key))
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
                obj = await self._objects.open(bucket, key)
            return await self._objects.save(obj, path, limit)

        try:
            written = await state.retry.run(download)
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
        state.bytes = written
        return Attachment(path=path, name=attachment_filename(notification), size=reserved)

    async def _too_big(self, size: int) -> bool:
        """Whether `size` bytes cannot be attached; an unknown size (-1) is counted later."""
        s = self._settings
        if size < 0:
            return False
        if size > s.max_attachment_bytes or size > self._budget.total:
            return True
        limit = await self._transport.server_size_limit()
        return bool(limit) and encoded_size(size) + MESSAGE_OVERHEAD > (limit or 0)

    async def _link(self, bucket: str, key: str, size: int) -> Attachment:
        link = await self._objects.presign(bucket, key, self._settings.link_expiry_seconds)
        return Attachment(size=size, link=link.url, link_expires_at=link.expires_at)
