"""A TCP delay proxy: `python -m bench.proxy --route NAME=HOST:PORT:DELAY_MS [...]`.

Each route listens on its own free loopback port and forwards to HOST:PORT. Every chunk the
client sends is forwarded `DELAY_MS` after it arrived (chunks keep their order and their
spacing, they are not delayed one after another); what the server sends goes back at once.
So one request/response exchange costs one delay, and commands a client pipelines into one
write cost one delay together: a remote server one round trip of DELAY_MS away, with
unlimited bandwidth (at most `MAX_QUEUED_BYTES` are held per connection, about a
bandwidth-delay product of 16 MiB per delay).

A client that half-closes is half-closed upstream after the same delay; when the server
closes, the client side is closed. Per route the proxy counts connections and bytes, served
on a control port (see `bench.control`). Ready line: `{"ready": true, "ports": {NAME: P},
"control_port": C}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from .control import LOOPBACK, announce, bound_port, serve_control, wait_for_stop

CHUNK = 256 * 1024
MAX_QUEUED_BYTES = 16 * 1024 * 1024


@dataclass
class Turns:
    """Counts client turns on one connection: the first chunk the client sends, and each
    chunk it sends after the server has answered something. For a request/response protocol
    that is the number of round trips (pipelined commands in one burst are one turn)."""

    route: Route
    answered: bool = True

    def client_sent(self) -> None:
        if self.answered:
            self.route.turns += 1
            self.answered = False


@dataclass
class Route:
    name: str
    host: str
    port: int
    delay: float  # seconds
    connections: int = 0
    client_bytes: int = 0
    server_bytes: int = 0
    turns: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def snapshot(self, reset: bool) -> dict[str, Any]:
        stats = {
            "connections": self.connections,
            "client_bytes": self.client_bytes,
            "server_bytes": self.server_bytes,
            "turns": self.turns,
            "delay_ms": self.delay * 1000,
        }
        if reset:
            self.connections = self.client_bytes = self.server_bytes = self.turns = 0
        return stats


def parse_route(text: str) -> Route:
    try:
        name, target = text.split("=", 1)
        host, port, delay = target.rsplit(":", 2)
        return Route(name=name, host=host, port=int(port), delay=float(delay) / 1000)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"route must look like NAME=HOST:PORT:DELAY_MS, got {text!r}"
        ) from None


def _half_close(writer: asyncio.StreamWriter) -> None:
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()
    else:
        writer.close()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, turns: Turns, upstream: bool
) -> None:
    """Copy one direction at once."""
    route = turns.route
    while data := await reader.read(CHUNK):
        if upstream:
            route.client_bytes += len(data)
            turns.client_sent()
        else:
            route.server_bytes += len(data)
            turns.answered = True
        writer.write(data)
        await writer.drain()
    _half_close(writer)


async def _pump_delayed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, turns: Turns
) -> None:
    """Copy client to server, each chunk `route.delay` after it arrived."""
    route = turns.route
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    room = asyncio.Condition()
    queued = 0

    async def forward() -> None:
        nonlocal queued
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    _half_close(writer)
                    return
                writer.write(data)
                await writer.drain()
                async with room:
                    queued -= len(data)
                    room.notify_all()
        finally:
            async with room:  # wake the reader if we stop early (upstream gone)
                room.notify_all()

    forwarder = asyncio.create_task(forward())
    try:
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((loop.time() + route.delay, data))
            if not data:
                break
            route.client_bytes += len(data)
            turns.client_sent()
            async with room:
                queued += len(data)
                while queued > MAX_QUEUED_BYTES and not forwarder.done():
                    await room.wait()
            if forwarder.done():
                break
        await forwarder
    finally:
        forwarder.cancel()


async def _handle(
    route: Route, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(route.host, route.port)
    except OSError:
        client_writer.close()
        return
    except BaseException:  # the route stopped meanwhile
        client_writer.close()
        raise
    route.connections += 1
    turns = Turns(route)
    up = (
        _pump_delayed(client_reader, server_writer, turns)
        if route.delay > 0
        else _pump(client_reader, server_writer, turns, upstream=True)
    )
    tasks = [
        asyncio.create_task(up),
        asyncio.create_task(_pump(server_reader, client_writer, turns, upstream=False)),
    ]
    up_task, down_task = tasks
    try:
        # The connection ends when the server closes it, or when the client side fails.
        # A client EOF is only forwarded: the server answers what it still has and closes.
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if down_task not in done and up_task.exception() is None:
            await asyncio.wait([down_task])
    finally:
        for task in tasks:
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:  # even when the route stops (cancels this) meanwhile: no socket left open
            for writer in (client_writer, server_writer):
                writer.close()


async def start_route(route: Route) -> asyncio.Server:
    """Listen for `route` on a free loopback port (also used in-process by the tests)."""

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Registered as asyncio makes the connection, not on the task's first step: a task
        # that stop_route cancels before that step never runs `_handle`, so its `done`
        # callback closes the client's socket. (Our own task, not the stream callback's:
        # ending cancelled is then no error.)
        task = asyncio.get_running_loop().create_task(_handle(route, reader, writer))
        route.tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            route.tasks.discard(task)
            writer.close()

        task.add_done_callback(done)

    return await asyncio.start_server(accepted, LOOPBACK, 0, backlog=1024)


async def stop_route(route: Route, server: asyncio.Server) -> None:
    """Stop listening and close every connection, held requests dropped; one more turn of
    the loop lets the transports finish closing before the loop may stop."""
    server.close()
    for task in list(route.tasks):
        task.cancel()
    await asyncio.gather(*route.tasks, return_exceptions=True)
    await asyncio.sleep(0)


async def serve(routes: list[Route]) -> None:
    servers = [await start_route(route) for route in routes]
    ports = {route.name: bound_port(server) for route, server in zip(routes, servers, strict=True)}

    def stats(reset: bool) -> dict[str, Any]:
        return {route.name: route.snapshot(reset) for route in routes}

    control = await serve_control(stats)
    announce({"ports": ports, "control_port": bound_port(control)})
    try:
        await wait_for_stop()
    finally:
        control.close()
        for route, server in zip(routes, servers, strict=True):
            await stop_route(route, server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", type=parse_route, action="append", required=True)
    parser.add_argument("--run-dir", help="only marks the process as this run's (for pgrep)")
    args = parser.parse_args()
    asyncio.run(serve(args.route))


if __name__ == "__main__":
    main()
