"""The SMTP sinks the benchmark can count deliveries with, behind one small interface.

- `aiosmtpd` (default): `bench.sink` in its own process; counts messages, bytes,
  connections and the video id of every message (so delivery is checked record by record).
- `smtp-sink`: Postfix's C test server, if installed (`--sink smtp-sink`); it advertises
  PIPELINING too and is faster still, but it only reports message and session counts (from
  its `-c` counter line), so delivery is checked by count.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import control
from .procs import LOOPBACK, Helper, free_port, python_module


@dataclass
class SinkStats:
    messages: int
    connections: int
    data_bytes: int | None = None
    max_open: int | None = None
    min_size: int | None = None
    max_size: int | None = None
    video_ids: list[str] | None = field(default=None, repr=False)


class Sink(Protocol):
    port: int

    def launch(self) -> None: ...
    def reset(self) -> None: ...
    def collect(self, expected: int) -> SinkStats: ...
    def stop(self) -> None: ...
    @property
    def pid(self) -> int | None: ...


class ControlledServer(Helper):
    """A bench server in its own process that says its SMTP and control ports when ready
    (`bench.control`): RESET zeroes its counters."""

    def __init__(self, name: str, command: list[str], log_dir: Path, code_dir: Path) -> None:
        super().__init__(name, command, log_dir, cwd=code_dir)
        self.port = 0
        self.control_port = 0

    def launch(self) -> None:
        self.start(ready_line=True)
        info = self.read_ready(timeout=30)
        self.port, self.control_port = int(info["port"]), int(info["control_port"])

    def reset(self) -> None:
        self.check_alive()
        control.query(self.control_port, "RESET")


class AiosmtpdSink(ControlledServer):
    def __init__(self, log_dir: Path, run_dir: Path, code_dir: Path) -> None:
        command = python_module("bench.sink", "--run-dir", str(run_dir))
        super().__init__("sink", command, log_dir, code_dir)

    def collect(self, expected: int) -> SinkStats:
        self.check_alive()
        stats = control.query(self.control_port, "STATS")
        return SinkStats(
            messages=int(stats["messages"]),
            connections=int(stats["connections"]),
            data_bytes=int(stats["data_bytes"]),
            max_open=int(stats["max_open"]),
            min_size=stats["min_size"],
            max_size=stats.get("max_size"),
            video_ids=[str(v) for v in stats["video_ids"]],
        )


_COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


def find_smtp_sink() -> str | None:
    for candidate in (shutil.which("smtp-sink"), "/usr/sbin/smtp-sink", "/usr/bin/smtp-sink"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class PostfixSink(Helper):
    """`smtp-sink -c`: its counter line is `sess=N quit=N mesg=N`, rewritten after a CR."""

    def __init__(self, log_dir: Path, binary: str) -> None:
        super().__init__("smtp-sink", [], log_dir)
        self.binary = binary
        self.port = 0
        self._lock = threading.Lock()
        self._sessions = self._messages = 0
        self._base = (0, 0)
        self._reader: threading.Thread | None = None

    def launch(self) -> None:
        self.port = free_port()
        command = [self.binary, "-c", "-h", "sink.bench", "-m", "1024"]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # it refuses to run as root without dropping privileges
        self.command = [*command, f"{LOOPBACK}:{self.port}", "1024"]
        self.start(ready_line=True)
        self._reader = threading.Thread(target=self._read, daemon=True, name="smtp-sink-counter")
        self._reader.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
                    sock.recv(100)
                    sock.sendall(b"QUIT\r\n")
                    sock.recv(100)
                break
            except OSError:
                time.sleep(0.05)
        self._settle(lambda s, m: s >= 1)
        self.reset()

    def _read(self) -> None:
        process = self.process
        assert process is not None
        assert process.stdout is not None
        fd = process.stdout.fileno()
        tail = b""
        while chunk := os.read(fd, 65536):
            tail = (tail + chunk)[-4096:]
            matches = _COUNTERS.findall(tail)
            if matches:
                sessions, _, messages = matches[-1]
                with self._lock:
                    self._sessions, self._messages = int(sessions), int(messages)

    def _counts(self) -> tuple[int, int]:
        with self._lock:
            return self._sessions, self._messages

    def _settle(self, done: Callable[[int, int], bool], timeout: float = 10.0) -> None:
        """Wait until the counters satisfy `done` and have stopped moving for a moment."""
        deadline = time.monotonic() + timeout
        last, since = self._counts(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self._counts()
            if now != last:
                last, since = now, time.monotonic()
            elif done(*now) and time.monotonic() - since >= 0.3:
                return

    def reset(self) -> None:
        self.check_alive()
        self._base = self._counts()

    def collect(self, expected: int) -> SinkStats:
        self.check_alive()
        base_s, base_m = self._base
        self._settle(lambda s, m: m - base_m >= expected)
        sessions, messages = self._counts()
        return SinkStats(messages=messages - base_m, connections=sessions - base_s)


def make_sink(kind: str, log_dir: Path, run_dir: Path, code_dir: Path) -> Sink:
    if kind == "aiosmtpd":
        return AiosmtpdSink(log_dir, run_dir, code_dir)
    binary = find_smtp_sink()
    if binary is None:
        raise RuntimeError(
            "--sink smtp-sink needs Postfix's smtp-sink binary on PATH (package postfix); "
            "the default --sink aiosmtpd needs nothing"
        )
    return PostfixSink(log_dir, binary)


class RelayProcess(ControlledServer):
    """`python -m bench.relay` in its own process: the SMTP server of the throttled scenario,
    an account with a sending rate (`bench.relay.ThrottlingRelay`), counted like the sink.
    RESET also refills the account's bucket."""

    def __init__(self, log_dir: Path, run_dir: Path, code_dir: Path, rate: float) -> None:
        command = python_module("bench.relay", "--rate", f"{rate:g}", "--run-dir", str(run_dir))
        super().__init__("relay", command, log_dir, code_dir)

    def stats(self) -> dict[str, Any]:
        self.check_alive()
        return control.query(self.control_port, "STATS")
