"""SMTP credentials from Secrets Manager (moto in server mode, real aiobotocore clients).

Calls are counted at the client factory (one client per fetch), and, where it proves more,
by deleting the secret in moto after the first read: a cached value still comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import traceback
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from servers import REGION, MotoServer, free_port

from async_notifier.aws.clients import aws_client
from async_notifier.aws.secrets import SecretSource, SmtpCredentials, parse_secret
from async_notifier.config import Settings
from async_notifier.errors import SecretUnavailable, TransientError
from async_notifier.logs import LOGGER_NAME, JsonFormatter

SECRET = "smtp/notifier"
PASSWORD = "pa55-Wörd-9f3a7c"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingFactory:
    """The worker's own `aws_client`, counting the clients it opens (one per fetch)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.calls = 0

    def __call__(self) -> contextlib.AbstractAsyncContextManager[Any]:
        self.calls += 1
        return aws_client("secretsmanager", self.settings)  # type: ignore[no-any-return]


@pytest.fixture
def secrets_manager(aws: MotoServer) -> Any:
    return boto3.client("secretsmanager", endpoint_url=aws.endpoint_url, region_name=REGION)


@pytest.fixture
def factory(aws: MotoServer) -> CountingFactory:
    settings = Settings.from_env(
        {
            "SMTP_SERVER": "smtp.example.com",
            "EMAIL_FROM": "no-reply@example.com",
            "ALLOWED_BUCKETS": "*",
            "AWS_ENDPOINT_URL": aws.endpoint_url,
            "AWS_REGION": REGION,
        }
    )
    return CountingFactory(settings)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """The package's log lines as the worker formats them (JSON), whatever its handlers."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(LOGGER_NAME)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def source(factory: CountingFactory, clock: Clock, ttl: float = 300.0) -> SecretSource:
    return SecretSource(factory, SECRET, ttl=ttl, clock=clock)


def assert_not_leaked(exc: BaseException, *texts: str) -> None:
    """Neither the message, the repr, nor a formatted traceback (with causes) holds the value."""
    rendered = "".join(traceback.format_exception(exc))
    for text in (str(exc), repr(exc), rendered, *texts):
        assert PASSWORD not in text
    assert exc.__cause__ is None
    assert exc.__context__ is None


# --------------------------------------------------------------------------- formats


async def test_plain_string_is_the_password(
    secrets_manager: Any, factory: CountingFactory, clock: Clock
) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    credentials = await source(factory, clock).get()
    assert credentials == SmtpCredentials(username=None, password=PASSWORD)


async def test_json_with_username_and_password(
    secrets_manager: Any, factory: CountingFactory, clock: Clock
) -> None:
    secrets_manager.create_secret(
        Name=SECRET,
        SecretString=f'{{"username": "AKIAEXAMPLE", "password": "{PASSWORD}", "host": "x"}}',
    )
    credentials = await source(factory, clock).get()
    assert credentials == SmtpCredentials(username="AKIAEXAMPLE", password=PASSWORD)


@pytest.mark.parametrize(
    "secret", [f'{{"password": "{PASSWORD}"}}', f'{{"username": "", "password": "{PASSWORD}"}}']
)
async def test_json_without_username(
    secrets_manager: Any, factory: CountingFactory, clock: Clock, secret: str
) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=secret)
    credentials = await source(factory, clock).get()
    assert credentials == SmtpCredentials(username=None, password=PASSWORD)


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        (PASSWORD, "smtp-user"),
        (f'{{"password": "{PASSWORD}"}}', "smtp-user"),
        (f'{{"username": "", "password": "{PASSWORD}"}}', "smtp-user"),
        (f'{{"username": "own", "password": "{PASSWORD}"}}', "own"),
    ],
)
def test_default_username_fills_in(secret: str, expected: str) -> None:
    """SMTP_USER names the user when the secret does not; the secret's own name wins."""
    credentials = parse_secret(secret, default_username="smtp-user", username_required=True)
    assert credentials == SmtpCredentials(expected, PASSWORD)


async def test_required_username_missing_is_unavailable(
    secrets_manager: Any, factory: CountingFactory, clock: Clock
) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    secret_source = SecretSource(factory, SECRET, ttl=60, username_required=True, clock=clock)
    with pytest.raises(SecretUnavailable, match="no username") as caught:
        await secret_source.get()
    assert_not_leaked(caught.value)
    with_default = SecretSource(
        factory, SECRET, ttl=60, default_username="u", username_required=True, clock=clock
    )
    assert await with_default.get() == SmtpCredentials("u", PASSWORD)


