"""Waiting for a condition instead of sleeping for a guess of how long it takes.

A sleep long enough on an idle machine is too short on a loaded one, and a long one makes
every run slow. These poll the condition often and give up only after a generous limit, so
they cost what the condition takes and fail only when it never comes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# Far above what any condition takes on a loaded machine: reaching it means it never came.
PATIENCE = 30.0
_INTERVAL = 0.01


async def until(condition: Callable[[], bool], *, limit: float = PATIENCE, what: str = "") -> None:
    """Poll `condition` from the running event loop (which keeps running meanwhile)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit
    while not condition():
        if loop.time() > give_up:
            raise TimeoutError(f"not within {limit} s: {what or condition}")
        await asyncio.sleep(_INTERVAL)


def wait_until(condition: Callable[[], bool], *, limit: float = PATIENCE, what: str = "") -> None:
    """Poll `condition` from a thread with no event loop of its own to keep running (a
    server-side count kept by a peer's thread, say)."""
    give_up = time.monotonic() + limit
    while not condition():
        if time.monotonic() > give_up:
            raise TimeoutError(f"not within {limit} s: {what or condition}")
        time.sleep(_INTERVAL)
