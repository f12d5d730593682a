"""Fixtures wiring the worker to real peers: moto (AWS) and aiosmtpd (SMTP) on 127.0.0.1.

Nothing here imports async_notifier: the worker reads its configuration from the environment,
which these fixtures set per test with monkeypatch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from faults import FaultySmtp, S3FaultProxy
from servers import CapturedLogs, MotoServer, SmtpSink, TlsFiles, make_tls_files, s3_client

if TYPE_CHECKING:
    from async_notifier.mail.render import Renderer

BUCKET = "videos-zip"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto process per session (starting it takes seconds); tests reset it via `aws`."""
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """A clean moto, and the environment that points every AWS SDK at it."""
    moto_server.reset()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint_url)
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return moto_server


@pytest.fixture
def bucket(aws: MotoServer) -> str:
    s3_client(aws.endpoint_url).create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def worker_env(
    aws: MotoServer,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> dict[str, str]:
    """The worker's configuration for the plain sink; tests override single variables."""
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    values = {
        "SMTP_SERVER": smtp_sink.host,
        "SMTP_PORT": str(smtp_sink.port),
        "SMTP_TLS": "none",
        "EMAIL_FROM": "Async Notifier <no-reply@example.com>",
        "SMTP_POOL_SIZE": "4",
        "MAX_CONCURRENCY": "16",
        "TMP_DIR": str(tmp_dir),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    for name in ("SMTP_USER", "SMTP_PASSWORD", "ALLOWED_BUCKETS", "SMTP_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    return values


# --------------------------------------------------------------------------- fault injection
# (see tests/support/faults.py; the reliability tests point the worker at these instead of the sink)


@pytest.fixture
def faulty_smtp() -> Iterator[FaultySmtp]:
    """A healthy FaultySmtp; tests install faults with `faulty_smtp.faults = SmtpFaults(...)`."""
    server = FaultySmtp()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_proxy(moto_server: MotoServer) -> Iterator[S3FaultProxy]:
    """A passthrough S3FaultProxy in front of the session's moto; install rules per test."""
    proxy = S3FaultProxy(moto_server.endpoint_url)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def faulty_worker_env(
    worker_env: dict[str, str],
    faulty_smtp: FaultySmtp,
    s3_proxy: S3FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """`worker_env`, but SMTP goes to `faulty_smtp` and every AWS call through `s3_proxy`.

    The worker passes AWS_ENDPOINT_URL to all its clients, so SQS and DynamoDB go through the
    proxy as well: scope S3 rules with `match=f"/{BUCKET}/"`.
    """
    values = {
        **worker_env,
        "SMTP_SERVER": faulty_smtp.host,
        "SMTP_PORT": str(faulty_smtp.port),
        "AWS_ENDPOINT_URL": s3_proxy.endpoint_url,
    }
    for name in ("SMTP_SERVER", "SMTP_PORT", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, values[name])
    return values


@pytest.fixture
def fresh_handler() -> Iterator[None]:
    """`handler` caches settings, warm clients and its event loop for the process: forget them
    (closing the clients) around a test that changes the environment, and the package's log
    handlers with them, so the next Notifier configures its own."""
    _forget_handler()
    try:
        yield
    finally:
        _forget_handler()


@pytest.fixture
def captured() -> Iterator[CapturedLogs]:
    """The package's log records, straight from its logger (which does not propagate, so
    pytest's caplog would miss them once a Notifier has configured it)."""
    from async_notifier.logs import get_logger

    handler = CapturedLogs()
    logger = get_logger()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    """One renderer over the shipped templates per test module: it keeps nothing between renders."""
    from async_notifier.config import DEFAULT_TEMPLATES_DIR
    from async_notifier.mail.render import Renderer

    return Renderer(DEFAULT_TEMPLATES_DIR)


def _forget_handler() -> None:
    import handler
    from async_notifier.logs import LOGGER_NAME

    # Whatever the scenario did to the warm process, the pool's books still add up.
    pool = handler._notifier.backend.pool if handler._notifier is not None else None
    if pool is not None:
        state = pool.check()
        assert (state.busy, state.waiting, state.connecting) == (0, 0, 0), state
    handler.reset()
    logger = logging.getLogger(LOGGER_NAME)
    for log_handler in list(logger.handlers):
        logger.removeHandler(log_handler)
