"""Real peers for the tests: moto in server mode for AWS, aiosmtpd for SMTP.

The worker is only trusted once it has spoken the real protocols, so nothing here mocks a
client library: S3 runs in a separate moto process (its own GIL, its own HTTP stack) and SMTP
is a genuine aiosmtpd server on a loopback port that records what it accepted and counts
connections server-side, so pooling and reconnection can be asserted from the outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email
import email.policy
import hashlib
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import boto3
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from async_notifier.local.moto import MotoProcess
from async_notifier.local.service import Service

# One ZIP maker for the tests and the benchmark: bench/ stands alone (it runs against other
# versions of the code), so the tests use its maker rather than keep a copy.
from bench.payload import make_zip as make_zip

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"


def free_port() -> int:
    """Return a loopback port that was free a moment ago (the OS picks it, so no collisions)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


# --------------------------------------------------------------------------- moto (AWS)


class MotoServer(MotoProcess):
    """moto in server mode as a subprocess, so S3 traffic does not compete for the test's GIL.

    The same process `make run-local` starts, plus what tests need: reset and a liveness check.
    """

    def __init__(self, *, start_timeout: float = 15.0) -> None:
        super().__init__(start_timeout=start_timeout)

    def reset(self) -> None:
        """Drop all state (buckets, queues...) so tests sharing the session server stay isolated."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            connection.request("POST", "/moto-api/reset")
            response = connection.getresponse()
            response.read()
            if response.status >= 400:
                raise RuntimeError(f"moto reset: HTTP {response.status}")
        finally:
            connection.close()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None


def s3_client(endpoint_url: str) -> Any:
    """A plain synchronous boto3 S3 client for seeding and inspecting moto from the test."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def seed_objects(client: Any, bucket: str, objects: Mapping[str, bytes]) -> None:
    """Create `bucket` unless it exists, then upload every key."""
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


# --------------------------------------------------------------------------- SMTP


