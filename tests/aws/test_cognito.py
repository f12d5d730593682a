"""Recipients from a Cognito user pool (moto's cognito-idp in server mode, aiobotocore client).

Calls are counted by the lookup itself (`calls`) and, where it proves more, by deleting the
user in moto after the first lookup: a cached recipient still comes back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import boto3
import pytest
from aiobotocore.config import AioConfig
from botocore.exceptions import ClientError
from servers import REGION, MotoServer, free_port

from async_notifier.aws.clients import aws_client
from async_notifier.aws.cognito import CognitoRecipients, Recipient
from async_notifier.config import Settings
from async_notifier.errors import (
    LookupFailed,
    PermanentError,
    RecipientUnknown,
    RecipientUnverified,
    TransientError,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Gate:
    """A client wrapper that holds every AdminGetUser until released."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.released = asyncio.Event()
        self.started = asyncio.Event()

    async def admin_get_user(self, **kwargs: Any) -> Any:
        self.started.set()
        await self.released.wait()
        return await self._client.admin_get_user(**kwargs)


class Raising:
    """A client whose AdminGetUser fails with a given botocore error."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def admin_get_user(self, **kwargs: Any) -> Any:
        raise self.error


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} happened"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "AdminGetUser",
    )


@pytest.fixture
def cognito(aws: MotoServer) -> Any:
    return boto3.client("cognito-idp", endpoint_url=aws.endpoint_url, region_name=REGION)


@pytest.fixture
def pool_id(cognito: Any) -> str:
    pool: str = cognito.create_user_pool(PoolName="users")["UserPool"]["Id"]
    return pool


@pytest.fixture
async def client(aws: MotoServer) -> AsyncIterator[Any]:
    """The worker's own client factory, as the Notifier will open it."""
    settings = Settings.from_env(
        {
            "SMTP_SERVER": "smtp.example.com",
            "EMAIL_FROM": "no-reply@example.com",
            "ALLOWED_BUCKETS": "*",
            "AWS_ENDPOINT_URL": aws.endpoint_url,
            "AWS_REGION": REGION,
        }
    )
    async with aws_client("cognito-idp", settings) as cognito_client:
        yield cognito_client


def add_user(cognito: Any, pool_id: str, username: str, **attributes: str) -> str:
    """Create a user (with an email, verified unless said otherwise); return its `sub`."""
    if "email" in attributes:
        attributes.setdefault("email_verified", "true")
    response = cognito.admin_create_user(
        UserPoolId=pool_id,
        Username=username,
        UserAttributes=[{"Name": k, "Value": v} for k, v in attributes.items()],
        MessageAction="SUPPRESS",
    )
    values = {a["Name"]: a["Value"] for a in response["User"]["Attributes"]}
    sub: str = values["sub"]
    return sub


# --------------------------------------------------------------------------- lookups


async def test_lookup_by_username(cognito: Any, pool_id: str, client: Any) -> None:
    add_user(cognito, pool_id, "maria", email="maria@example.com", name="Maria Silva")
    recipients = CognitoRecipients(client, pool_id)
    assert await recipients.lookup("maria") == Recipient("maria@example.com", "Maria Silva")
    assert recipients.calls == 1


async def test_given_name_when_no_name(cognito: Any, pool_id: str, client: Any) -> None:
    add_user(cognito, pool_id, "joao", email="joao@example.com", given_name="João")
    assert await CognitoRecipients(client, pool_id).lookup("joao") == Recipient(
        "joao@example.com", "João"
    )


async def test_name_wins_over_given_name(cognito: Any, pool_id: str, client: Any) -> None:
    add_user(cognito, pool_id, "ana", email="ana@example.com", name="Ana Souza", given_name="Ana")
    assert (await CognitoRecipients(client, pool_id).lookup("ana")).name == "Ana Souza"


async def test_no_name_at_all(cognito: Any, pool_id: str, client: Any) -> None:
    add_user(cognito, pool_id, "bob", email="bob@example.com")
    assert await CognitoRecipients(client, pool_id).lookup("bob") == Recipient("bob@example.com")


async def test_unsafe_name_falls_back(cognito: Any, pool_id: str, client: Any) -> None:
    """A name goes into the To header: one with a line break is dropped, not a failure."""
    add_user(
        cognito,
        pool_id,
        "eve",
        email="eve@example.com",
        name="Eve\r\nBcc: victim@example.com",
        given_name="Eve",
    )
    assert (await CognitoRecipients(client, pool_id).lookup("eve")).name == "Eve"


async def test_email_is_normalised_like_a_message_address(
    cognito: Any, pool_id: str, client: Any
) -> None:
    add_user(cognito, pool_id, "carla", email="Carla@EXAMPLE.com")
    assert (await CognitoRecipients(client, pool_id).lookup("carla")).email == "Carla@example.com"