def test_password_is_not_in_repr() -> None:
    credentials = SmtpCredentials(username="user", password=PASSWORD)
    assert PASSWORD not in repr(credentials)
    assert PASSWORD not in str(credentials)
    assert "user" in repr(credentials)


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        (f'{{"username": "u", "password": "{PASSWORD}"', "not valid JSON"),
        (f'  {{"password": {PASSWORD}}}', "not valid JSON"),
        (f'{{"username": "u", "pass": "{PASSWORD}"}}', "no non-empty string 'password'"),
        ('{"username": "u", "password": ""}', "no non-empty string 'password'"),
        (f'{{"username": 7, "password": "{PASSWORD}"}}', "'username' that is not a string"),
        ("", "is empty"),
    ],
)
def test_malformed_secrets_are_refused_without_the_value(secret: str, problem: str) -> None:
    with pytest.raises(SecretUnavailable, match=problem) as caught:
        parse_secret(secret)
    assert_not_leaked(caught.value)


# --------------------------------------------------------------------------- errors


async def test_malformed_json_in_secrets_manager_does_not_leak(
    secrets_manager: Any, factory: CountingFactory, clock: Clock, captured_logs: io.StringIO
) -> None:
    secrets_manager.create_secret(
        Name=SECRET, SecretString=f'{{"username": "u", "password": "{PASSWORD}",}}'
    )
    with pytest.raises(SecretUnavailable) as caught:
        await source(factory, clock).get()
    error = caught.value
    assert error.kind == "secret_unavailable"
    assert error.transient
    assert isinstance(error, TransientError)
    assert SECRET in error.reason
    assert "not valid JSON" in error.reason
    logs = captured_logs.getvalue()
    assert "smtp secret unavailable" in logs
    assert_not_leaked(error, logs)


async def test_missing_secret_is_unavailable(
    secrets_manager: Any, factory: CountingFactory, clock: Clock, captured_logs: io.StringIO
) -> None:
    with pytest.raises(SecretUnavailable, match="ResourceNotFoundException") as caught:
        await source(factory, clock).get()
    assert SECRET in caught.value.reason
    assert_not_leaked(caught.value, captured_logs.getvalue())


async def test_binary_secret_is_refused(
    secrets_manager: Any, factory: CountingFactory, clock: Clock
) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretBinary=PASSWORD.encode())
    with pytest.raises(SecretUnavailable, match="no SecretString") as caught:
        await source(factory, clock).get()
    assert_not_leaked(caught.value)


async def test_unreachable_endpoint_is_unavailable(aws: MotoServer, clock: Clock) -> None:
    settings = Settings.from_env(
        {
            "SMTP_SERVER": "smtp.example.com",
            "EMAIL_FROM": "no-reply@example.com",
            "ALLOWED_BUCKETS": "*",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
            "S3_TIMEOUT": "1",
        }
    )
    unreachable = CountingFactory(settings)
    with pytest.raises(SecretUnavailable, match="EndpointConnectionError") as caught:
        await SecretSource(unreachable, SECRET, ttl=60, clock=clock).get()
    assert_not_leaked(caught.value)


class CarelessClient:
    """A failure whose own text quotes the value (as a response parser's error could)."""

    async def get_secret_value(self, **kwargs: Any) -> Any:
        raise ValueError(f"could not parse response body: {PASSWORD}")


async def test_error_text_of_other_failures_is_left_out(clock: Clock) -> None:
    def factory() -> contextlib.AbstractAsyncContextManager[Any]:
        return contextlib.nullcontext(CarelessClient())

    with pytest.raises(SecretUnavailable, match="ValueError") as caught:
        await SecretSource(factory, SECRET, ttl=60, clock=clock).get()
    assert_not_leaked(caught.value)


async def test_success_logs_do_not_hold_the_value(
    secrets_manager: Any, factory: CountingFactory, clock: Clock, captured_logs: io.StringIO
) -> None:
    secrets_manager.create_secret(
        Name=SECRET, SecretString=f'{{"username": "u", "password": "{PASSWORD}"}}'
    )
    await source(factory, clock).get()
    logs = captured_logs.getvalue()
    assert "smtp secret loaded" in logs
    assert SECRET in logs
    assert PASSWORD not in logs


# --------------------------------------------------------------------------- caching


async def test_second_get_comes_from_the_cache(
    secrets_manager: Any, factory: CountingFactory, clock: Clock
) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    secret_source = source(factory, clock)
    first = await secret_source.get()
    secrets_manager.delete_secret(SecretId=SECRET, ForceDeleteWithoutRecovery=True)
    clock.now += 299
    assert await secret_source.get() is first
    assert factory.calls == 1
    assert secret_source.fetches == 1


async def test_ttl_expiry_reads_the_secret_again(
    secrets_manager: Any, factory: CountingFactory, clock: Clock
) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    secret_source = source(factory, clock, ttl=300)
    assert (await secret_source.get()).password == PASSWORD
    secrets_manager.put_secret_value(SecretId=SECRET, SecretString="rotated")
    clock.now += 299.9
    assert (await secret_source.get()).password == PASSWORD
    clock.now += 0.1
    assert (await secret_source.get()).password == "rotated"
    assert factory.calls == 2


async def test_zero_ttl_reads_every_time(
    secrets_manager: Any, factory: CountingFactory, clock: Clock
) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    secret_source = source(factory, clock, ttl=0)
    await secret_source.get()
    await secret_source.get()
    assert factory.calls == 2


