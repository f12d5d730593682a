"""The work for one record: parse, download, render, build, send, clean up."""

from __future__ import annotations

from .batch import RecordResult
from .config import Settings
from .mailer import attachment_filename, build_email
from .messages import SqsRecord, parse_body
from .render import Renderer
from .smtp_pool import SmtpPool
from .storage import ObjectStore, ScratchDir


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        renderer: Renderer,
        store: ObjectStore,
        pool: SmtpPool,
        scratch: ScratchDir,
    ) -> None:
        self._settings = settings
        self._renderer = renderer
        self._store = store
        self._pool = pool
        self._scratch = scratch

    async def process(self, record: SqsRecord, result: RecordResult) -> None:
        notification = parse_body(record.body)
        result.video_id = notification.video_id
        result.status = notification.status
        attachment = None
        attachment_name = None
        try:
            if notification.status == "COMPLETED":
                assert notification.bucket is not None
                assert notification.key is not None
                attachment = self._scratch.new_file()
                result.bytes = await self._store.download(
                    notification.bucket, notification.key, attachment
                )
                attachment_name = attachment_filename(notification)
            rendered = self._renderer.render(notification, attachment_name=attachment_name)
            email = build_email(
                notification,
                rendered,
                sender=self._settings.email_from,
                attachment=attachment,
                attachment_name=attachment_name,
            )
            await self._pool.send(email)
        finally:
            if attachment is not None:
                attachment.unlink(missing_ok=True)
