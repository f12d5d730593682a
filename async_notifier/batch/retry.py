"""Retry transient failures inside the invocation, with backoff, while time allows.

Another SQS delivery costs a whole visibility timeout; a short in-process retry
with full jitter rides out a dropped connection or a 451 at a fraction of that.
Permanent errors and the ambiguous "may have been delivered" case are never
retried here. Each record has its own `Retrier`, which counts what it retried.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ..deadline import Deadline
from ..errors import DeliveryUnknown, NotifierError, ProviderCondition

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        """Full jitter (AWS's recommendation): spreads retries of a whole batch apart."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))

    def should_retry(self, error: NotifierError) -> bool:
        # What holds for every message is not retried here: the record goes back at once.
        return error.transient and not isinstance(error, DeliveryUnknown | ProviderCondition)


class Retrier:
    """One record's retries: each step gets `policy.attempts`, all steps count together."""

    def __init__(self, policy: RetryPolicy, deadline: Deadline | None = None) -> None:
        self.policy = policy
        self.deadline = deadline
        self.retries = 0

    async def run(self, operation: Callable[[], Awaitable[T]]) -> T:
        attempt = 1
        while True:
            try:
                return await operation()
            except NotifierError as error:
                if attempt >= self.policy.attempts or not self.policy.should_retry(error):
                    raise
                delay = self.policy.delay(attempt)
                if self.deadline is not None and self.deadline.remaining() <= delay:
                    raise
                self.retries += 1
                attempt += 1
                await asyncio.sleep(delay)
