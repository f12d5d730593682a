"""Start, watch and stop the benchmark's helper processes (moto, sink, proxy).

Every helper is its own process in its own session, so a Ctrl-C reaches only the benchmark,
which then stops them in order. If the benchmark itself is killed, the helpers notice
(moto through PR_SET_PDEATHSIG, ours by watching their parent) and exit too.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Helper:
    """One helper process, its log file, and a stop that always reaps it."""

    def __init__(self, name: str, command: list[str], log_dir: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.command = command
        self.cwd = cwd
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, *, ready_line: bool, env: dict[str, str] | None = None) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if ready_line else self._log,
            stderr=self._log,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def read_ready(self, timeout: float) -> dict[str, Any]:
        """Wait for the helper's one JSON ready line on stdout."""
        process = self.process
        assert process is not None
        assert process.stdout is not None
        deadline = time.monotonic() + timeout
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while not buffer.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise RuntimeError(f"{self.name} not ready after {timeout}s\n{self.output()}")
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited with {process.wait()}\n{self.output()}")
                buffer += chunk
        info: dict[str, Any] = json.loads(buffer)
        return info

    def output(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(f"{self.name} is not running (exit {code})\n{self.output()}")

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=timeout)
            if process.stdout is not None:
                process.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- moto


def _moto_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    return [*base, "-H", LOOPBACK, "-p", str(port)]


class Moto(Helper):
    """moto in server mode (S3), on a free port, restarted elsewhere if the port was taken."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__("moto", [], log_dir)
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def launch(self, timeout: float = 30.0, attempts: int = 3) -> None:
        error: RuntimeError | None = None
        for _ in range(attempts):
            self.port = free_port()
            self.command = _moto_command(self.port)
            self.start(ready_line=False)
            try:
                self._wait(timeout)
                return
            except RuntimeError as exc:
                error = exc
                self.stop()
        assert error is not None
        raise error

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                self.request("GET", "/moto-api/", timeout=1)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"moto did not answer within {timeout}s\n{self.output()}")

    def reset(self) -> None:
        """Drop every bucket and object (frees moto's memory between scenarios)."""
        self.request("POST", "/moto-api/reset", timeout=60)

    def request(self, method: str, path: str, timeout: float) -> None:
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            response.read()
            if response.status >= 400:
                raise RuntimeError(f"moto {method} {path}: HTTP {response.status}")
        finally:
            connection.close()


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time a live process has used so far (Linux /proc), else None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float | None:
    """CPU time all processes on the machine have used since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait.
    busy = sum(values[:8]) - values[3] - values[4]
    return busy / os.sysconf("SC_CLK_TCK")


def snapshot_code(dest: Path) -> Path:
    """Copy what the targets run (handler, package, templates, bench) to `dest`.

    Targets and helpers run from the copy (the current directory comes first on sys.path,
    before the editable install), so a run measures one tree even while it is being edited.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "out")
    dest.mkdir(parents=True)
    for name in ("handler.py", "async_notifier", "templates", "bench", "requirements.txt"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, dest / name)
    return dest


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
