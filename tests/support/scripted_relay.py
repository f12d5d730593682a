"""A scripted SMTP relay: replies per command from a table, for the conformance tests.

aiosmtpd answers a command only once it has parsed it, and the end of data only once the
data has ended; real servers also answer in the middle of a body (`552 5.3.4` after the
first megabytes) and hang up at any point. This relay is written on plain asyncio streams
so that a script can make it do all of that: a list of `Rule`s, each matching one command
(the n-th occurrence, server-wide or on its connection, optionally only on a connection
that already carried a message) and saying what to answer, after how long, and whether to
hang up. Unmatched commands get a well-behaved server's answer.

Commands are read one at a time and answered in order, each only after it was read, so a
pipelining client is served the way RFC 2920 demands. It serves from its own thread and
event loop; what it saw is recorded behind one condition variable for the tests to count.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from connections import Connections
from servers import LOOPBACK

from async_notifier.local.service import Service

# What a rule can match: a command's verb, the greeting, the end-of-data verdict (MESSAGE),
# or the body itself (BODY: an early reply once `after_bytes` of it have arrived).
COMMANDS = frozenset(
    {"GREETING", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "BODY", "MESSAGE", "NOOP", "RSET", "QUIT"}
)
DEFAULT_REPLIES = {
    "GREETING": "220 relay.test ESMTP scripted",
    "HELO": "250 relay.test",
    "MAIL": "250 2.1.0 Ok",
    "RCPT": "250 2.1.5 Ok",
    "DATA": "354 End data with <CR><LF>.<CR><LF>",
    "MESSAGE": "250 2.0.0 Ok: queued",
    "NOOP": "250 2.0.0 Ok",
    "RSET": "250 2.0.0 Ok",
    "QUIT": "221 2.0.0 Bye",
}
# Lines inside a body that a client should never have written there (it lost track of DATA).
_COMMAND_LIKE = re.compile(rb"(MAIL FROM:|RCPT TO:|DATA|RSET|NOOP|QUIT|EHLO |HELO )", re.I)
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.I | re.M)
_END = b"\r\n.\r\n"
# A hang-up half-closes, then drains what the client still writes for at most this long.
_DRAIN_SECONDS = 2.0


@dataclass(frozen=True)
class Rule:
    """What to do for one command (occurrence).

    `nth`: the 1-based occurrence of `command` it applies to (None: every one), counted
    server-wide or, with `per_connection`, on each connection. `reused`: True only on a
    connection that already finished a DATA transaction, False only on a fresh one.
    `reply`: code and text, lines separated by "\\n" (None: the default answer).
    `delay`: seconds before answering (`math.inf`: never answer, the connection stalls).
    `hang_up`: close after the reply (or, with `close_instead`, in its place).
    `after_bytes`: for BODY, answer once that many body bytes arrived.
    `contains`: only a command whose line contains this (e.g. a recipient's address).
    """

    command: str
    reply: str | None = None
    nth: int | None = None
    per_connection: bool = False
    reused: bool | None = None
    delay: float = 0.0
    hang_up: bool = False
    close_instead: bool = False
    after_bytes: int = 0
    contains: str | None = None

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise ValueError(f"unknown command {self.command!r}; one of {sorted(COMMANDS)}")
        if self.command == "BODY" and self.reply is None and not self.close_instead:
            raise ValueError("a BODY rule needs a reply or close_instead")


@dataclass
class Upload:
    """One DATA transaction's body as received: bytes before the end (or the hang-up)."""

    connection: int
    message_id: str | None
    size: int = 0
    complete: bool = False
    verdict: str | None = None


@dataclass
class ConnectionLog:
    number: int  # 1-based, in the order the relay accepted them
    commands: list[str] = field(default_factory=list)
    transactions: int = 0  # DATA transactions that reached their end (answered or not)


class _Hangup(Exception):
    """The session ends. `graceful`: a reply was just written, which the client must see
    (half-close and drain); otherwise the socket is dropped at once, unread bytes and all
    (the kernel answers the client's next segment with a reset)."""

    def __init__(self, *, graceful: bool = True) -> None:
        super().__init__()
        self.graceful = graceful


class ScriptedRelay(Service):
    """A real SMTP server on 127.0.0.1 answering from `script` (settable while running)."""

    def __init__(
        self,
        script: list[Rule] | None = None,
        *,
        pipelining: bool = True,
        size: int | None = None,
        eight_bit: bool = True,
    ) -> None:
        self.host = LOOPBACK
        self.port = 0
        self.script = list(script or [])
        self.pipelining = pipelining
        self.size = size  # SIZE advertised (0: no limit) or None: not advertised
        self.eight_bit = eight_bit
        self._cond = threading.Condition()
        self._counts: dict[tuple[str, int], int] = {}  # (command, connection or 0) -> seen
        self.connections: list[ConnectionLog] = []
        self.uploads: list[Upload] = []
        self.commands_in_body: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._connections = Connections()
        self._stopping = False

    # -- observations (any thread)

    @property
    def connections_opened(self) -> int:
        with self._cond:
            return len(self.connections)

    @property
    def data_transactions(self) -> int:
        """DATA commands answered 354 (each starts an upload)."""
        with self._cond:
            return len(self.uploads)

    def uploads_of(self, message_id: str) -> list[Upload]:
        with self._cond:
            return [u for u in self.uploads if u.message_id == message_id]

    @property
    def accepted(self) -> list[str]:
        """Message-IDs of the messages the relay answered 250 at their end of data."""
        with self._cond:
            return [
                u.message_id or "?"
                for u in self.uploads
                if u.complete and (u.verdict or "").startswith("2")
            ]

    def count(self, command: str) -> int:
        """How many times `command` was received, on every connection."""
        with self._cond:
            return self._counts.get((command, 0), 0)

    def wait_until(self, predicate: str, value: int, timeout: float = 5.0) -> bool:
        """Block until the counter `predicate` (a property name) reaches `value`."""
        with self._cond:
            return self._cond.wait_for(lambda: self._read(predicate) >= value, timeout)

    def _read(self, name: str) -> int:
        if name == "connections_opened":
            return len(self.connections)
        if name == "data_transactions":
            return len(self.uploads)
        return self._counts.get((name, 0), 0)

    # -- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("scripted relay already running")
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._server = await asyncio.start_server(
                self._connections.track(self._serve), self.host, 0
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="scripted-relay", daemon=True)
        self._thread.start()
        if not ready.wait(10.0):
            raise RuntimeError("scripted relay did not start")

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            self._stopping = True
            if self._server is not None:
                self._server.close()
            await self._connections.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10.0)
        loop.close()
        self._loop = self._thread = None

    # -- the server (relay thread)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._cond:
            conn = ConnectionLog(len(self.connections) + 1)
            self.connections.append(conn)
            self._cond.notify_all()
        session = _Session(self, conn, reader, writer)
        graceful = False
        try:
            await session.run()
        except _Hangup as hangup:
            graceful = hangup.graceful
        except (ConnectionError, asyncio.CancelledError):  # cancelled: the relay is stopping
            pass
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await session.hang_up(drain=graceful and not self._stopping)

    def _rule_for(self, command: str, conn: ConnectionLog, line: str = "") -> Rule | None:
        """Count this occurrence of `command` and return the first rule that matches it."""
        with self._cond:
            for key in ((command, 0), (command, conn.number)):
                self._counts[key] = self._counts.get(key, 0) + 1
            self._cond.notify_all()
            server_n = self._counts[(command, 0)]
            conn_n = self._counts[(command, conn.number)]
            for rule in self.script:
                if rule.command != command:
                    continue
                if rule.nth is not None and rule.nth != (
                    conn_n if rule.per_connection else server_n
                ):
                    continue
                if rule.reused is not None and rule.reused != (conn.transactions > 0):
                    continue
                if rule.contains is not None and rule.contains not in line:
                    continue
                return rule
        return None

    def _log(self, conn: ConnectionLog, line: str) -> None:
        with self._cond:
            conn.commands.append(line)

    def _new_upload(self, conn: ConnectionLog) -> Upload:
        with self._cond:
            upload = Upload(conn.number, None)
            self.uploads.append(upload)
            self._cond.notify_all()
            return upload

    def _body_progress(self, upload: Upload, data: bytes, size: int) -> None:
        with self._cond:
            upload.size = size
            if upload.message_id is None and (found := _MESSAGE_ID.search(data[:16384])):
                upload.message_id = found.group(1).decode("ascii", "replace")

    def _body_line(self, line: bytes) -> None:
        with self._cond:
            self.commands_in_body.append(line[:60].decode("ascii", "replace"))

    def _finished(self, conn: ConnectionLog, upload: Upload, verdict: str | None) -> None:
        with self._cond:
            upload.complete = True
            upload.verdict = verdict
            conn.transactions += 1
            self._cond.notify_all()


