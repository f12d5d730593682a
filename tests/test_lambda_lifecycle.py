"""The Lambda process's life: the init phase, and SnapStart's snapshot and restore.

In Lambda, importing `handler` is the init phase (`AWS_LAMBDA_FUNCTION_NAME` set): the
work that does not depend on an event is done there, off the first invocation's clock, and
a broken setting fails it. With SnapStart, Lambda runs the registered hooks around the
snapshot; here they are called in the order the runtime calls them, around invocations of
one process, against moto and aiosmtpd.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from servers import (
    LOOPBACK,
    REGION,
    FakeLambdaContext,
    MotoServer,
    SmtpSink,
    TlsFiles,
    sqs_event,
    sqs_record,
)

import handler

ROOT = Path(__file__).resolve().parent.parent


def _run_import(env: dict[str, str], code: str) -> subprocess.CompletedProcess[str]:
    """`import handler` (and `code` after it) in a fresh interpreter, as Lambda's init does."""
    return subprocess.run(
        [sys.executable, "-c", f"import handler\n{code}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _lambda_env(worker_env: dict[str, str], **extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "PATH", "HOME"))}
    return {**keep, **worker_env, "ALLOWED_BUCKETS": "*", **extra}


def test_in_lambda_the_import_does_the_event_free_work(worker_env: dict[str, str]) -> None:
    """Settings, templates, aioboto3 and the clients are ready once the import returns;
    nothing has connected to the SMTP server yet."""
    code = (
        "import sys\n"
        "notifier = handler.process.notifier\n"
        "assert notifier is not None, 'nothing prepared'\n"
        "adapters = notifier.backend._adapters\n"
        "assert adapters is not None, 'no clients made'\n"
        "assert 'aioboto3' in sys.modules\n"
        "assert adapters.transport.connections_opened == 0\n"
        "assert adapters.transport.check().places == 0\n"
        "print('ready')\n"
    )
    env = _lambda_env(worker_env, AWS_LAMBDA_FUNCTION_NAME="notifier")
    done = _run_import(env, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ready"


def test_outside_lambda_the_import_stays_lazy(worker_env: dict[str, str]) -> None:
    env = {k: v for k, v in _lambda_env(worker_env).items() if k != "AWS_LAMBDA_FUNCTION_NAME"}
    done = _run_import(
        env, "import sys\nprint(handler.process.notifier, 'aioboto3' in sys.modules)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None False"


def test_a_broken_setting_fails_the_init_with_a_clear_message(worker_env: dict[str, str]) -> None:
    env = _lambda_env(worker_env, AWS_LAMBDA_FUNCTION_NAME="notifier")
    del env["EMAIL_FROM"]
    done = _run_import(env, "")
    assert done.returncode != 0
    assert "ConfigError: invalid configuration: EMAIL_FROM is required" in done.stderr


def test_the_ses_events_function_prepares_its_own_entry_point(
    aws: MotoServer, worker_env: dict[str, str]
) -> None:
    """Lambda's `_HANDLER` says which entry point this process serves: the SES events
    function needs no SMTP settings, and SUPPRESSION_TABLE."""
    env = _lambda_env(
        {"AWS_ENDPOINT_URL": aws.endpoint_url},
        AWS_LAMBDA_FUNCTION_NAME="ses-events",
        _HANDLER="handler.ses_events_handler",
        SUPPRESSION_TABLE="suppression",
    )
    code = "print(type(handler.process.ses_recorder).__name__, handler.process.notifier)"
    done = _run_import(env, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SesEventsRecorder None"
    del env["SUPPRESSION_TABLE"]
    assert "SUPPRESSION_TABLE is required" in _run_import(env, "").stderr


# --------------------------------------------------------------------------- SnapStart


def _failed(records: list[dict[str, Any]]) -> list[str]:
    result = handler.lambda_handler(sqs_event(records), FakeLambdaContext())
    return [item["itemIdentifier"] for item in result["batchItemFailures"]]


def _record(n: int) -> dict[str, Any]:
    body = {"video_id": f"v{n}", "status": "FAILED", "email": f"u{n}@example.com"}
    return sqs_record(body, f"m{n}")


def test_snapstart_hooks_keep_nothing_from_before_the_snapshot(
    worker_env: dict[str, str],
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    fresh_handler: None,
) -> None:
    monkeypatch.setenv("ALLOWED_BUCKETS", "*")
    import snapshot_restore_py

    before = [f for f, _, _ in snapshot_restore_py.get_before_snapshot()]
    after = [f for f, _, _ in snapshot_restore_py.get_after_restore()]
    assert handler.process.before_snapshot in before  # registered at import, as Lambda needs
    assert handler.process.after_restore in after

    assert _failed([_record(1), _record(2)]) == []  # the init, then an invocation
    smtp_sink.wait_for(2)
    assert smtp_sink.connections_open >= 1  # warm connections are kept between invocations
    pool = handler.process.notifier.backend.pool  # type: ignore[union-attr]
    assert pool is not None

    # Lambda runs the hooks: before the snapshot (in reverse order of registration)...
    for hook in reversed(before):
        hook()
    smtp_sink.wait_idle()  # no socket goes into the snapshot
    assert handler.process.notifier.backend.pool is None  # type: ignore[union-attr]
    assert pool.check().places == 0
    snapshot_state = random.getstate()

    # ...and after each restore.
    for hook in after:
        hook()
    assert random.getstate() != snapshot_state  # copies of one snapshot do not share it
    fresh_pool = handler.process.notifier.backend.pool  # type: ignore[union-attr]
    assert fresh_pool is not None
    assert fresh_pool is not pool
    assert fresh_pool.connections_opened == 0  # made anew, connecting nothing yet

    opened_before = smtp_sink.connections_opened
    assert _failed([_record(3)]) == []
    smtp_sink.wait_for(3)
    assert smtp_sink.connections_opened == opened_before + 1  # a new connection, not an old one
    assert fresh_pool.connections_opened == 1


def test_after_a_restore_secrets_are_read_again(
    worker_env: dict[str, str],
    aws: MotoServer,
    tls_files: TlsFiles,
    monkeypatch: pytest.MonkeyPatch,
    fresh_handler: None,
) -> None:
    """A secret cached before the snapshot may have rotated since: a restored copy reads it
    again before it logs in, instead of waiting for a refused login."""
    secrets = boto3.client("secretsmanager", endpoint_url=aws.endpoint_url, region_name=REGION)
    secrets.create_secret(Name="smtp", SecretString=json.dumps({"username": "u", "password": "a"}))
    with SmtpSink(tls=tls_files.server_context(), auth=("u", "a")) as sink:
        for name, value in {
            "ALLOWED_BUCKETS": "*",
            "SMTP_SERVER": LOOPBACK,
            "SMTP_PORT": str(sink.port),
            "SMTP_TLS": "starttls",
            "SMTP_CA_FILE": str(tls_files.ca),
            "SMTP_PASSWORD_SECRET_ID": "smtp",
        }.items():
            monkeypatch.setenv(name, value)
        assert _failed([_record(1)]) == []
        source = handler.process.notifier.backend.secret  # type: ignore[union-attr]
        assert source.fetches == 1
        handler.process.before_snapshot()
        # Rotated while the snapshot waited to be restored.
        secrets.put_secret_value(
            SecretId="smtp", SecretString=json.dumps({"username": "u", "password": "b"})
        )
        sink.auth = ("u", "b")
        handler.process.after_restore()
        assert _failed([_record(2)]) == []
        assert source.fetches == 2  # read again once...
        assert sink.auth_failures == 0  # ...before the login, which was right the first time
        sink.wait_for(2)
