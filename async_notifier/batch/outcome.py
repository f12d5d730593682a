"""What happened to each record of a batch, and what the batch adds up to.

A delivery returns an `Outcome`; the batch keeps the outcomes of the records that failed
(in batch order) and a tally of the rest, so memory does not grow with a batch of 10,000
good records. Once the batch is over, each failure gets its fate (`disposition.py`), and
the fates say what goes back to SQS.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ..delivery_status import StatusChange
from ..errors import NotifierError
from ..messages import SqsRecord
from ..ports import Receipt

# "recorded": an SES event written to the suppression list (the second entry point).
Action = Literal["sent", "sent_link", "duplicate", "already_delivered", "recorded"]


@dataclass(frozen=True)
class Ack:
    """Delete it: delivered (or a duplicate of a delivered one)."""


@dataclass(frozen=True)
class Retry:
    """Report it failed; `delay` seconds of visibility first (None: the queue's own)."""

    delay: int | None = None


@dataclass(frozen=True)
class DeadLetter:
    """Copy it to the dead-letter queue with `reason`, then delete it. `error`: what the
    dead letter records when it is not the record's own error (an `Expired` one)."""

    reason: str
    error: NotifierError | None = None


Disposition = Ack | Retry | DeadLetter


@dataclass(slots=True)
class Outcome:
    """One record's result: an action when it was delivered, an error when it was not."""

    message_id: str
    error: NotifierError | None = None
    action: Action | None = None
    record: SqsRecord | None = None  # kept for a failure: dead letter, back-off
    video_id: str | None = None
    status: str | None = None
    tracking_id: str | None = None  # the notification's, once its body was parsed
    notification_id: str | None = None  # the producer's, when the message says one
    attempt: int = 1  # SQS's receive count of the record
    # A status a provider reported (the SES events function): recorded once the record is
    # acknowledged (`batch/status.py`).
    reported: StatusChange | None = None
    bytes: int = 0  # the ZIP's size, when it was attached
    retries: int = 0  # attempts repeated inside the invocation
    maybe_delivered: bool = False  # cut off after its message data went out
    receipt: Receipt | None = None  # the transport and the provider's id, once accepted
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Tally:
    """What the successful records add up to: all that metrics and logs need of them."""

    count: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    bytes_attached: int = 0  # ZIPs sent as attachments (not as links)
    retried: int = 0  # records that needed at least one retry
    retries: int = 0
    transports: Counter[str] = field(default_factory=Counter)  # emails accepted, by transport

    def add(self, outcome: Outcome) -> None:
        self.count += 1
        self.actions[outcome.action or "sent"] += 1
        if outcome.receipt is not None:
            self.transports[outcome.receipt.transport] += 1
        if outcome.action == "sent":
            self.bytes_attached += outcome.bytes
        self.retried += outcome.retries > 0
        self.retries += outcome.retries


@dataclass
class StatusCounts:
    """What one batch's delivery-status writes came to (`status.StatusWriter`)."""

    active: bool = False  # a status table or topic is configured
    written: int = 0  # changes recorded (as the current status or in the history)
    duplicates: int = 0  # changes the store had already recorded
    failed: int = 0  # changes given up: StatusWriteFailed
    unknown: int = 0  # SES's changes for notifications the store did not know yet
    published: int = 0
    publish_failed: int = 0


@dataclass
class BatchResult:
    """The failed records' outcomes in batch order, the tally of the rest, and (once the
    batch is settled) each failure's fate, in the same order as `errors`."""

    errors: list[Outcome] = field(default_factory=list)
    delivered: Tally = field(default_factory=Tally)
    fates: list[Disposition] = field(default_factory=list)
    status: StatusCounts = field(default_factory=StatusCounts)  # the delivery statuses written

    @classmethod
    def of(cls, outcomes: Iterable[Outcome]) -> BatchResult:
        result = cls()
        for outcome in outcomes:
            result.add(outcome)
        return result

    def add(self, outcome: Outcome) -> None:
        if outcome.ok:
            self.delivered.add(outcome)
        else:
            self.errors.append(outcome)

    @property
    def records(self) -> int:
        return self.delivered.count + len(self.errors)

    def settled(self) -> list[tuple[Outcome, Disposition]]:
        return list(zip(self.errors, self.fates, strict=True))

    @property
    def dead_lettered(self) -> list[Outcome]:
        """Failures now in the dead-letter queue: SQS may delete them."""
        return [o for o, fate in self.settled() if isinstance(fate, DeadLetter)]

    @property
    def failures(self) -> list[Outcome]:
        """Records SQS must deliver again (fate `Retry`); before settling, every failure."""
        if not self.fates:
            return list(self.errors)
        return [o for o, fate in self.settled() if isinstance(fate, Retry)]

    def response(self) -> dict[str, list[dict[str, str]]]:
        """The partial batch response Lambda expects with ReportBatchItemFailures.

        A record without a messageId (Lambda never sends one) is left out: an empty
        identifier would make Lambda retry the whole batch and resend every email in it.
        """
        return {
            "batchItemFailures": [
                {"itemIdentifier": o.message_id} for o in self.failures if o.message_id
            ]
        }