class _Session:
    """One client connection: reads commands in order and answers each from the script."""

    def __init__(
        self,
        relay: ScriptedRelay,
        conn: ConnectionLog,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.relay = relay
        self.conn = conn
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()  # read but not yet consumed (pipelined commands, body)
        self.mail = False
        self.recipients = 0

    async def run(self) -> None:
        await self.answer("GREETING")
        while True:
            line = (await self.readline()).decode("utf-8", "replace")
            self.relay._log(self.conn, line)
            verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                self.mail, self.recipients = False, 0
                await self.answer(verb, self.ehlo() if verb == "EHLO" else None)
            elif verb == "MAIL":
                self.mail = await self.answer(
                    "MAIL", "503 5.5.1 nested MAIL" if self.mail else None
                )
                self.recipients = 0
            elif verb == "RCPT":
                ok = await self.answer("RCPT", None if self.mail else "503 5.5.1 need MAIL", line)
                self.recipients += ok
            elif verb == "DATA":
                refusal = None if self.recipients else "554 5.5.1 Error: no valid recipients"
                if await self.answer("DATA", refusal):
                    await self.body()
                self.mail, self.recipients = False, 0
            elif verb in ("RSET", "NOOP", "QUIT"):
                if verb == "RSET":
                    self.mail, self.recipients = False, 0
                await self.answer(verb)
                if verb == "QUIT":
                    raise _Hangup
            else:
                await self.write("502 5.5.2 Error: command not recognized")

    async def fill(self) -> None:
        chunk = await self.reader.read(65536)
        if not chunk:
            raise _Hangup(graceful=False)
        self.buffer += chunk

    async def readline(self) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > 4096:
                raise _Hangup(graceful=False)  # not SMTP
            await self.fill()
        line = bytes(self.buffer[:end]).rstrip(b"\r")
        del self.buffer[: end + 1]
        return line

    def ehlo(self) -> str:
        lines = ["250 relay.test"]
        if self.relay.pipelining:
            lines.append("PIPELINING")
        if self.relay.size is not None:
            lines.append(f"SIZE {self.relay.size}")
        if self.relay.eight_bit:
            lines.append("8BITMIME")
        lines.append("ENHANCEDSTATUSCODES")
        return "\n".join(lines)

    async def answer(self, command: str, default: str | None = None, line: str = "") -> bool:
        """Answer `command` by the script (else `default`, else the usual reply); True when
        the answer lets the transaction go on (2xx, or 354 to DATA)."""
        rule = self.relay._rule_for(command, self.conn, line)
        text = (rule.reply if rule else None) or default or DEFAULT_REPLIES.get(command, "250 Ok")
        await self.obey(rule, text)
        code = int(text[:3])
        return code == 354 if command == "DATA" else 200 <= code < 300

    async def obey(
        self, rule: Rule | None, text: str, replying: Callable[[], None] | None = None
    ) -> None:
        """Wait, then reply `text` or hang up, as `rule` says; `replying` runs just before
        the reply is written."""
        if rule is not None and rule.delay:
            await asyncio.sleep(rule.delay if math.isfinite(rule.delay) else 1e9)
        if rule is not None and rule.close_instead:
            raise _Hangup(graceful=False)
        if replying is not None:
            replying()
        await self.write(text)
        if rule is not None and rule.hang_up:
            raise _Hangup

    async def body(self) -> None:
        """Read the data up to its end mark, answering early if a BODY rule says so."""
        relay, upload = self.relay, self.relay._new_upload(self.conn)
        early = relay._rule_for("BODY", self.conn)
        data = bytearray(b"\r\n")  # the CRLF before the first line belongs to the search
        line_start = 2  # where the next body line starts in `data`
        while True:
            data += self.buffer
            self.buffer.clear()
            end = data.find(_END, max(0, line_start - 2))
            scan_to = end + 2 if end >= 0 else len(data)
            while (newline := data.find(b"\n", line_start, scan_to)) >= 0:
                if _COMMAND_LIKE.match(data, line_start):
                    relay._body_line(bytes(data[line_start:newline]).rstrip(b"\r"))
                line_start = newline + 1
            received = end if end >= 0 else len(data) - 2  # the last CRLF included
            relay._body_progress(upload, bytes(data[2:16384]), max(0, received))
            if early is not None and received >= early.after_bytes:
                said = early.reply or ""
                try:
                    await self.obey(early, said, partial(relay._finished, self.conn, upload, said))
                finally:
                    if not upload.complete:  # hung up instead of answering
                        relay._finished(self.conn, upload, None)
                early = None  # answered: the end of data gets no reply of its own
                answered = True
            else:
                answered = upload.complete
            if end >= 0:
                break
            await self.fill()
        self.buffer[:0] = data[end + len(_END) :]  # pipelined commands behind the end mark
        if answered:
            return
        rule = relay._rule_for("MESSAGE", self.conn)
        text = (rule.reply if rule else None) or DEFAULT_REPLIES["MESSAGE"]
        try:
            await self.obey(rule, text, partial(relay._finished, self.conn, upload, text))
        finally:
            if not upload.complete:
                relay._finished(self.conn, upload, None)

    async def write(self, text: str) -> None:
        """Write a reply; lines after the first may leave out the code ("250 a\nB")."""
        code, *lines = text.split("\n")
        number = code[:3]
        parts = [code[4:]] + [line[4:] if line[:3] == number else line for line in lines]
        out = [f"{number}-{part}" for part in parts[:-1]] + [f"{number} {parts[-1]}"]
        self.writer.write("".join(f"{line}\r\n" for line in out).encode())
        await self.writer.drain()

    async def hang_up(self, *, drain: bool) -> None:
        """With `drain`: half-close, read what the client still sends (briefly), then close,
        so the client sees the last reply whatever its socket buffers hold. Without: drop."""
        if not drain:
            self.writer.transport.abort()
            return
        try:
            with contextlib.suppress(Exception):
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                async with asyncio.timeout(_DRAIN_SECONDS):
                    while await self.reader.read(65536):
                        pass
        except asyncio.CancelledError:  # the relay is stopping
            self.writer.transport.abort()
            raise
        self.writer.close()
