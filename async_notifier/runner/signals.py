"""SIGTERM and SIGINT: finish the batch in flight, then stop; a second one stops at once."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterator

from ..logs import get_logger
from .stats import RunnerStats

log = get_logger()


@contextlib.contextmanager
def stop_on_signals(
    stop: asyncio.Event, on_second: Callable[[], object] | None = None
) -> Iterator[None]:
    """SIGTERM/SIGINT set `stop` (finish the batch in flight); a second one calls `on_second`.

    Must be entered inside the running loop. Handlers are removed on exit.
    """
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)

    def handle(signum: int) -> None:
        if stop.is_set() and on_second is not None:
            log.warning("second signal: stopping now", extra={"signal": signum})
            on_second()
            return
        log.info("signal received: stopping after the batch in flight", extra={"signal": signum})
        stop.set()

    for signum in signals:
        loop.add_signal_handler(signum, handle, signum)
    try:
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


async def run_until_signal(work: Callable[[asyncio.Event], Awaitable[RunnerStats]]) -> RunnerStats:
    """Run `work(stop)` with SIGTERM/SIGINT wired to `stop`; a second signal cancels it."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(work(stop))
    with stop_on_signals(stop, on_second=task.cancel):
        return await task
