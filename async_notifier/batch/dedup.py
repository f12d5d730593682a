"""At most one email per notification within a batch: duplicates share the first's outcome.

SQS delivers at least once and a batch may carry the same notification twice. Within a
batch the worker keeps an in-process map of futures keyed by the notification's identity;
across invocations the optional idempotency store (`aws/idempotency.py`) does the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import NotifierError, OriginalCancelled, PermanentError, TransientError

_T = TypeVar("_T")


class InBatchDeduplicator:
    """Lets only the first record of each identity do the work; the others share its outcome.

    Each waiter gets a future of its own, so cancelling one waiter (a task awaiting a
    future cancels that future) cannot disturb the others.
    """

    def __init__(self) -> None:
        self._waiters: dict[str, list[asyncio.Future[NotifierError | None]]] = {}
        self._outcomes: dict[str, NotifierError | None] = {}

    def claim(self, identity: str) -> asyncio.Future[NotifierError | None] | None:
        """None: the caller owns `identity` and must `resolve` it. Otherwise await the future."""
        if identity in self._outcomes:  # the first record already finished
            future = asyncio.get_running_loop().create_future()
            future.set_result(self._outcomes[identity])
            return future
        waiters = self._waiters.get(identity)
        if waiters is None:
            self._waiters[identity] = []
            return None
        future = asyncio.get_running_loop().create_future()
        waiters.append(future)
        return future

    def resolve(self, identity: str, error: NotifierError | None) -> None:
        """Publish the owner's outcome (None = delivered). Only the first call counts."""
        if identity in self._outcomes:
            return
        self._outcomes[identity] = error
        for future in self._waiters.pop(identity, []):
            if not future.done():
                future.set_result(error)

    def resolve_pending(self, error: NotifierError) -> None:
        """Fail every identity still unresolved: a last resort so no waiter hangs."""
        for identity in list(self._waiters):
            self.resolve(identity, error)

    async def run(self, identity: str, work: Callable[[], Awaitable[_T]]) -> _T | None:
        """Do `work` if this is the first record for `identity`, else share the first's outcome.

        Returns work's result for the owner and None for a duplicate that was delivered;
        raises an error of the owner's class for a duplicate whose original failed. The
        owner's failure, cancellation included, always resolves the waiters.
        """
        waiter = self.claim(identity)
        if waiter is not None:
            error = await waiter
            if error is not None:
                raise duplicate_error(error)
            return None
        try:
            result = await work()
        except NotifierError as exc:
            self.resolve(identity, exc)
            raise
        except asyncio.CancelledError:
            self.resolve(identity, OriginalCancelled("the first record was cancelled"))
            raise
        except BaseException as exc:
            self.resolve(identity, TransientError(f"the first record failed: {type(exc).__name__}"))
            raise
        self.resolve(identity, None)
        return result


def duplicate_error(error: NotifierError) -> NotifierError:
    """A fresh error of the original's class for a duplicate (exceptions are not shareable)."""
    reason = f"same notification as a record that failed: {error.reason}"
    try:
        copy = type(error)(reason)
    except TypeError:  # a subclass with another constructor: keep the retry semantics
        copy = TransientError(reason) if error.transient else PermanentError(reason)
    return copy
