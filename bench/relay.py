"""An SMTP relay with a mail account's limits: `python -m bench.relay --rate R [--burst B]`.

The real limit of the worker is the provider's account, not a connection: SES counts every
MAIL FROM against a sending rate per second and a daily quota, for all the senders of the
account together, and refuses beyond them with a 454. `ThrottlingRelay` does the same on a
loopback port, so a fleet of workers can be run against one account:

- the rate is a token bucket of capacity `burst` (default: one second's worth, at least
  one message) refilled at `rate` per second, taken at MAIL FROM; without a token the
  MAIL gets `454 4.7.0 Throttling failure: Maximum sending rate exceeded.`;
- while `quota_exceeded` is set, every MAIL gets the daily-quota 454 instead.

Everything else is the benchmark's count-only sink (`bench.sink`: aiosmtpd's protocol,
PIPELINING, a fast DATA), plus a count of the Message-IDs accepted, so exactly-once
delivery can be checked. A refused MAIL leaves no envelope, so the pipelined RCPT and DATA
after it get aiosmtpd's 503s, as from a real server.

In a test, `start()` serves it from a thread of its own; the benchmark runs it as a process
that serves its counters on a control port (`bench.control`: STATS, RESET).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import threading
import time
import weakref
from types import TracebackType
from typing import Any, Self

from aiosmtpd.smtp import SMTP, Envelope, Session

from .control import LOOPBACK, announce, bound_port, serve_control, wait_for_stop
from .sink import DEFAULT_DATA_SIZE_LIMIT, Counters, SinkSMTP, _Hooks

RATE_REPLY = "454 4.7.0 Throttling failure: Maximum sending rate exceeded."
QUOTA_REPLY = "454 4.7.0 Throttling failure: Daily message quota exceeded."
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)


class _AccountHooks(_Hooks):
    def __init__(self, relay: ThrottlingRelay) -> None:
        self.relay = relay

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        refusal = self.relay._admit()
        if refusal is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"


class _RelaySMTP(SinkSMTP):
    def __init__(self, relay: ThrottlingRelay) -> None:
        super().__init__(relay.counters, relay.data_size_limit, _AccountHooks(relay))
        self.relay = relay

    def message_accepted(self, head: bytes) -> None:
        match = _MESSAGE_ID.search(head)
        self.relay._accepted(match.group(1).decode(errors="replace").strip() if match else "")


class ThrottlingRelay:
    """A plain (no TLS, no AUTH) SMTP server on `host`, a free port, with an account's limits."""

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        host: str = LOOPBACK,
        data_size_limit: int = DEFAULT_DATA_SIZE_LIMIT,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        if burst is not None and not burst > 0:
            raise ValueError(f"burst must be positive, got {burst!r}")
        self.rate = float(rate)
        # A bucket below one token would refuse everything: SES always allows one message.
        self.burst = max(1.0, float(burst if burst is not None else rate))
        self.host = host
        self.data_size_limit = data_size_limit
        self.port = 0
        self.quota_exceeded = False
        self.counters = Counters()  # the sink's: messages, bytes, connections, video ids
        self.mail_commands = 0
        self.rate_refusals = 0
        self.quota_refusals = 0
        self.accepted: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._updated = time.monotonic()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._sessions: weakref.WeakSet[_RelaySMTP] = weakref.WeakSet()  # the loop's thread

    # ------------------------------------------------------------------ the account

    def _admit(self) -> str | None:
        """Count one MAIL FROM: None if the account allows it, else the 454 to answer."""
        with self._lock:
            self.mail_commands += 1
            if self.quota_exceeded:
                self.quota_refusals += 1
                return QUOTA_REPLY
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            if self._tokens >= 1:
                self._tokens -= 1
                return None
            self.rate_refusals += 1
            return RATE_REPLY

    def _accepted(self, message_id: str) -> None:
        with self._lock:
            self.accepted[message_id] += 1

    def reset(self) -> None:
        """Zero every counter and refill the bucket (a fresh second of a fresh account)."""
        with self._lock:
            self.mail_commands = self.rate_refusals = self.quota_refusals = 0
            self.accepted.clear()
            self.counters.snapshot(reset=True)
            self._tokens = self.burst
            self._updated = time.monotonic()

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Every counter (the sink's too), as the control port serves them; then `reset`."""
        with self._lock:
            found = {
                **self.counters.snapshot(reset=False),
                "rate": self.rate,
                "burst": self.burst,
                "mail_commands": self.mail_commands,
                "rate_refusals": self.rate_refusals,
                "quota_refusals": self.quota_refusals,
                "accepted": dict(self.accepted),
            }
        if reset:
            self.reset()
        return found

    # ------------------------------------------------------------------ serving

    async def serve(self) -> asyncio.Server:
        """Listen in the running loop (the process's, or `start()`'s thread's)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._session, self.host, 0, backlog=1024)
        self.port = bound_port(self._server)
        return self._server

    def _session(self) -> _RelaySMTP:
        session = _RelaySMTP(self)
        self._sessions.add(session)
        return session

    def start(self) -> None:
        """Serve from a thread with its own event loop; returns once it accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the relay is already running")
        loop = asyncio.new_event_loop()
        future = asyncio.run_coroutine_threadsafe(self.serve(), loop)
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, daemon=True, name=f"throttling-relay-{id(self):x}"
        )
        self._thread.start()
        try:
            future.result(timeout=10)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Close the listener and every open connection, then end the thread."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            if not thread.is_alive():
                loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        # aiosmtpd runs one task per connection, and cancelling it closes that connection, if
        # it has started: one made a moment ago has not, so its connection is closed here.
        for session in list(self._sessions):
            if isinstance(session.transport, asyncio.Transport):
                session.transport.abort()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def _serve_process(rate: float, burst: float | None) -> None:
    relay = ThrottlingRelay(rate, burst=burst)
    server = await relay.serve()
    control = await serve_control(relay.stats)
    announce({"port": relay.port, "control_port": bound_port(control)})
    try:
        await wait_for_stop()
    finally:
        control.close()
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, required=True, help="messages per second allowed")
    parser.add_argument("--burst", type=float, help="bucket capacity (default: the rate)")
    parser.add_argument("--run-dir", help="only marks the process as this run's (for pgrep)")
    args = parser.parse_args()
    if not args.rate > 0 or (args.burst is not None and not args.burst > 0):
        parser.error("--rate and --burst must be positive")
    asyncio.run(_serve_process(args.rate, args.burst))


if __name__ == "__main__":
    main()
