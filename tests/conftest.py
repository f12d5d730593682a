"""Every fixture that starts a real peer or points the worker at one, in one place.

Peers: moto (AWS) and aiosmtpd (SMTP) on 127.0.0.1, the fault injectors in front of or
instead of them, the Lambda Runtime API emulator, and a LocalStack started elsewhere. Worker
environments, each built on the one before: `worker_env` (the plain sink and moto),
`lambda_env` (for `handler.lambda_handler`), `faulty_lambda_env` (the fault injectors),
`runner_env` (the SQS runner), and `localstack_env`. The peers themselves, and the helpers
tests share, are in tests/support (on sys.path, see pyproject.toml).

Fixtures that only create a test module's own data in a peer (a table, a user pool, queues)
stay in that module. The worker reads its configuration from the environment, which these
fixtures set per test with monkeypatch; with xdist every worker process has its own session
fixtures (its own moto).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import botocore.retries.standard
import pytest
from faults import FaultySmtp, S3FaultProxy
from queues import REDRIVE_ENV
from runtime_api import RuntimeApi
from servers import CapturedLogs, MotoServer, SmtpSink, TlsFiles, make_tls_files, s3_client

if TYPE_CHECKING:
    from async_notifier.mail.render import Renderer

BUCKET = "videos-zip"
LOCALSTACK_ENDPOINT = os.environ.get("LOCALSTACK_ENDPOINT", "http://127.0.0.1:4566")

# --------------------------------------------------------------------------- peers


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
    _point_aws_at(moto_server.endpoint_url, monkeypatch)
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
def runtime_api() -> Iterator[RuntimeApi]:
    """The Lambda Runtime API emulator; it must have answered every request by the rules."""
    api = RuntimeApi()
    api.start()
    try:
        yield api
    finally:
        api.stop()
    assert api.errors == []


@pytest.fixture(scope="module")
def localstack() -> str:
    """LocalStack's endpoint (`make localstack` starts it): a test that needs it fails, never
    skips, when it is not there."""
    from async_notifier.local.localstack import health, ready

    document = health(LOCALSTACK_ENDPOINT)
    if not ready(document):
        pytest.fail(
            f"LocalStack is not running (or S3/SQS not ready) at {LOCALSTACK_ENDPOINT}: "
            f"start it with `make localstack`. Health: {document}"
        )
    return LOCALSTACK_ENDPOINT


# --------------------------------------------------------------------------- worker environments


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
    return _configure_worker(
        {
            **_sink_settings(smtp_sink),
            "SMTP_POOL_SIZE": "4",
            "MAX_CONCURRENCY": "16",
            "TMP_DIR": str(tmp_dir),
        },
        monkeypatch,
    )


@pytest.fixture
def lambda_env(
    worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, fresh_handler: None
) -> dict[str, str]:
    """`worker_env` for `handler.lambda_handler`: short in-invocation retries, and the
    handler's cached settings, clients and loop forgotten before and after."""
    monkeypatch.setenv("RETRY_BASE_DELAY", "0.01")
    return {**worker_env, "RETRY_BASE_DELAY": "0.01"}


