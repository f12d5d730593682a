"""The one place that decides a record's fate once its delivery is over.

Every record ends in one of three ways (the types live in `outcome.py`): `Ack` (SQS may
delete it: it was delivered, or was a duplicate of one that was), `Retry` (reported in
`batchItemFailures`, so SQS delivers it again; `delay` is the visibility timeout to give
it first, growing with its receive count, or None to leave the queue's), or `DeadLetter`
(copied, with the reason, to the dead-letter queue and then acknowledged). Retrying can
only help a transient error; a permanent one goes to the dead-letter queue when there is
one, else it is reported failed and the queue's own redrive policy moves it after
`maxReceiveCount`.
The Lambda handler and the SQS runner both settle their batches through `disposition`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Settings
from .outcome import Ack, DeadLetter, Disposition, Outcome, Retry

#: The visibility timeout of a retried record: BACKOFF_BASE × 2^(n−1) seconds for its n-th
#: receive, at most BACKOFF_CAP (SQS allows up to 12 hours).
BACKOFF_BASE = 30
BACKOFF_CAP = 900


@dataclass(frozen=True)
class Policy:
    """The settings that bear on a record's fate."""

    dead_letter_queue: bool = False  # DEAD_LETTER_QUEUE_URL is set
    backoff: bool = True  # RETRY_BACKOFF
    base: int = BACKOFF_BASE
    cap: int = BACKOFF_CAP

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            dead_letter_queue=settings.dead_letter_queue_url is not None,
            backoff=settings.retry_backoff,
        )


def disposition(
    outcome: Outcome, policy: Policy, *, dead_letter_failed: bool = False
) -> Disposition:
    """The fate of one record. `dead_letter_failed`: its dead-letter copy did not arrive,
    so it stays in the queue as a retry."""
    error = outcome.error
    if error is None:
        return Ack()
    record = outcome.record
    if record is None:  # not even an SQS record: nothing to copy or to delay
        return Retry()
    if not error.transient and policy.dead_letter_queue and not dead_letter_failed:
        return DeadLetter(f"{error.kind}: {error.reason}")
    if not policy.backoff:
        return Retry()
    return Retry(backoff_seconds(record.receive_count, base=policy.base, cap=policy.cap))


def backoff_seconds(receive_count: int, *, base: int = BACKOFF_BASE, cap: int = BACKOFF_CAP) -> int:
    """Visibility timeout for the n-th failed receive: base × 2^(n−1), at most `cap`."""
    if base < 0 or cap < 0:
        raise ValueError("base and cap must not be negative")
    exponent = min(max(receive_count, 1) - 1, 32)  # 2^32 × base is past any cap
    return min(cap, base << exponent)
