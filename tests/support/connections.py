"""Every connection a peer's stream server accepted, closed when the peer stops.

Cancelling the handler tasks a peer knows of is not enough: a handler registers its task on
its first step, and one cancelled (or left pending by a stopping loop) before that step never
runs its `finally`, so nothing closes its socket; it is left to the garbage collector (a
ResourceWarning, an error in this suite). `Connections` takes each connection when asyncio
makes it and starts its handler's task itself, so `close` reaches every one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Connections:
    """Wrap a peer's `asyncio.start_server` callback with `track`; `close` at its stop."""

    def __init__(self) -> None:
        self._open: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    def track(
        self, handler: Handler
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Called from the protocol's connection_made, in the server's loop.
            task = asyncio.get_running_loop().create_task(self._serve(handler, reader, writer))
            self._open[task] = writer
            task.add_done_callback(self._done)

        return accepted

    def _done(self, task: asyncio.Task[None]) -> None:
        writer = self._open.pop(task, None)
        if writer is not None:
            writer.close()  # a task cancelled before its first step never ran `_serve`

    @staticmethod
    async def _serve(
        handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    async def close(self) -> None:
        """Cancel every handler still running (or not started) and wait for them: each
        connection is closed; one more turn of the loop lets the transports finish closing
        before the loop may stop."""
        tasks = list(self._open)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)
