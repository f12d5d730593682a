"""An emulator of the Lambda Runtime API, for running the deployment zip under `awslambdaric`.

Lambda's Python runtime is `awslambdaric` polling the Runtime API over HTTP: it long-polls
`GET /2018-06-01/runtime/invocation/next` for an event, then posts the handler's result to
`.../invocation/{id}/response` or its exception to `.../invocation/{id}/error`; an exception at
import goes to `/runtime/init/error` instead. There is no local peer for that API short of
AWS's own emulator (a Go binary in a container image), so this is a small real HTTP server on
127.0.0.1 that speaks the same paths, status codes and headers, hands out queued events, and
records what the runtime client posts back, which connection (and so which process) asked,
and its User-Agent (`aws-lambda-python/<interpreter version>-<client version>`). It does not
enforce the deadline it announces: the tests wait for answers with limits of their own.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

LOOPBACK = "127.0.0.1"
PREFIX = "/2018-06-01/runtime"
# Lambda refuses a synchronous response over 6 MB.
MAX_RESPONSE_BYTES = 6 * 1024 * 1024
ACCOUNT = "123456789012"
_INVOCATION = re.compile(rf"^{PREFIX}/invocation/([^/]+)/(response|error)$")

T = TypeVar("T")


@dataclass(frozen=True)
class Posted:
    """What the runtime client posted: a response, an invocation error or an init error.

    `headers` are keyed in lower case (HTTP header names are case-insensitive).
    """

    body: Any
    headers: dict[str, str]
    pid: int | None


@dataclass(frozen=True)
class Outcome:
    """How an invocation ended: "response", "error" (the handler raised) or "init" (the
    runtime client could not load the handler, posted an init error and exited)."""

    phase: str
    posted: Posted


@dataclass
class Invocation:
    """One queued event and what became of it."""

    request_id: str
    event: Any
    deadline_ms: int
    trace_id: str
    # Filled in by the emulator as the runtime client gets to it.
    fetched: bool = False
    fetched_by: int | None = None  # the process that fetched it, when /proc could tell
    response: Posted | None = None
    error: Posted | None = None

    @property
    def done(self) -> bool:
        return self.response is not None or self.error is not None


@dataclass
class _State:
    queue: deque[Invocation] = field(default_factory=deque)
    invocations: dict[str, Invocation] = field(default_factory=dict)
    init_errors: list[Posted] = field(default_factory=list)
    user_agents: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stopping: bool = False


def peer_pid(peer: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The process holding the client end `peer` of a loopback TCP connection to `server`
    (from /proc).

    Runtime clients in a chroot share the host's network namespace and /proc, so this names
    the process the test started, whatever root directory or emulator it runs under. The
    connection is found by both its ends: the client's port alone may also name connections
    of other clients that closed and wait out TIME_WAIT (no process, inode 0), as many do
    while other tests run beside this one.
    """
    wanted = (_endpoint(peer), _endpoint(server))
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1], fields[2]) == wanted:
            inode = fields[9]
            break
    if inode is None or inode == "0":
        return None
    target = f"socket:[{inode}]"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if _readlink(fd) == target:
                    return int(proc.name)
        except OSError:  # gone, or not ours to look at
            continue
    return None


def _readlink(path: Path) -> str | None:
    try:
        return str(path.readlink())
    except OSError:
        return None


def _endpoint(address: tuple[str, int]) -> str:
    """An address as /proc/net/tcp prints it: the IPv4 address as a 32-bit hex number in host
    (here little-endian) order, and the port in hex."""
    host, port = address[0], address[1]
    return "".join(f"{int(part):02X}" for part in reversed(host.split("."))) + f":{port:04X}"


