"""Start-up refuses an SMTP secret no login can use (moto's Secrets Manager, real clients).

A plain-text secret is the password alone: without `SMTP_USER` there is no username to log
in with, and every record would fail as `secret_unavailable` until someone read the logs.
Only reading the secret shows its shape, so the check is made where the clients are made:
the Lambda init phase (`handler` imported with AWS_LAMBDA_FUNCTION_NAME set) and the SQS
runner's start. A secret that cannot be read at start is no broken setting: the start goes
on, and the first login reads it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from servers import REGION, MotoServer

from async_notifier.config import ConfigError, Settings
from async_notifier.lambda_process import LambdaProcess
from async_notifier.wiring import build_notifier

ROOT = Path(__file__).resolve().parents[2]
SECRET = "smtp/at-start"
PASSWORD = "pl41n-t3xt-pa55-7c1e"
# SMTP with a secret needs TLS; nothing connects at start, so no server is needed.
SMTP = {
    "SMTP_SERVER": "127.0.0.1",
    "SMTP_PORT": "1",
    "SMTP_TLS": "starttls",
    "EMAIL_FROM": "no-reply@example.com",
    "ALLOWED_BUCKETS": "*",
    "SMTP_PASSWORD_SECRET_ID": SECRET,
}


@pytest.fixture
def secrets_manager(aws: MotoServer) -> Any:
    return boto3.client("secretsmanager", endpoint_url=aws.endpoint_url, region_name=REGION)


def settings(**changes: str) -> Settings:
    """SMTP, the secret named, and the AWS environment the `aws` fixture points at moto."""
    aws_env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return Settings.from_env({**aws_env, **SMTP, **changes})


async def prepare(worker_settings: Settings) -> None:
    async with build_notifier(worker_settings) as notifier:
        await notifier.prepare()


def assert_names_the_setting_not_the_secret(message: str) -> None:
    assert "SMTP_PASSWORD_SECRET_ID" in message
    assert "SMTP_USER" in message
    assert PASSWORD not in message


async def test_a_plain_password_without_smtp_user_fails_the_start(secrets_manager: Any) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    with pytest.raises(ConfigError) as caught:
        await prepare(settings())
    assert_names_the_setting_not_the_secret(str(caught.value))
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or PASSWORD not in repr(caught.value.__context__)


@pytest.mark.parametrize(
    ("value", "changes"),
    [
        (PASSWORD, {"SMTP_USER": "notifier"}),  # the username from SMTP_USER
        (json.dumps({"username": "notifier", "password": PASSWORD}), {}),  # from the secret
    ],
    ids=["plain-with-smtp-user", "json-with-username"],
)
async def test_a_secret_with_a_username_starts(
    secrets_manager: Any, value: str, changes: dict[str, str]
) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=value)
    await prepare(settings(**changes))


async def test_a_secret_that_cannot_be_read_at_start_is_left_to_the_first_login(
    secrets_manager: Any,
) -> None:
    """No such secret (yet): transient, the start goes on."""
    await prepare(settings())


async def test_with_the_ses_api_only_the_secret_is_not_read(secrets_manager: Any) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    await prepare(settings(TRANSPORT="ses"))


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _process_env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "PATH", "HOME"))}
    return {**keep, **SMTP, **extra}


def test_the_lambda_init_fails(secrets_manager: Any) -> None:
    """The runtime client reports an init error; the password is not in what it shows."""
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    env = _process_env(AWS_LAMBDA_FUNCTION_NAME="notifier")
    done = _run(["-c", "import handler"], env)
    assert done.returncode != 0
    assert "ConfigError" in done.stderr
    assert_names_the_setting_not_the_secret(done.stderr)
    assert PASSWORD not in done.stdout
    # The control: with SMTP_USER the same init succeeds.
    assert _run(["-c", "import handler"], {**env, "SMTP_USER": "notifier"}).returncode == 0


def test_the_runner_does_not_start(secrets_manager: Any) -> None:
    """Exit 2, as for any invalid setting, before the queue is even looked up."""
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    queue_url = "http://127.0.0.1:1/000000000000/never-reached"
    done = _run(["-m", "async_notifier", "run", "--queue-url", queue_url], _process_env())
    assert done.returncode == 2, done.stderr
    assert_names_the_setting_not_the_secret(done.stderr)
    assert PASSWORD not in done.stdout
    assert "runner started" not in done.stdout


def test_a_snapshot_keeps_no_secret_the_init_read(secrets_manager: Any) -> None:
    """SnapStart: the secret read at init to check it is dropped before the snapshot, so a
    restored copy holds none until it reads the secret again."""
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    worker_settings = settings(SMTP_USER="notifier")
    process = LambdaProcess(
        notifier=lambda: build_notifier(worker_settings),
        ses_recorder=lambda: pytest.fail("not this entry point"),
    )
    try:
        notifier = process.start(ses_events=False)
        source = notifier.backend.secret  # type: ignore[attr-defined]
        assert source.fetches == 1  # read at init
        process.before_snapshot()
        process.run(source.get())
        assert source.fetches == 2  # nothing was kept to answer from
    finally:
        process.reset()