async def test_email_as_username_pool_by_sub_and_by_email(cognito: Any, client: Any) -> None:
    """With email as the sign-in name, Cognito's Username is the `sub`; the email is an alias.

    (Real Cognito also takes a local user's `sub` in pools with plain usernames; moto does
    not emulate that, so it is not tested here.)
    """
    pool: str = cognito.create_user_pool(PoolName="by-email", UsernameAttributes=["email"])[
        "UserPool"
    ]["Id"]
    sub = add_user(cognito, pool, "lia@example.com", email="lia@example.com", name="Lia")
    recipients = CognitoRecipients(client, pool)
    assert await recipients.lookup(sub) == Recipient("lia@example.com", "Lia")
    assert await recipients.lookup("lia@example.com") == Recipient("lia@example.com", "Lia")


# --------------------------------------------------------------------------- permanent failures


async def test_user_without_email_is_permanent(cognito: Any, pool_id: str, client: Any) -> None:
    add_user(cognito, pool_id, "nomail", name="No Mail")
    with pytest.raises(RecipientUnknown, match="has no email address") as caught:
        await CognitoRecipients(client, pool_id).lookup("nomail")
    assert caught.value.kind == "recipient_unknown"
    assert not caught.value.transient
    assert isinstance(caught.value, PermanentError)


async def test_unknown_user_is_permanent(pool_id: str, client: Any) -> None:
    with pytest.raises(RecipientUnknown, match="no Cognito user 'ghost'"):
        await CognitoRecipients(client, pool_id).lookup("ghost")


async def test_invalid_email_is_permanent(cognito: Any, pool_id: str, client: Any) -> None:
    add_user(cognito, pool_id, "odd", email="not an address")
    with pytest.raises(RecipientUnknown, match="not one valid address"):
        await CognitoRecipients(client, pool_id).lookup("odd")


async def test_an_unverified_email_is_refused_unless_allowed(
    cognito: Any, pool_id: str, client: Any
) -> None:
    add_user(cognito, pool_id, "fresh", email="fresh@example.com", email_verified="false")
    add_user(cognito, pool_id, "unsaid", email="unsaid@example.com", email_verified="")
    add_user(cognito, pool_id, "checked", email="checked@example.com", email_verified="true")
    strict = CognitoRecipients(client, pool_id)  # the default
    for user in ("fresh", "unsaid"):
        with pytest.raises(RecipientUnverified, match="not verified"):
            await strict.lookup(user)
    assert (await strict.lookup("checked")).email == "checked@example.com"
    lenient = CognitoRecipients(client, pool_id, require_verified_email=False)
    assert (await lenient.lookup("fresh")).email == "fresh@example.com"


@pytest.mark.parametrize("user_id", ["", " maria", "ma ria", "a\nb", "x" * 129])
async def test_malformed_user_id_is_permanent_without_a_call(
    pool_id: str, client: Any, user_id: str
) -> None:
    recipients = CognitoRecipients(client, pool_id)
    with pytest.raises(RecipientUnknown, match="not a valid Cognito user id"):
        await recipients.lookup(user_id)
    assert recipients.calls == 0


# --------------------------------------------------------------------------- transient failures


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("TooManyRequestsException", 400),
        ("ThrottlingException", 400),
        ("InternalErrorException", 500),
        ("ServiceUnavailable", 503),
        ("NotAuthorizedException", 400),
        ("AccessDeniedException", 400),
    ],
)
async def test_throttling_server_and_permission_errors_are_transient(
    code: str, status: int
) -> None:
    recipients = CognitoRecipients(Raising(client_error(code, status)), "us-east-1_abc123")
    with pytest.raises(LookupFailed, match=code) as caught:
        await recipients.lookup("maria")
    assert caught.value.kind == "lookup_failed"
    assert caught.value.transient
    assert isinstance(caught.value, TransientError)


async def test_missing_user_pool_is_transient(client: Any) -> None:
    """A wrong COGNITO_USER_POOL_ID is the deployment's fault: records wait for the fix."""
    with pytest.raises(LookupFailed, match="ResourceNotFoundException"):
        await CognitoRecipients(client, "us-east-1_doesnotexist").lookup("maria")


async def test_unreachable_cognito_is_transient(aws: MotoServer) -> None:
    config = AioConfig(connect_timeout=1, read_timeout=1, retries={"max_attempts": 1})
    async with aioboto3.Session().client(
        "cognito-idp",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region_name=REGION,
        config=config,
    ) as unreachable:
        with pytest.raises(LookupFailed, match="EndpointConnectionError"):
            await CognitoRecipients(unreachable, "us-east-1_abc123").lookup("maria")


async def test_a_bug_is_not_disguised_as_a_lookup_failure() -> None:
    recipients = CognitoRecipients(Raising(KeyError("oops")), "us-east-1_abc123")
    with pytest.raises(KeyError):
        await recipients.lookup("maria")


