"""Fixtures wiring the worker to real peers: moto (AWS) and aiosmtpd (SMTP) on 127.0.0.1.

Nothing here imports async_notifier: the worker reads its configuration from the environment,
which these fixtures set per test with monkeypatch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import MotoServer, SmtpSink, TlsFiles, make_tls_files, s3_client

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
