"""The one place that decides a record's fate once its delivery is over.

Every record ends in one of three ways (the types live in `outcome.py`): `Ack` (SQS may
delete it: it was delivered, or was a duplicate of one that was), `Retry` (reported in
`batchItemFailures`, so SQS delivers it again; `delay` is the visibility timeout to give
it first, or None to leave the queue's), or `DeadLetter` (copied, with the reason, to the
dead-letter queue and then acknowledged).

Retrying is by age, not by count: a transient failure is retried until the notification is
older than MAX_DELIVERY_AGE (SQS's SentTimestamp is the clock), then it expires into the
dead-letter queue with its last error. The back-off between receives grows from
RETRY_BACKOFF_BASE_SECONDS and is capped at RETRY_BACKOFF_CAP_SECONDS (5 minutes), with
jitter, so that when the provider recovers, everything waiting comes back within about the
cap. A provider-wide condition (`ProviderCondition`) sends the record back for as long as
the condition is known to hold. A permanent error goes to the dead-letter queue at once when
there is one, else it is reported failed and the queue's own redrive policy moves it.
The Lambda handler and the SQS runner both settle their batches through `disposition`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from ..config import Settings
from ..errors import Expired, NotifierError, ProviderCondition
from .outcome import Ack, DeadLetter, Disposition, Outcome, Retry

#: The visibility timeout of a retried record: BACKOFF_BASE × 2^(n−1) seconds for its n-th
#: receive, at most BACKOFF_CAP, each with jitter (see `Policy.delay`).
BACKOFF_BASE = 30
BACKOFF_CAP = 300
MAX_DELIVERY_AGE = 24 * 3600


@dataclass(frozen=True)
class Policy:
    """The settings that bear on a record's fate."""

    dead_letter_queue: bool = False  # DEAD_LETTER_QUEUE_URL is set
    backoff: bool = True  # RETRY_BACKOFF
    base: int = BACKOFF_BASE  # RETRY_BACKOFF_BASE_SECONDS
    cap: int = BACKOFF_CAP  # RETRY_BACKOFF_CAP_SECONDS
    max_age: int = MAX_DELIVERY_AGE  # MAX_DELIVERY_AGE
    jitter: bool = True  # off only where a test needs exact delays

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            dead_letter_queue=settings.dead_letter_queue_url is not None,
            backoff=settings.retry_backoff,
            base=settings.retry_backoff_base,
            cap=settings.retry_backoff_cap,
            max_age=settings.max_delivery_age,
        )

    def delay(self, receive_count: int) -> int:
        """The back-off of the n-th failed receive: between half of base × 2^(n−1) (at most
        the cap) and all of it ("equal jitter": a wave of failures comes back spread out, and
        none sooner than half its step)."""
        step = backoff_seconds(receive_count, base=self.base, cap=self.cap)
        if not self.jitter:
            return step
        return math.ceil(random.uniform(step / 2, step))

    def hold(self, error: ProviderCondition) -> int:
        """The back-off of a record sent back by a provider-wide condition: until the pool
        tries again (`retry_after`), spread over up to half as long again, within the cap."""
        wait = max(1, math.ceil(error.retry_after))
        if self.jitter:
            wait = math.ceil(random.uniform(wait, wait * 1.5))
        return min(self.cap, wait)


def disposition(
    outcome: Outcome,
    policy: Policy,
    *,
    dead_letter_failed: bool = False,
    now: float | None = None,
) -> Disposition:
    """The fate of one record. `dead_letter_failed`: its dead-letter copy did not arrive,
    so it stays in the queue as a retry. `now` (epoch seconds) is the clock of its age."""
    error = outcome.error
    if error is None:
        return Ack()
    record = outcome.record
    if record is None:  # not even an SQS record: nothing to copy or to delay
        return Retry()
    if policy.dead_letter_queue and not dead_letter_failed:
        if not error.transient:
            return DeadLetter(f"{error.kind}: {error.reason}")
        age = record.age(time.time() if now is None else now)
        if age is not None and age >= policy.max_age:
            expired = expired_error(error, age, policy.max_age)
            return DeadLetter(f"{expired.kind}: {expired.reason}", expired)
    if not policy.backoff:
        return Retry()
    if isinstance(error, ProviderCondition):
        return Retry(policy.hold(error))
    return Retry(policy.delay(record.receive_count))


def expired_error(last: NotifierError, age: float, max_age: int) -> Expired:
    """What an expired notification's dead letter says: how old, and its last error."""
    return Expired(
        f"not delivered within MAX_DELIVERY_AGE ({max_age} s; it is {age:.0f} s old); "
        f"last error {last.kind}: {last.reason}"
    )


def backoff_seconds(receive_count: int, *, base: int = BACKOFF_BASE, cap: int = BACKOFF_CAP) -> int:
    """The step of the n-th failed receive, before jitter: base × 2^(n−1), at most `cap`."""
    if base < 0 or cap < 0:
        raise ValueError("base and cap must not be negative")
    exponent = min(max(receive_count, 1) - 1, 32)  # 2^32 × base is past any cap
    return min(cap, base << exponent)
