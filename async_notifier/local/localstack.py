"""Start and stop LocalStack on the host, without Docker: `make localstack` / `localstack-stop`.

LocalStack normally runs in Docker; CI and a plain laptop may have none, yet the promise that
the worker runs against LocalStack has to be proven on every change. So LocalStack runs
from its own virtualenv (`localstack-core[runtime]`), in the background, bound to 127.0.0.1
only, with the S3/SQS/Secrets Manager/DynamoDB services alone and its state under the project's
ignored `.localstack/`. Standard library only: this runs before the project venv exists.

    python -m async_notifier.local.localstack start --venv .localstack/venv --root .localstack
    python -m async_notifier.local.localstack stop --root .localstack
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

HOST = "127.0.0.1"
PORT = 4566
SERVICES = ("s3", "sqs", "secretsmanager", "dynamodb", "ses")
READY_STATES = ("available", "running")


def environment(root: Path, host: str = HOST, port: int = PORT) -> dict[str, str]:
    """LocalStack's settings for a host-mode run that touches nothing outside `root`."""
    return {
        "OVERRIDE_IN_DOCKER": "0",
        "GATEWAY_LISTEN": f"{host}:{port}",
        "GATEWAY_SERVER": "hypercorn",
        "SERVICES": ",".join(SERVICES),
        "DNS_ADDRESS": "0",  # no DNS server (it would bind port 53)
        "DISABLE_EVENTS": "1",  # no analytics calls
        "SKIP_SSL_CERT_DOWNLOAD": "1",  # no network: a self-signed certificate will do
        "LOCALSTACK_HOST": f"{host}:{port}",
        "SQS_ENDPOINT_STRATEGY": "path",  # queue URLs on the gateway, no *.localhost DNS
        "FILESYSTEM_ROOT": str(root.resolve() / "fs"),
        # Its plugin system (plux) caches entry points under ~/.cache otherwise.
        "XDG_CACHE_HOME": str(root.resolve() / "cache"),
    }


def health(url: str, timeout: float = 2.0) -> dict[str, object] | None:
    """The health document, or None when nothing (or something else) answers."""
    try:
        with urllib.request.urlopen(f"{url}/_localstack/health", timeout=timeout) as response:  # noqa: S310
            document = json.loads(response.read().decode())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def ready(document: dict[str, object] | None) -> bool:
    """S3 and SQS are up: what the worker needs. DynamoDB is not waited for: run on the
    host, LocalStack serves it only where DynamoDB Local (Java) can be installed, and a
    failed CreateTable turns its state to "error" for the rest of the run."""
    services = document.get("services") if document else None
    if not isinstance(services, dict):
        return False
    return all(services.get(name) in READY_STATES for name in ("s3", "sqs"))


def _alive(pid: int) -> bool:
    """Running and not a zombie (a stopped LocalStack may linger unreaped for a moment)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _is_localstack(pid: int) -> bool:
    """Guard against a recycled PID: only signal a process that is LocalStack."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return _alive(pid)  # no /proc: the pid file is all we have
    return b"localstack" in cmdline


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def start(venv: Path, root: Path, *, timeout: float, host: str = HOST, port: int = PORT) -> int:
    url = f"http://{host}:{port}"
    pid_file, log_file = root / "localstack.pid", root / "localstack.log"
    pid = _read_pid(pid_file)
    if pid is not None and _alive(pid) and _is_localstack(pid):
        print(f"LocalStack is already running (pid {pid}); waiting until it is ready")
        return _wait(url, pid, log_file, timeout)
    if health(url) is not None:
        print(f"Something already answers at {url} (not started by make localstack); using it")
        return 0
    python = (venv / "bin" / "python").absolute()  # not resolve(): keep the venv symlink
    if not python.exists():
        print(f"error: {python} not found; run `make localstack` to install LocalStack")
        return 1
    root.mkdir(parents=True, exist_ok=True)
    (root / "fs").mkdir(exist_ok=True)
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [str(python), "-m", "localstack.runtime.main"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **environment(root, host, port)},
            cwd=root,
            # Its own session: a Ctrl-C in this terminal later must not kill it.
            start_new_session=True,
        )
    pid_file.write_text(f"{process.pid}\n")
    print(f"LocalStack starting (pid {process.pid}, log {log_file})")
    status = _wait(url, process.pid, log_file, timeout)
    if status != 0:
        stop(root, quiet=True)
    return status


def _wait(url: str, pid: int, log_file: Path, timeout: float) -> int:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not _alive(pid):
            print(f"error: LocalStack (pid {pid}) exited during start-up. Log tail:")
            print(_tail(log_file))
            return 1
        if ready(health(url)):
            print(f"LocalStack is ready at {url} ({time.monotonic() - started:.1f} s)")
            return 0
        time.sleep(0.5)
    print(f"error: LocalStack did not answer {url}/_localstack/health within {timeout:.0f} s.")
    print(f"Log tail ({log_file}):")
    print(_tail(log_file))
    return 1


def stop(root: Path, *, grace: float = 20.0, quiet: bool = False) -> int:
    """SIGINT (LocalStack ignores SIGTERM in some set-ups), then SIGKILL: that PID only."""
    pid_file = root / "localstack.pid"
    pid = _read_pid(pid_file)
    if pid is None or not _alive(pid) or not _is_localstack(pid):
        if not quiet:
            print("LocalStack is not running (no live process from make localstack)")
        pid_file.unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        print(f"LocalStack (pid {pid}) still running after {grace:.0f} s; sending SIGKILL")
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
    if not quiet:
        print(f"LocalStack stopped (pid {pid})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m async_notifier.local.localstack")
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("start", help="start in the background; wait until ready")
    start_parser.add_argument("--venv", type=Path, default=Path(".localstack/venv"))
    start_parser.add_argument("--root", type=Path, default=Path(".localstack"))
    start_parser.add_argument("--timeout", type=float, default=120.0)
    stop_parser = commands.add_parser("stop", help="stop the LocalStack that start launched")
    stop_parser.add_argument("--root", type=Path, default=Path(".localstack"))
    args = parser.parse_args(argv)
    if args.command == "start":
        return start(args.venv, args.root, timeout=args.timeout)
    return stop(args.root)


if __name__ == "__main__":
    sys.exit(main())
