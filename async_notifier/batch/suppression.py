"""One batch's view of the suppression list: few reads, whatever the batch size.

Before the records start, one read covers every address the batch names (`preload`;
the list answers 100 addresses a request, all requests at once). Addresses found later
(a Cognito user's) are gathered while the records run and read together, one request for
all that are waiting at that moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from ..errors import NotifierError
from ..logs import get_logger
from ..ports import SuppressionList

log = get_logger()


class SuppressionCheck:
    def __init__(self, store: SuppressionList) -> None:
        self._store = store
        self._known: dict[str, str | None] = {}  # address -> reason, None: not suppressed
        self._waiting: dict[str, asyncio.Future[str | None]] = {}
        self._flush: asyncio.Handle | None = None

    async def preload(self, addresses: Collection[str]) -> None:
        """Read the batch's addresses at once; a failure leaves them to `reason`."""
        wanted = {a.lower() for a in addresses} - self._known.keys()
        if not wanted:
            return
        try:
            found = await self._store.suppressed(wanted)
        except NotifierError as exc:
            log.warning("suppression list not read ahead", extra={"reason": exc.reason})
            return
        for address in wanted:
            self._known[address] = found.get(address)

    async def reason(self, address: str) -> str | None:
        """Why `address` is suppressed, or None; SuppressionUnavailable when unreadable."""
        address = address.lower()
        if address in self._known:
            return self._known[address]
        future = self._waiting.get(address)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[address] = future
            if self._flush is None:  # the records asking in this turn of the loop share it
                self._flush = asyncio.get_running_loop().call_soon(self._read_waiting)
        return await asyncio.shield(future)

    def _read_waiting(self) -> None:
        self._flush = None
        waiting, self._waiting = self._waiting, {}
        task = asyncio.ensure_future(self._store.suppressed(set(waiting)))
        task.add_done_callback(lambda done: self._answer(waiting, done))

    def _answer(
        self, waiting: dict[str, asyncio.Future[str | None]], done: asyncio.Future[dict[str, str]]
    ) -> None:
        error = None if done.cancelled() else done.exception()
        for address, future in waiting.items():
            if future.done():
                continue
            if done.cancelled():
                future.cancel()
            elif error is not None:
                # A fresh exception each: one instance raised in many tasks would collect
                # all their tracebacks.
                fresh = type(error)(error.reason) if isinstance(error, NotifierError) else error
                future.set_exception(fresh)
            else:
                reason = done.result().get(address)
                self._known[address] = reason
                future.set_result(reason)