@dataclass(frozen=True)
class Received:
    """One message the sink accepted, exactly as it came over the wire."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP protocol (one instance per TCP connection) reporting to its sink."""

    def __init__(
        self, handler: Any, *, sink: SmtpSink, allow_plain_auth: bool, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        if allow_plain_auth:
            # Set after construction: passing auth_require_tls=False makes aiosmtpd emit a
            # UserWarning from its thread, and there is no TLS to require in that setup anyway.
            self._auth_require_tls = False
        self.sink = sink
        self.accepted_here = 0
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again on the TLS transport after STARTTLS; that is the same TCP connection.
        if self._original_transport is None and not self._counted:
            self._counted = True
            self.sink._connection_opened()
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        # aiosmtpd calls this itself after a failed TLS handshake, so it may come twice.
        if self._counted:
            self._counted = False
            self.sink._connection_closed()
        super().connection_lost(error)

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str) -> None:
        self.sink._quit_received()
        await super().smtp_QUIT(arg)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str) -> None:
        if self.sink.hang_up_on_reuse and self.accepted_here and self.transport is not None:
            # Like a server that dropped an idle connection before the client noticed: the
            # next command finds the socket closed, nothing answered.
            self.transport.close()
            return
        await super().smtp_MAIL(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        before = self.accepted_here
        await super().smtp_DATA(arg)  # the 250 has been written when this returns
        drop_after = self.sink.drop_after
        if (
            drop_after
            and self.accepted_here > before
            and self.accepted_here % drop_after == 0
            and self.transport is not None
        ):
            # Like a server that reaps connections mid-batch: no 421, the socket just closes.
            # close() flushes the buffered 250 first.
            self.transport.close()


class _Handler:
    """aiosmtpd hooks: reject configured mailboxes, record accepted messages."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_EHLO(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.sink.pipelining:  # among the "250-" lines: the last line stays last
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_RCPT(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address.casefold() in self.sink.reject:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: _SinkSMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content
        assert isinstance(data, bytes)
        server.accepted_here += 1
        self.sink._record(
            Received(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                data=data,
            )
        )
        if self.sink.verdict_delay:
            await asyncio.sleep(self.sink.verdict_delay)
        return "250 OK"


class _SinkController(Controller):
    """aiosmtpd's controller, building our handler and protocol (subclasses swap both)."""

    handler_class: type[_Handler] = _Handler
    protocol_class: type[_SinkSMTP] = _SinkSMTP

    def __init__(self, sink: SmtpSink, allow_plain_auth: bool, **kwargs: Any) -> None:
        super().__init__(self.handler_class(sink), **kwargs)
        self.sink = sink
        self.allow_plain_auth = allow_plain_auth
        self._sessions: weakref.WeakSet[_SinkSMTP] = weakref.WeakSet()  # the loop's thread only

    def factory(self) -> _SinkSMTP:
        session = self.protocol_class(
            self.handler,
            sink=self.sink,
            allow_plain_auth=self.allow_plain_auth,
            **self.SMTP_kwargs,
        )
        self._sessions.add(session)
        return session

    def cancel_tasks(self, stop_loop: bool = True) -> None:
        """Drop every client connection, then what aiosmtpd does: stop the loop, cancel the
        tasks. A session's task cancelled before its first step (a connection made just
        before the stop) never closes its socket, and the loop stops before anyone would."""
        for session in list(self._sessions):
            for transport in (session._original_transport, session.transport):
                if isinstance(transport, asyncio.Transport):
                    transport.abort()
        super().cancel_tasks(stop_loop)


class SmtpSink(Service):
    """A real SMTP server on 127.0.0.1 that records messages and counts connections.

    aiosmtpd serves from its own event loop in a thread, so all shared state sits behind one
    condition variable.
    """

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        auth: tuple[str, str] | None = None,
        drop_after: int | None = None,
        reject: Iterable[str] = (),
        data_size_limit: int = 64 * 1024 * 1024,
        pipelining: bool = False,
        verdict_delay: float = 0.0,
    ) -> None:
        """`pipelining` advertises PIPELINING (aiosmtpd answers pipelined commands in order
        but does not say so); `verdict_delay` holds each message's 250 that long, like a
        server scanning the message before it answers."""
        if drop_after is not None and drop_after < 1:
            raise ValueError("drop_after must be >= 1")
        self.host = LOOPBACK
        self.port = 0
        self.tls = tls
        self.auth = auth
        self.drop_after = drop_after
        self.reject = frozenset(address.casefold() for address in reject)
        self.data_size_limit = data_size_limit
        self.pipelining = pipelining
        self.verdict_delay = verdict_delay
        # Settable while running: a connection that carried a message hangs up at its next MAIL.
        self.hang_up_on_reuse = False
        self._cond = threading.Condition()
        self._messages: list[Received] = []
        self._opened = 0
        self._open = 0
        self._quits = 0
        self._auth_failures = 0
        self._controller: _SinkController | None = None

    # -- hooks called from the server thread

    def _record(self, message: Received) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    def _connection_opened(self) -> None:
        with self._cond:
            self._opened += 1
            self._open += 1
            self._cond.notify_all()

    def _connection_closed(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def _quit_received(self) -> None:
        with self._cond:
            self._quits += 1
            self._cond.notify_all()

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        assert self.auth is not None
        user, password = self.auth
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        if not ok:
            with self._cond:
                self._auth_failures += 1
        return AuthResult(success=ok, handled=False)

    # -- observations

    @property
    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._messages)

    def parsed(self) -> list[EmailMessage]:
        """The accepted messages parsed the way a mail client would see them."""
        return [
            email.message_from_bytes(m.data, _class=EmailMessage, policy=email.policy.default)
            for m in self.messages
        ]

    @property
    def connections_opened(self) -> int:
        """TCP connections accepted since start (the controller's readiness probe excluded)."""
        with self._cond:
            return self._opened

    @property
    def connections_open(self) -> int:
        with self._cond:
            return self._open

    @property
    def auth_failures(self) -> int:
        """Logins the server refused since start."""
        with self._cond:
            return self._auth_failures

    @property
    def quit_count(self) -> int:
        with self._cond:
            return self._quits

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least `count` messages arrived; fail with what did arrive."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= count, timeout):
                raise TimeoutError(
                    f"expected {count} message(s) within {timeout}s, got {len(self._messages)}"
                )
            return list(self._messages)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until the server has seen every connection close (clients may close lazily)."""
        self.wait_open_at_most(0, timeout)

    def wait_open_at_most(self, count: int, timeout: float = 10.0) -> None:
        """Block until the server holds at most `count` connections: it notices that a client
        closed one a moment after the client did (later still on a loaded machine)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._open <= count, timeout):
                raise TimeoutError(f"{self._open} connection(s) still open after {timeout}s")

    def clear(self) -> None:
        """Forget messages and counters (open connections keep being tracked)."""
        with self._cond:
            self._messages.clear()
            self._opened = self._open
            self._quits = 0

    # -- lifecycle

    _controller_class: type[_SinkController] = _SinkController
    _server_hostname = "sink.test"

    def start(self) -> None:
        if self._controller is not None:
            raise RuntimeError("SMTP sink already running")
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port or free_port(),
            "server_hostname": self._server_hostname,
            "data_size_limit": self.data_size_limit,
            "ready_timeout": 10.0,
        }
        if self.tls is not None:
            kwargs.update(tls_context=self.tls, require_starttls=True)
        if self.auth is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True)
        controller = self._controller_class(
            self, allow_plain_auth=self.auth is not None and self.tls is None, **kwargs
        )
        controller.start()
        self._controller = controller
        self.port = controller.port
        # Controller.start() opens one probe connection to see the server answer; let it close
        # and leave it out of the counts so tests see only their own clients.
        try:
            self.wait_idle(timeout=10.0)
        except TimeoutError:
            self.stop()
            raise
        with self._cond:
            self._opened = 0
            self._quits = 0

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def restart(self) -> None:
        """Stop (every client connection dropped) and start again on the same port."""
        self.stop()
        self.start()


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost, as PEM files."""

    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """What a correctly configured client uses: trust exactly this CA."""
        return ssl.create_default_context(cafile=str(self.ca))


def make_tls_files(directory: Path) -> TlsFiles:
    """Write ca.pem, server.pem and server.key into `directory`.

    The extensions (key usages, key identifiers) satisfy strict X.509 verification, which newer
    Pythons enable in ssl.create_default_context().
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(days=1), now + dt.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "async-notifier test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(
        ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key"
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


