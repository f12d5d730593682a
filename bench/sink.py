"""A fast, count-only SMTP sink: `python -m bench.sink [--data-size-limit BYTES]`.

aiosmtpd speaks the protocol (EHLO, MAIL with SIZE, RCPT, RSET, NOOP, QUIT); two things are
changed so the sink is never what the benchmark measures:

- EHLO also advertises PIPELINING (RFC 2920). aiosmtpd reads commands one line at a time
  from a stream, so pipelined commands are answered in order; it just does not say so.
- DATA does not split the message into lines and keep them: it reads up to the terminating
  `CRLF.CRLF` in one buffered scan, counts the bytes (total, smallest and largest message),
  picks the top-level `X-Video-Id` header out of the header block (so the benchmark can
  check that every record arrived exactly once) and forgets the rest. Bytes after the
  terminator stay in the stream for the next (pipelined) command.

Counters (messages, DATA bytes, connections opened, most connections open at once, the
video ids seen) are served on a control port (see `bench.control`). The process prints
`{"ready": true, "port": P, "control_port": C}` on stdout once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from .control import LOOPBACK, announce, bound_port, serve_control, wait_for_stop

DEFAULT_DATA_SIZE_LIMIT = 64 * 1024 * 1024
_TERMINATOR = b"\r\n.\r\n"
_VIDEO_ID = re.compile(rb"^x-video-id:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)


class Counters:
    def __init__(self) -> None:
        self.messages = 0
        self.data_bytes = 0
        self.rejected = 0
        self.connections = 0
        self.open = 0
        self.max_open = 0
        self.min_size: int | None = None
        self.max_size: int | None = None
        self.video_ids: list[str] = []

    def snapshot(self, reset: bool) -> dict[str, Any]:
        stats = {
            "messages": self.messages,
            "data_bytes": self.data_bytes,
            "rejected": self.rejected,
            "connections": self.connections,
            "open": self.open,
            "max_open": self.max_open,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "video_ids": list(self.video_ids),
        }
        if reset:
            self.messages = self.data_bytes = self.rejected = self.connections = 0
            self.max_open = self.open
            self.min_size = self.max_size = None
            self.video_ids.clear()
        return stats


class _Hooks:
    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # Keep the final "250 HELP" last; PIPELINING goes among the "250-" lines.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


class SinkSMTP(SMTP):
    """One instance per TCP connection."""

    def __init__(
        self, counters: Counters, data_size_limit: int, hooks: _Hooks | None = None
    ) -> None:
        super().__init__(
            hooks or _Hooks(),
            hostname="sink.bench",
            data_size_limit=data_size_limit,
            ident="bench-sink",
        )
        self.counters = counters
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._counted:
            self._counted = True
            c = self.counters
            c.connections += 1
            c.open += 1
            c.max_open = max(c.max_open, c.open)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.counters.open -= 1
        super().connection_lost(error)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.data_size_limit or DEFAULT_DATA_SIZE_LIMIT
        reader = self._reader
        # aiosmtpd caps its stream at one command line; a whole message must fit here.
        reader._limit = max(reader._limit, limit + 1024 * 1024)  # type: ignore[attr-defined]
        try:
            # The body starts at a line start, so "CRLF . CRLF" is the first unstuffed dot line.
            data = await reader.readuntil(_TERMINATOR)
        except asyncio.LimitOverrunError:
            self.counters.rejected += 1
            await self.push("552 Error: Too much mail data")
            assert self.transport is not None
            self.transport.close()
            return
        except asyncio.IncompleteReadError:
            return  # the client went away mid-message
        size = len(data) - len(_TERMINATOR) + 2  # the message's own final CRLF counts
        if size > limit:
            self.counters.rejected += 1
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("552 Error: Too much mail data")
            return
        header_end = data.find(b"\r\n\r\n", 0, 256 * 1024)
        match = _VIDEO_ID.search(data, 0, header_end if header_end >= 0 else 0)
        c = self.counters
        c.messages += 1
        c.data_bytes += size
        c.min_size = size if c.min_size is None else min(c.min_size, size)
        c.max_size = size if c.max_size is None else max(c.max_size, size)
        if match:
            c.video_ids.append(match.group(1).decode(errors="replace").strip())
        self.message_accepted(data[: max(header_end, 0)])
        del data
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK")

    def message_accepted(self, head: bytes) -> None:
        """Called with the header block of every message accepted (subclasses look in it)."""


async def serve(data_size_limit: int) -> None:
    counters = Counters()
    loop = asyncio.get_running_loop()
    smtp_server = await loop.create_server(
        lambda: SinkSMTP(counters, data_size_limit), LOOPBACK, 0, backlog=1024
    )
    control = await serve_control(counters.snapshot)
    announce({"port": bound_port(smtp_server), "control_port": bound_port(control)})
    try:
        await wait_for_stop()
    finally:
        control.close()
        smtp_server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-size-limit", type=int, default=DEFAULT_DATA_SIZE_LIMIT)
    parser.add_argument("--run-dir", help="only marks the process as this run's (for pgrep)")
    args = parser.parse_args()
    asyncio.run(serve(args.data_size_limit))


if __name__ == "__main__":
    main()
