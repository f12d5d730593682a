"""moto in server mode as a child process: the S3 + SQS endpoint of `make run-local`.

It runs in its own session so the terminal's Ctrl-C reaches only us, and we stop it after
the runner has finished its batch; on Linux it also dies with us if we are killed outright.
"""

from __future__ import annotations

import contextlib
import http.client
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from .mailcatcher import LOOPBACK, free_port
from .service import Service


def _moto_command() -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "moto.server"]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the child when its parent dies (no effect elsewhere)."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class MotoProcess(Service):
    def __init__(self, *, start_timeout: float = 20.0) -> None:
        self.host = LOOPBACK
        self.port = 0
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, attempts: int = 3) -> None:
        """Start on a free port and wait until it answers; retry if the port was taken."""
        error: RuntimeError | None = None
        for _ in range(attempts):
            try:
                self._start_once()
                return
            except RuntimeError as exc:
                error = exc
                self.stop()
        assert error is not None
        raise error

    def _start_once(self) -> None:
        self.port = free_port()
        # werkzeug logs every request; a pipe nobody reads would fill up and stall it.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            [*_moto_command(), "-H", self.host, "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto_server exited early:\n{self.output()}")
            if self._answers():
                return
            time.sleep(0.05)
        raise RuntimeError(f"moto_server did not answer within {self.start_timeout}s")

    def _answers(self) -> bool:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=1)
        try:
            connection.request("GET", "/moto-api/")
            connection.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            connection.close()

    def output(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