class RuntimeApi:
    """The Runtime API on a free loopback port; `address` is AWS_LAMBDA_RUNTIME_API."""

    def __init__(self, *, function_name: str = "async-notifier", region: str = "us-east-1") -> None:
        self.function_name = function_name
        self.function_arn = f"arn:aws:lambda:{region}:{ACCOUNT}:function:{function_name}"
        self._state = _State()
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    @property
    def address(self) -> str:
        if self._server is None:
            raise RuntimeError("Runtime API not started")
        return f"{LOOPBACK}:{self._server.server_port}"

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("Runtime API already running")
        server = _Server(self)
        thread = threading.Thread(target=server.serve_forever, name="runtime-api", daemon=True)
        thread.start()
        self._server, self._thread = server, thread

    def stop(self) -> None:
        """Stop serving; a runtime client still polling gets its connection closed."""
        with self._cond:
            self._state.stopping = True
            self._cond.notify_all()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- the test's side

    def invoke(self, event: Any, *, timeout: float = 60.0) -> str:
        """Queue an event as Lambda would, with `timeout` as the function timeout; return its id."""
        invocation = Invocation(
            request_id=str(uuid.uuid4()),
            event=event,
            deadline_ms=int((time.time() + timeout) * 1000),
            trace_id=_trace_id(),
        )
        with self._cond:
            self._state.invocations[invocation.request_id] = invocation
            self._state.queue.append(invocation)
            self._cond.notify_all()
        return invocation.request_id

    def wait_for(self, probe: Callable[[RuntimeApi], T | None], timeout: float) -> T:
        """Block until `probe` returns something other than None (called under the lock)."""
        with self._cond:
            result = self._cond.wait_for(lambda: probe(self), timeout)
        if result is None:
            raise TimeoutError(f"nothing from the runtime client within {timeout} s")
        return result

    def result(self, request_id: str, timeout: float) -> Invocation:
        """The invocation once the runtime client has answered it (response or error)."""

        def answered(api: RuntimeApi) -> Invocation | None:
            invocation = api._state.invocations[request_id]
            return invocation if invocation.done else None

        return self.wait_for(answered, timeout)

    def outcome(self, request_id: str, timeout: float) -> Outcome:
        """The first of: the invocation's response or error, or an init error."""

        def ended(api: RuntimeApi) -> Outcome | None:
            invocation = api._state.invocations[request_id]
            if invocation.response is not None:
                return Outcome("response", invocation.response)
            if invocation.error is not None:
                return Outcome("error", invocation.error)
            if api._state.init_errors:
                return Outcome("init", api._state.init_errors[0])
            return None

        return self.wait_for(ended, timeout)

    def invocation(self, request_id: str) -> Invocation:
        with self._cond:
            return self._state.invocations[request_id]

    @property
    def init_errors(self) -> list[Posted]:
        with self._cond:
            return list(self._state.init_errors)

    @property
    def errors(self) -> list[str]:
        """Requests the emulator itself failed to handle (it should have none)."""
        with self._cond:
            return list(self._state.errors)

    @property
    def user_agents(self) -> list[str]:
        with self._cond:
            return list(self._state.user_agents)

    # -- the runtime client's side (called from the server's threads)

    def _next(self, pid: int | None) -> Invocation | None:
        with self._cond:
            self._cond.wait_for(lambda: self._state.queue or self._state.stopping)
            if self._state.stopping:
                return None
            invocation = self._state.queue.popleft()
            invocation.fetched = True
            invocation.fetched_by = pid
            return invocation

    def _post(self, request_id: str, kind: str, posted: Posted) -> str | None:
        """Record a response or error; return an error type when the request id is wrong."""
        with self._cond:
            invocation = self._state.invocations.get(request_id)
            if invocation is None or not invocation.fetched:
                return "InvalidRequestID"
            if invocation.done:
                return "InvalidStateTransition"
            if kind == "response":
                invocation.response = posted
            else:
                invocation.error = posted
            self._cond.notify_all()
            return None

    def _init_error(self, posted: Posted) -> None:
        with self._cond:
            self._state.init_errors.append(posted)
            self._cond.notify_all()

    def _failed(self, error: str) -> None:
        with self._cond:
            self._state.errors.append(error)

    def _saw(self, user_agent: str | None) -> None:
        with self._cond:
            if user_agent and user_agent not in self._state.user_agents:
                self._state.user_agents.append(user_agent)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, api: RuntimeApi) -> None:
        super().__init__((LOOPBACK, 0), _handler_class(api))
        self._api = api

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A runtime client stopped mid-request is expected; anything else is the emulator's
        own bug, kept for `RuntimeApi.errors`."""
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):
            self._api._failed(f"{type(error).__name__}: {error}")


def _trace_id() -> str:
    root = f"1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]}"
    return f"Root={root};Parent={uuid.uuid4().hex[:16]};Sampled=0;Lineage=1:{ACCOUNT[:8]}:0"


def _handler_class(api: RuntimeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # The runtime client keeps its connection alive between calls, as with Lambda.
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the test reports what matters."""

        def _reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _peer_pid(self) -> int | None:
            return peer_pid(self.client_address, self.connection.getsockname())

        def _error(self, status: int, error_type: str, message: str) -> None:
            self._reply(status, {"errorMessage": message, "errorType": error_type})

        def do_GET(self) -> None:
            api._saw(self.headers.get("User-Agent"))
            if self.path != f"{PREFIX}/invocation/next":
                self._error(404, "NotFound", f"no such path: {self.path}")
                return
            invocation = api._next(self._peer_pid())
            if invocation is None:
                self.close_connection = True
                self._error(500, "Runtime.Stopping", "the emulator is stopping")
                return
            self._reply(
                200,
                invocation.event,
                {
                    "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
                    "Lambda-Runtime-Deadline-Ms": str(invocation.deadline_ms),
                    "Lambda-Runtime-Invoked-Function-Arn": api.function_arn,
                    "Lambda-Runtime-Trace-Id": invocation.trace_id,
                },
            )

        def do_POST(self) -> None:
            api._saw(self.headers.get("User-Agent"))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            headers = {name.lower(): value for name, value in self.headers.items()}
            pid = self._peer_pid()
            if self.path == f"{PREFIX}/init/error":
                api._init_error(Posted(_json(raw), headers, pid))
                self._reply(202, {"status": "OK"})
                return
            match = _INVOCATION.match(self.path)
            if match is None:
                self._error(404, "NotFound", f"no such path: {self.path}")
                return
            request_id, kind = match.groups()
            if kind == "response" and length > MAX_RESPONSE_BYTES:
                self._error(413, "RequestEntityTooLarge", "response over 6 MB")
                return
            problem = api._post(request_id, kind, Posted(_json(raw), headers, pid))
            if problem is not None:
                self._error(400, problem, f"{problem}: {request_id}")
                return
            self._reply(202, {"status": "OK"})

    return Handler


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
