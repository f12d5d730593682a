"""What the two Lambda entry points share: the backend's lifecycle, the SQS event, the batch.

`Notifier` (videos to email) and `SesEventsRecorder` (SES events to the suppression list)
differ only in their `RecordHandler` (`handler`); the batch is the `BatchProcessor`'s. Both
are made once per warm process, prepared in the init phase, and closed before a snapshot.
"""

from __future__ import annotations

from typing import Any, Self

from ..config import Settings
from ..deadline import Deadline
from ..logs import configure, get_logger
from ..ports import Adapters, Backend
from .disposition import Policy
from .outcome import BatchResult
from .processor import BatchProcessor, RecordHandler

log = get_logger()


class BatchEntryPoint:
    """One entry point's worker: handed its adapters, it turns an SQS event into a response."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.policy = Policy.from_settings(settings)
        self.processor = BatchProcessor(backend, self.policy, concurrency=settings.max_concurrency)
        configure(settings.log_level)

    async def prepare(self) -> None:
        """Make the clients now, connecting nothing: Lambda's init phase, off the clock of
        the first invocation."""
        await self.backend.prepare()

    def forget_secrets(self) -> None:
        self.backend.forget_secrets()

    async def check_secrets(self) -> None:
        """ConfigError on a secret no login can use (a password alone, no SMTP_USER)."""
        await self.backend.check_secrets()

    def held_for(self) -> float:
        """Seconds a provider-wide condition still holds (0: none): the SQS runner stops
        receiving meanwhile, so nothing is taken that cannot be sent."""
        held = self.backend.held()
        return held.retry_after if held is not None else 0.0

    async def aclose(self) -> None:
        """Close the clients (and QUIT the pooled SMTP connections, if there are any)."""
        await self.backend.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def handle(self, event: Any, context: Any = None) -> dict[str, list[dict[str, str]]]:
        """Process one Lambda SQS event; return the partial batch response."""
        deadline = Deadline.from_context(context, self.settings.deadline_margin)
        function_name = getattr(context, "function_name", None)
        result = await self.process(
            records_of(event), deadline=deadline, function_name=function_name
        )
        return result.response()

    async def process(
        self,
        records: list[Any],
        *,
        deadline: Deadline | None = None,
        function_name: str | None = None,
    ) -> BatchResult:
        """Run one batch and settle it; emit its metrics (CloudWatch EMF), log its summary."""
        return await self.processor.process(
            records, self.handler, deadline=deadline, function_name=function_name
        )

    def handler(self, adapters: Adapters, deadline: Deadline | None) -> RecordHandler:
        """What this entry point does with one batch's records."""
        raise NotImplementedError


def records_of(event: Any) -> list[Any]:
    """The records of a Lambda SQS event (none when it has no Records list)."""
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list):
        log.warning("event has no Records list; nothing to do")
        return []
    return records