# --------------------------------------------------------------------------- Lambda


def sqs_record(
    body: Mapping[str, Any] | str,
    message_id: str | None = None,
    *,
    receive_count: int = 1,
    queue_arn: str = "arn:aws:sqs:us-east-1:123456789012:notifications",
) -> dict[str, Any]:
    """One record shaped exactly like those Lambda's SQS event source delivers."""
    text = body if isinstance(body, str) else json.dumps(body)
    now_ms = int(time.time() * 1000)
    return {
        "messageId": message_id or str(uuid.uuid4()),
        "receiptHandle": f"AQEB{uuid.uuid4().hex}{uuid.uuid4().hex}",
        "body": text,
        "attributes": {
            "ApproximateReceiveCount": str(receive_count),
            "SentTimestamp": str(now_ms - 50),
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": str(now_ms),
        },
        "messageAttributes": {},
        "md5OfBody": hashlib.md5(text.encode(), usedforsecurity=False).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": queue_arn.split(":")[3],
    }


def sqs_event(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {"Records": [dict(record) for record in records]}


class FakeLambdaContext:
    """The Lambda context object; the runtime has no local peer, so this one is hand-made."""

    def __init__(
        self,
        remaining_ms: int = 300_000,
        *,
        function_name: str = "async-notifier",
        aws_request_id: str | None = None,
    ) -> None:
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:{REGION}:123456789012:function:{function_name}"
        self.memory_limit_in_mb = "512"
        self.aws_request_id = aws_request_id or str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = "2024/01/01/[$LATEST]0123456789abcdef"
        self._deadline = time.monotonic() + remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def failed_ids(result: dict[str, Any]) -> list[str]:
    """The batchItemFailures ids, after checking the response is well formed."""
    assert list(result) == ["batchItemFailures"]
    items = result["batchItemFailures"]
    assert isinstance(items, list)
    for item in items:
        assert isinstance(item, dict)
        assert list(item) == ["itemIdentifier"]
        assert isinstance(item["itemIdentifier"], str)
    ids = [item["itemIdentifier"] for item in items]
    assert len(ids) == len(set(ids))
    return sorted(ids)


def log_lines(out: str) -> list[dict[str, Any]]:
    """The JSON lines (logs and metrics) in captured stdout."""
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


class CapturedLogs(logging.Handler):
    """Every record the package logs, whatever LOG_LEVEL and the package's handlers say."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, message: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == message]