@pytest.fixture
def faulty_lambda_env(
    lambda_env: dict[str, str],
    faulty_smtp: FaultySmtp,
    s3_proxy: S3FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """`lambda_env`, but SMTP goes to `faulty_smtp` and every AWS call through `s3_proxy`.

    The worker passes AWS_ENDPOINT_URL to all its clients, so SQS and DynamoDB go through the
    proxy as well: scope S3 rules with `match=f"/{BUCKET}/"`. RETRY_BACKOFF is off: the
    records are synthetic, with no source queue to change the visibility of. The SDK's own
    retries keep their number but sleep a hundredth of their jittered 1 s, 2 s, 4 s: seconds
    per S3 fault would make these tests slow, not stricter.
    """
    values = {
        **lambda_env,
        "SMTP_SERVER": faulty_smtp.host,
        "SMTP_PORT": str(faulty_smtp.port),
        "AWS_ENDPOINT_URL": s3_proxy.endpoint_url,
        "RETRY_BACKOFF": "false",
    }
    for name in ("SMTP_SERVER", "SMTP_PORT", "AWS_ENDPOINT_URL", "RETRY_BACKOFF"):
        monkeypatch.setenv(name, values[name])
    backoff = botocore.retries.standard.ExponentialBackoff
    delay = backoff.delay_amount
    monkeypatch.setattr(backoff, "delay_amount", lambda self, context: delay(self, context) / 100)
    return values


@pytest.fixture
def runner_env(worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """`worker_env` for the SQS runner: the queue's redrive policy decides when a record
    gives up (no dead-letter queue or idempotency table of the worker's own)."""
    for name, value in REDRIVE_ENV.items():
        monkeypatch.setenv(name, value)
    return {**worker_env, **REDRIVE_ENV}


@pytest.fixture
def localstack_env(
    localstack: str, smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> str:
    """The runner's environment on LocalStack instead of moto; returns the endpoint."""
    _point_aws_at(localstack, monkeypatch)
    _configure_worker(
        {**_sink_settings(smtp_sink), "TMP_DIR": str(tmp_path), **REDRIVE_ENV}, monkeypatch
    )
    return localstack


def _point_aws_at(endpoint_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every AWS SDK at a local endpoint, with credentials that cannot reach AWS."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint_url)
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


def _sink_settings(sink: SmtpSink) -> dict[str, str]:
    return {
        "SMTP_SERVER": sink.host,
        "SMTP_PORT": str(sink.port),
        "SMTP_TLS": "none",
        "EMAIL_FROM": "Async Notifier <no-reply@example.com>",
        # Every test bucket, on purpose; the tests of ALLOWED_BUCKETS set their own.
        "ALLOWED_BUCKETS": "*",
    }


def _configure_worker(values: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Set `values` and unset every other setting the worker reads (AWS_* aside, which
    `_point_aws_at` owns): whatever the shell running the tests exports, a test sees the
    defaults and what it sets itself."""
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    for name in sorted(_setting_names() - set(values)):
        if not name.startswith("AWS_"):
            monkeypatch.delenv(name, raising=False)
    return values


@functools.cache
def _setting_names() -> frozenset[str]:
    """Every variable `Settings.from_env` reads, as it reads them (not a list kept by hand)."""
    from async_notifier.config import ConfigError, Settings

    class Reads(dict[str, str]):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def get(self, key: str, default: Any = None) -> Any:
            self.names.add(key)
            return super().get(key, default)

    reads = Reads()
    # It reads every variable before it reports what is missing.
    with pytest.raises(ConfigError):
        Settings.from_env(reads)
    return frozenset(reads.names)


# --------------------------------------------------------------------------- process state


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
def restore_environ() -> Iterator[None]:
    """For tests that run `run_local` in-process: it sets the worker's environment, as
    `make run-local` does."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


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
    pool = handler.process.notifier.backend.pool if handler.process.notifier is not None else None
    if pool is not None:
        state = pool.check()
        assert (state.busy, state.waiting, state.connecting) == (0, 0, 0), state
    handler.reset()
    logger = logging.getLogger(LOGGER_NAME)
    for log_handler in list(logger.handlers):
        logger.removeHandler(log_handler)


# --------------------------------------------------------------------------- leak hunting


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--gc-each-test",
        action="store_true",
        help="collect garbage at each test's teardown, so an unclosed socket or file fails "
        "the test that left it (not a later one, whenever the collector runs)",
    )


@pytest.fixture(autouse=True)
def _gc_each_test(request: pytest.FixtureRequest) -> Iterator[None]:
    # Torn down before pytest reads the teardown's unraisable warnings: what the collection
    # finds is this test's.
    yield
    if request.config.getoption("--gc-each-test"):
        gc.collect()
