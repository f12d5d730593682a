"""What the core needs from the outside world, as interfaces it is handed.

The core (parsing, delivery, the batch, dispositions, metrics) never imports the SMTP or
AWS code: `wiring.py` builds the real adapters (`smtp/`, `aws/`) and hands them in, the way
httpcore is handed its network backend. Tests and tools can hand in others. The small
value types that cross the boundary live here too.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from .after_cutoff import AfterCutoff
from .delivery_status import StatusChange, StatusWrite
from .errors import NotifierError, ProviderCondition
from .mail.mime import StreamedEmail
from .messages import SqsRecord
from .ses_events import AddressEvent

BeginResult = Literal["new", "completed", "in_progress"]


# --------------------------------------------------------------------------- SMTP


@dataclass
class PoolStats:
    """What the mail transport did for one batch (from `start_batch` to `finish_batch`)."""

    connections_opened: int = 0
    connections_failed: int = 0
    connections_closed: int = 0
    circuit_opened: int = 0  # times the circuit breaker opened
    throttled: int = 0  # "slow down" replies (SES: Maximum sending rate exceeded)
    send_rate: float | None = None  # sends/s the instance paced at when the batch ended
    fallback_messages: int = 0  # emails FALLBACK_TRANSPORT carried (`failover.py`)


@dataclass(frozen=True)
class SmtpCredentials:
    """A login for the SMTP server; the password stays out of repr() and so out of logs."""

    username: str | None
    password: str = field(repr=False)


class CredentialsSource(Protocol):
    async def get(self) -> SmtpCredentials: ...

    def invalidate(self, failed: SmtpCredentials | None = None) -> bool: ...


@dataclass(frozen=True)
class Receipt:
    """An email the provider accepted: which transport took it, and the provider's id for
    it when it says one (SES's MessageId; an SMTP relay's "250 Ok <id>" or "queued as id")."""

    transport: str
    provider_id: str | None = None


class MailTransport(Protocol):
    """Where emails go: an SMTP relay (`smtp/pool.py`) or the SES API (`aws/ses_transport.py`).

    Errors are the record's (`errors.py`): transient, permanent, or a `ProviderCondition`
    that holds for every message.
    """

    name: str

    async def deliver(
        self, email: StreamedEmail, *, reached: Callable[[], None] | None = None
    ) -> Receipt:
        """Deliver one email and return what the provider said. `reached()` is called once the
        email may have reached the provider (SMTP: its end of data is written; SES: the
        request is sent): a failure or a cancellation after it leaves the delivery unknown,
        before it nothing was delivered."""
        ...

    def held(self) -> ProviderCondition | None:
        """The provider-wide condition that holds now (nothing can be sent), if any."""
        ...

    async def refresh_limits(self) -> None:
        """Re-read the account's limits when they are due (bounded in time, never raises)."""
        ...

    async def server_size_limit(self) -> int | None:
        """The largest message the provider takes (0: no limit said), for attach-or-link."""
        ...

    def start_batch(self, connections: int) -> None: ...

    async def finish_batch(self, *, until: float | None = None) -> PoolStats: ...

    async def aclose(self) -> None: ...


# --------------------------------------------------------------------------- objects


class Download(Protocol):
    """An object being fetched: its size is known (-1: not said) before any byte is saved."""

    @property
    def size(self) -> int: ...

    def close(self) -> None: ...


D = TypeVar("D", bound=Download)


@dataclass(frozen=True)
class PresignedLink:
    url: str
    expires_at: datetime


class ObjectSource(Protocol[D]):
    """Where the ZIPs are: `save` takes what `open` returned."""

    async def open(self, bucket: str, key: str) -> D: ...

    async def save(self, obj: D, dest: Path, limit: int | None = None) -> int:
        """Stream to `dest`; `errors.TooLarge` past `limit` (the file is then removed)."""
        ...

    async def presign(self, bucket: str, key: str, expires: int) -> PresignedLink:
        """A download link valid for `expires` seconds at most: less when the credentials
        that sign it expire sooner (the link says its true end)."""
        ...


# --------------------------------------------------------------------------- memory


