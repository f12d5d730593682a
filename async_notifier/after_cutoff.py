"""The time for the work after the records: each call bounded, what does not fit skipped.

Dead letters, retry back-off and releasing the idempotency claims of cut-off records run
after the cutoff. An invocation that overruns is killed and its whole batch fails, so every
email already sent goes out again: far worse than a dead letter not sent (the record is
reported failed), a back-off not set (SQS's own visibility applies) or a claim left to
expire. So each call gets a short timeout of its own, never runs past the deadline's `end`,
is not retried past either, and a step that leaves something undone logs one warning with
the messageIds concerned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from .deadline import Deadline
from .logs import get_logger

log = get_logger()

#: Seconds one call may take: an SQS or DynamoDB call normally answers in milliseconds.
CALL_TIMEOUT = 3.0
#: Seconds for all of it when there is no deadline (tests, the SQS runner).
WITHOUT_DEADLINE = 10.0

_T = TypeVar("_T")


class OutOfTime(Exception):
    """A call did not fit: no time was left for it, or it ran out of its time."""


class AfterCutoff:
    """The time left for the work after the records, shared by its steps.

    Ends at `deadline.end`, or `WITHOUT_DEADLINE` seconds after it is made when there is no
    deadline.
    """

    def __init__(self, deadline: Deadline | None, *, call_timeout: float = CALL_TIMEOUT) -> None:
        self.end = deadline.end if deadline is not None else time.monotonic() + WITHOUT_DEADLINE
        self.call_timeout = call_timeout

    def remaining(self) -> float:
        return self.end - time.monotonic()

    async def call(self, operation: Callable[[], Awaitable[_T]]) -> _T:
        """One call within its timeout and the end; `OutOfTime` when it does not fit.

        The operation's own errors pass through; so does a cancellation from outside.
        """
        limit = min(self.call_timeout, self.remaining())
        if limit <= 0:
            raise OutOfTime("no time left")
        try:
            async with asyncio.timeout(limit) as scope:
                return await operation()
        except TimeoutError:
            if scope.expired():
                raise OutOfTime(f"no answer within {limit:.2f} s") from None
            raise

    async def attempt(
        self, step: str, message_ids: Iterable[str], operation: Callable[[], Awaitable[_T]]
    ) -> _T | None:
        """`call`, but never raising: a call that did not fit or failed is logged, None."""
        try:
            return await self.call(operation)
        except OutOfTime as exc:
            self.skipped(step, message_ids, str(exc))
        except Exception as exc:  # the type only: an error text may echo what was sent
            self.skipped(step, message_ids, f"failed: {type(exc).__name__}")
        return None

    def skipped(self, step: str, message_ids: Iterable[str], reason: str) -> None:
        """The one warning for a step that left `message_ids` undone."""
        log.warning(
            "work after the cutoff left undone",
            extra={"step": step, "messageIds": sorted(message_ids), "reason": reason},
        )
