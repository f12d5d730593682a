"""A tiny control channel for the helper processes (sink, proxy).

One TCP port on 127.0.0.1, one command per line (`STATS` or `RESET`), one JSON object per
answer line. `RESET` answers with the counters as they were, then zeroes them, so a
measurement reads exactly what happened between two calls.

Helpers announce readiness by printing one JSON line on stdout (`{"ready": true, ...}`);
`announce` and the `ready_line` reader in `bench.procs` are the two ends of that.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

LOOPBACK = "127.0.0.1"

StatsFn = Callable[[bool], dict[str, Any]]  # reset -> counters (before the reset)


async def serve_control(stats: StatsFn) -> asyncio.Server:
    """Serve STATS/RESET on a free loopback port (read the port from the returned server)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                command = line.strip().upper()
                if command in (b"STATS", b"RESET"):
                    answer: dict[str, Any] = stats(command == b"RESET")
                else:
                    answer = {"error": f"unknown command {command.decode(errors='replace')}"}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, LOOPBACK, 0)


def bound_port(server: asyncio.Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


def query(port: int, command: str = "STATS", timeout: float = 10.0) -> dict[str, Any]:
    """Send one command to a control port and return the decoded answer."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(command.encode() + b"\n")
        buffer = b""
        while not buffer.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            buffer += chunk
    answer: dict[str, Any] = json.loads(buffer)
    if "error" in answer:
        raise RuntimeError(f"control port {port}: {answer['error']}")
    return answer


def announce(info: dict[str, Any]) -> None:
    """Tell the parent we are ready (one JSON line on stdout), then stop using stdout."""
    sys.stdout.write(json.dumps({"ready": True, **info}) + "\n")
    sys.stdout.flush()


async def wait_for_stop() -> None:
    """Return on SIGTERM/SIGINT, or when the parent that started us has gone away."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    parent = os.getppid()

    async def orphan_watch() -> None:
        while not stop.is_set():
            if os.getppid() != parent:
                stop.set()
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(orphan_watch())
    try:
        await stop.wait()
    finally:
        watcher.cancel()