async def test_invalidate_forces_a_refresh(
    secrets_manager: Any, factory: CountingFactory, clock: Clock, captured_logs: io.StringIO
) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    secret_source = source(factory, clock)
    old = await secret_source.get()
    secrets_manager.put_secret_value(
        SecretId=SECRET, SecretString='{"username": "new-user", "password": "rotated"}'
    )
    assert secret_source.invalidate(old)
    assert await secret_source.get() == SmtpCredentials("new-user", "rotated")
    assert factory.calls == 2
    assert "smtp secret invalidated" in captured_logs.getvalue()
    # A connection still holding the old credentials fails later: nothing more is dropped.
    assert not secret_source.invalidate(old)
    assert factory.calls == 2


async def test_invalidate_without_credentials_always_drops(
    secrets_manager: Any, factory: CountingFactory, clock: Clock
) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    secret_source = source(factory, clock)
    assert not secret_source.invalidate()  # nothing cached yet
    await secret_source.get()
    assert secret_source.invalidate()
    await secret_source.get()
    assert factory.calls == 2


async def test_auth_failures_on_many_connections_refresh_once(
    secrets_manager: Any, factory: CountingFactory, clock: Clock
) -> None:
    """What the pool does after a 535 on each of several connections at once."""
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    secret_source = source(factory, clock)
    refused = await secret_source.get()
    secrets_manager.put_secret_value(SecretId=SECRET, SecretString="rotated")

    async def reconnect() -> SmtpCredentials:
        secret_source.invalidate(refused)
        return await secret_source.get()

    results = await asyncio.gather(*(reconnect() for _ in range(8)))
    assert {r.password for r in results} == {"rotated"}
    assert factory.calls == 2


# --------------------------------------------------------------------------- concurrency


async def test_concurrent_gets_share_one_fetch(
    secrets_manager: Any, factory: CountingFactory, clock: Clock
) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    secret_source = source(factory, clock)
    results = await asyncio.gather(*(secret_source.get() for _ in range(20)))
    assert all(r is results[0] for r in results)
    assert factory.calls == 1


async def test_concurrent_gets_share_one_failure(factory: CountingFactory, clock: Clock) -> None:
    secret_source = source(factory, clock)
    results = await asyncio.gather(
        *(secret_source.get() for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, SecretUnavailable) for r in results)
    assert len({id(r) for r in results}) == 10  # a fresh exception for each caller
    assert factory.calls == 1
    # The failure is not cached: the next caller tries again.
    with pytest.raises(SecretUnavailable):
        await secret_source.get()
    assert factory.calls == 2


async def test_zero_ttl_concurrent_gets_still_share(
    secrets_manager: Any, factory: CountingFactory, clock: Clock
) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    secret_source = source(factory, clock, ttl=0)
    await asyncio.gather(*(secret_source.get() for _ in range(5)))
    assert factory.calls == 1


async def test_usable_from_a_second_event_loop(
    secrets_manager: Any, factory: CountingFactory, clock: Clock
) -> None:
    """The Notifier rebuilds its clients for a new loop; the source and its lock follow."""
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    secret_source = source(factory, clock, ttl=0)
    await asyncio.gather(secret_source.get(), secret_source.get())

    def other_loop() -> SmtpCredentials:
        async def both() -> SmtpCredentials:
            first, _ = await asyncio.gather(secret_source.get(), secret_source.get())
            return first

        return asyncio.run(both())

    assert (await asyncio.to_thread(other_loop)).password == PASSWORD


# --------------------------------------------------------------------------- stale values


async def test_expired_credentials_survive_a_failed_refresh(
    secrets_manager: Any, factory: CountingFactory, clock: Clock, captured_logs: io.StringIO
) -> None:
    secrets_manager.create_secret(Name=SECRET, SecretString=PASSWORD)
    secret_source = source(factory, clock, ttl=300)
    first = await secret_source.get()
    secrets_manager.delete_secret(SecretId=SECRET, ForceDeleteWithoutRecovery=True)
    clock.now += 301
    assert await secret_source.get() is first  # Secrets Manager failing: keep sending
    assert "using the cached credentials" in captured_logs.getvalue()
    assert factory.calls == 2
    clock.now += 29  # not retried at every connect while it keeps failing
    assert await secret_source.get() is first
    assert factory.calls == 2
    clock.now += 1
    assert await secret_source.get() is first
    assert factory.calls == 3
    # Refused by the server: the stale value is gone and the failure surfaces.
    secret_source.invalidate(first)
    with pytest.raises(SecretUnavailable, match="ResourceNotFoundException"):
        await secret_source.get()
    assert PASSWORD not in captured_logs.getvalue()


def test_rejects_bad_arguments(factory: CountingFactory) -> None:
    with pytest.raises(ValueError, match="secret_id"):
        SecretSource(factory, "", ttl=1)
    with pytest.raises(ValueError, match="ttl"):
        SecretSource(factory, SECRET, ttl=-1)