async def test_transient_failures_are_not_cached(cognito: Any, pool_id: str, client: Any) -> None:
    failing = CognitoRecipients(Raising(client_error("TooManyRequestsException", 400)), pool_id)
    with pytest.raises(LookupFailed):
        await failing.lookup("maria")
    failing._client = client  # Cognito recovered
    add_user(cognito, pool_id, "maria", email="maria@example.com")
    assert (await failing.lookup("maria")).email == "maria@example.com"


# --------------------------------------------------------------------------- caching


async def test_second_lookup_comes_from_the_cache(cognito: Any, pool_id: str, client: Any) -> None:
    add_user(cognito, pool_id, "maria", email="maria@example.com", name="Maria")
    recipients = CognitoRecipients(client, pool_id)
    first = await recipients.lookup("maria")
    cognito.admin_delete_user(UserPoolId=pool_id, Username="maria")
    assert await recipients.lookup("maria") is first
    assert recipients.calls == 1


async def test_cache_expires(cognito: Any, pool_id: str, client: Any) -> None:
    add_user(cognito, pool_id, "maria", email="maria@example.com")
    clock = Clock()
    recipients = CognitoRecipients(client, pool_id, ttl=600, clock=clock)
    await recipients.lookup("maria")
    cognito.admin_update_user_attributes(
        UserPoolId=pool_id,
        Username="maria",
        UserAttributes=[{"Name": "email", "Value": "maria@new.example.com"}],
    )
    clock.now += 599
    assert (await recipients.lookup("maria")).email == "maria@example.com"
    clock.now += 1
    assert (await recipients.lookup("maria")).email == "maria@new.example.com"
    assert recipients.calls == 2


async def test_cache_is_bounded(cognito: Any, pool_id: str, client: Any) -> None:
    for name in ("a1", "a2", "a3"):
        add_user(cognito, pool_id, name, email=f"{name}@example.com")
    recipients = CognitoRecipients(client, pool_id, max_entries=2)
    await recipients.lookup("a1")
    await recipients.lookup("a2")
    await recipients.lookup("a1")  # most recently used
    await recipients.lookup("a3")  # evicts a2
    assert recipients.calls == 3
    await recipients.lookup("a1")
    assert recipients.calls == 3
    await recipients.lookup("a2")
    assert recipients.calls == 4


async def test_failures_are_not_cached(cognito: Any, pool_id: str, client: Any) -> None:
    recipients = CognitoRecipients(client, pool_id)
    with pytest.raises(RecipientUnknown):
        await recipients.lookup("late")
    add_user(cognito, pool_id, "late", email="late@example.com")
    assert (await recipients.lookup("late")).email == "late@example.com"
    assert recipients.calls == 2


# --------------------------------------------------------------------------- concurrency


async def test_concurrent_lookups_make_one_call(cognito: Any, pool_id: str, client: Any) -> None:
    add_user(cognito, pool_id, "maria", email="maria@example.com", name="Maria")
    recipients = CognitoRecipients(client, pool_id)
    results = await asyncio.gather(*(recipients.lookup("maria") for _ in range(100)))
    assert all(r == Recipient("maria@example.com", "Maria") for r in results)
    assert recipients.calls == 1


async def test_concurrent_lookups_of_an_unknown_user_make_one_call(
    pool_id: str, client: Any
) -> None:
    recipients = CognitoRecipients(client, pool_id)
    results = await asyncio.gather(
        *(recipients.lookup("ghost") for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, RecipientUnknown) for r in results)
    assert len({id(r) for r in results}) == 20  # one exception per caller
    assert recipients.calls == 1


async def test_one_cancelled_caller_does_not_cancel_the_others(
    cognito: Any, pool_id: str, client: Any
) -> None:
    add_user(cognito, pool_id, "maria", email="maria@example.com")
    gate = Gate(client)
    recipients = CognitoRecipients(gate, pool_id)
    first = asyncio.create_task(recipients.lookup("maria"))
    await gate.started.wait()
    others = [asyncio.create_task(recipients.lookup("maria")) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()  # e.g. its record ran into the invocation's deadline
    gate.released.set()
    results = await asyncio.gather(*others)
    assert {r.email for r in results} == {"maria@example.com"}
    assert first.cancelled()
    assert recipients.calls == 1


async def test_different_users_are_looked_up_concurrently(
    cognito: Any, pool_id: str, client: Any
) -> None:
    for i in range(5):
        add_user(cognito, pool_id, f"u{i}", email=f"u{i}@example.com")
    recipients = CognitoRecipients(client, pool_id)
    ids = [f"u{i % 5}" for i in range(50)]
    results = await asyncio.gather(*(recipients.lookup(i) for i in ids))
    assert [r.email for r in results] == [f"{i}@example.com" for i in ids]
    assert recipients.calls == 5


def test_invalid_pool_id_is_refused() -> None:
    with pytest.raises(ValueError, match="user pool id"):
        CognitoRecipients(object(), "not a pool")