class IdempotencyStore(Protocol):
    """Claims on an email's identity across deliveries (see `aws/idempotency.py`)."""

    async def begin(self, identity: str, in_progress_until: float) -> BeginResult: ...

    async def complete(self, identity: str) -> None: ...

    async def release(self, identity: str) -> None: ...


@dataclass(frozen=True)
class Recipient:
    email: str
    name: str | None = None


class RecipientDirectory(Protocol):
    async def lookup(self, user_id: str) -> Recipient: ...


class SuppressionList(Protocol):
    """Addresses that must not be mailed again (hard bounces, complaints), and the record
    of what SES reported about each (see `aws/suppression.py`)."""

    async def suppressed(self, addresses: Collection[str]) -> dict[str, str]:
        """Of `addresses` (lower case), those suppressed, each with its reason."""
        ...

    async def record(self, events: Sequence[AddressEvent]) -> None: ...


# --------------------------------------------------------------------------- delivery status


class StatusStore(Protocol):
    """Each notification's delivery status and history (STATUS_TABLE, `aws/status.py`)."""

    max_batch: int  # changes per `write_batch` call

    async def write(self, change: StatusChange) -> StatusWrite:
        """Record one change, saying what it did by the precedence rules
        (`delivery_status`); idempotent by `change.event_id`. Raises on failure (the
        caller retries and counts)."""
        ...

    async def write_batch(self, changes: Sequence[StatusChange]) -> list[StatusChange]:
        """Record up to `max_batch` changes in one call, without saying what each did (the
        worker's verdicts); return those left unwritten, to try again. Raises when the
        call fails."""
        ...


class StatusTopic(Protocol):
    """Where status changes are told back (STATUS_TOPIC_ARN, `aws/status_topic.py`)."""

    max_batch: int  # events per call

    async def publish(self, events: Sequence[dict[str, Any]]) -> int:
        """Publish up to `max_batch` events (`delivery_status.status_event`); return how many
        were refused (a failed call raises)."""
        ...


# --------------------------------------------------------------------------- the queue


class QueueFeedback(Protocol):
    """What a batch tells the queue besides which records failed."""

    async def dead_letter(
        self, items: Sequence[tuple[SqsRecord, NotifierError]], budget: AfterCutoff
    ) -> set[str]:
        """Copy records to the dead-letter queue; return the messageIds that arrived."""
        ...

    async def delay(self, items: Sequence[tuple[SqsRecord, int]], budget: AfterCutoff) -> int:
        """Set each record's visibility timeout (seconds); return how many were set."""
        ...


class Adapters(Protocol):
    """Everything a batch is handed, bound to the event loop that runs it. An entry point
    that sends no email (the SES events function) is handed no transport and no objects."""

    @property
    def transport(self) -> MailTransport | None: ...

    @property
    def objects(self) -> ObjectSource[Any] | None: ...

    @property
    def idempotency(self) -> IdempotencyStore | None: ...

    @property
    def recipients(self) -> RecipientDirectory | None: ...

    @property
    def suppression(self) -> SuppressionList | None: ...

    @property
    def status_store(self) -> StatusStore | None: ...

    @property
    def status_topic(self) -> StatusTopic | None: ...

    async def feedback(self) -> QueueFeedback | None:
        """The queue feedback, made when first needed; None when nothing is configured."""
        ...


class Backend(Protocol):
    """Makes the adapters for the running event loop and closes them."""

    async def prepare(self) -> None:
        """Make the adapters of this event loop ahead of the first batch, connecting nothing
        (a Lambda function's init phase)."""
        ...

    def forget_secrets(self) -> None:
        """Drop cached secrets: the next use reads them again (after a SnapStart restore)."""
        ...

    async def check_secrets(self) -> None:
        """At start: read the secrets whose shape only reading shows, and raise ConfigError
        for one no login can use (`prepare` does it too; the SQS runner does only this)."""
        ...

    def held(self) -> ProviderCondition | None:
        """What holds for every message now (`MailTransport.held`), if the transport is made."""
        ...

    async def open(self, connections: int) -> Adapters:
        """The adapters of this event loop, with a batch started on the mail transport
        (`connections` connections warmed up)."""
        ...

    async def aclose(self) -> None: ...
