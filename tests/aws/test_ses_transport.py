"""The SES v2 API transport: moto's SES, a peer speaking SES's wire format, the fault proxy.

moto keeps what it was sent (its /moto-api/data.json), so the bytes SES received are compared
with what SMTP would send; it neither throttles nor keeps tags, so `SesApi` (tests/support)
answers SES's error codes and records requests on the wire.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aioboto3
import pytest
from aiobotocore.config import AioConfig
from faults import S3Action, S3FaultProxy, S3Rule
from mime_reference import SENDER, notification, write_file
from servers import REGION, MotoServer, free_port
from ses_api import SesAnswer, SesApi, SesRequest, request_path_is_send_email

from async_notifier.account.limits import SendLimits
from async_notifier.aws.clients import aws_client
from async_notifier.aws.ses_transport import (
    SES_MAX_MESSAGE_BYTES,
    ByteBudget,
    SesTransport,
    request_footprint,
)
from async_notifier.config import Settings
from async_notifier.errors import (
    AccountPaused,
    AttachmentUnreadable,
    DailyQuotaExceeded,
    DeliveryUnknown,
    NotifierError,
    ProviderMisconfigured,
    SenderRejected,
    SesRejected,
    SesThrottled,
    SesUnavailable,
)
from async_notifier.local.ses_outbox import SentMessage, sent_messages
from async_notifier.mail.mime import StreamedEmail, attachment_filename, build_streamed_email
from async_notifier.mail.render import Renderer
from async_notifier.ports import PoolStats, Receipt

FROM = SENDER.addr_spec  # no-reply@example.com
RECIPIENT = "maria@example.com"


def settings(endpoint_url: str, **extra: str) -> Settings:
    return Settings.from_env(
        {
            "SMTP_SERVER": "email-smtp.us-east-1.amazonaws.com",
            "SMTP_RATE_LIMIT": "none",  # no pacing: the tests count, they do not wait
            "EMAIL_FROM": FROM,
            "ALLOWED_BUCKETS": "*",
            "AWS_ENDPOINT_URL": endpoint_url,
            "AWS_REGION": REGION,
            **extra,
        }
    )


def one_attempt_client(endpoint_url: str, read_timeout: float = 30.0, attempts: int = 1) -> Any:
    """A sesv2 client with `attempts` tries in all (botocore's standard mode)."""
    config = AioConfig(
        connect_timeout=2,
        read_timeout=read_timeout,
        retries={"total_max_attempts": attempts, "mode": "standard"},
    )
    return aioboto3.Session().client(
        "sesv2",
        endpoint_url=endpoint_url,
        region_name=REGION,
        config=config,
        aws_access_key_id="testing",  # never real ones: the peer is local
        aws_secret_access_key="testing",
    )


def transport(client: Any, s: Settings, **kwargs: Any) -> SesTransport:
    return SesTransport(client, s, limits=SendLimits(s), **kwargs)


def build(
    renderer: Renderer, tmp_path: Path, size: int | None = 100_000, **fields: Any
) -> StreamedEmail:
    """The email the delivery builds: a ZIP attached when `size` is given."""
    n = notification(locale="en", **fields)
    path = None
    if size is not None:
        path = write_file(tmp_path / f"frames-{size}-{len(list(tmp_path.iterdir()))}.zip", size)
    name = attachment_filename(n) if path is not None else None
    rendered = renderer.render(n, attachment_name=name)
    return build_streamed_email(n, rendered, sender=SENDER, attachment=path, attachment_name=name)


class Reached:
    """A `reached` callback that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def moto_sent(aws: MotoServer) -> list[SentMessage]:
    """The raw messages moto's SES kept (`local/ses_outbox.py`: its model data)."""
    return sent_messages(aws.endpoint_url)


async def verify_sender(aws: MotoServer) -> None:
    async with aws_client("ses", settings(aws.endpoint_url)) as ses:
        await ses.verify_email_identity(EmailAddress=FROM)


# --------------------------------------------------------------------------- moto


async def test_moto_receives_the_bytes_smtp_would_send(
    aws: MotoServer, renderer: Renderer, tmp_path: Path
) -> None:
    await verify_sender(aws)
    email = build(renderer, tmp_path, size=300_001)
    reached = Reached()
    s = settings(aws.endpoint_url)
    async with aws_client("sesv2", s) as client:
        ses = transport(client, s)
        ses.start_batch(4)
        receipt = await ses.deliver(email, reached=reached)
        stats = await ses.finish_batch()

    [sent] = moto_sent(aws)
    assert receipt == Receipt("ses", sent.message_id)
    assert sent.raw.isascii()
    assert sent.raw == email.as_bytes()  # byte-identical, no tag header
    assert sent.source == FROM
    assert RECIPIENT in sent.destinations
    assert reached.calls == 1
    assert stats == PoolStats()
    assert ses.held() is None


async def test_an_unverified_sender_at_moto_is_refused_and_held_for_every_message(
    aws: MotoServer, renderer: Renderer, tmp_path: Path
) -> None:
    email = build(renderer, tmp_path, size=None)
    s = settings(aws.endpoint_url)
    async with one_attempt_client(aws.endpoint_url) as client:
        ses = transport(client, s)
        with pytest.raises(SenderRejected, match="MessageRejected") as caught:
            await ses.deliver(email)
        assert FROM not in caught.value.reason  # addresses are hashed in reasons
        held = ses.held()
        assert isinstance(held, SenderRejected)
        assert held.retry_after > 0
        reached = Reached()
        with pytest.raises(SenderRejected):  # held: not even tried
            await ses.deliver(email, reached=reached)
    assert reached.calls == 0
    assert moto_sent(aws) == []


# --------------------------------------------------------------------------- on the wire


async def test_tags_and_configuration_set_go_beside_the_message(
    renderer: Renderer, tmp_path: Path
) -> None:
    email = build(renderer, tmp_path, notification_id="n/42 é", status="FAILED", size=1000)
    async with SesApi() as api, one_attempt_client(api.endpoint_url) as client:
        s = settings(api.endpoint_url, SES_CONFIGURATION_SET="frames-events")
        receipt = await transport(client, s).deliver(email)

    [request] = api.requests
    assert request_path_is_send_email(request.path)
    assert request.body["FromEmailAddress"] == FROM
    assert request.body["Destination"] == {"ToAddresses": [RECIPIENT]}
    assert request.body["ConfigurationSetName"] == "frames-events"
    assert request.body["EmailTags"] == [
        {"Name": "video_id", "Value": "298ce197-3627-4845-83d7-cd6c98a9df8c"},
        {"Name": "status", "Value": "FAILED"},
        {"Name": "tracking_id", "Value": dict(email.tags)["tracking_id"]},
        {"Name": "notification_id", "Value": "n_42__"},
    ]
    assert request.raw == email.as_bytes()
    assert receipt.transport == "ses"
    assert receipt.provider_id
    assert receipt.provider_id.startswith("ses-")


async def test_without_a_configuration_set_none_is_named(
    renderer: Renderer, tmp_path: Path
) -> None:
    email = build(renderer, tmp_path, size=None)
    async with SesApi() as api, one_attempt_client(api.endpoint_url) as client:
        await transport(client, settings(api.endpoint_url)).deliver(email)
    [request] = api.requests
    assert "ConfigurationSetName" not in request.body
    assert [tag["Name"] for tag in request.body["EmailTags"]] == [
        "video_id",
        "status",
        "tracking_id",
    ]


UNVERIFIED = (
    "Email address is not verified. The following identities failed the check in region "
    "US-EAST-1: {}"
)

ERROR_ROWS = [
    (429, "TooManyRequestsException", "Too many requests", SesThrottled, None),
    (400, "Throttling", "Maximum sending rate exceeded.", SesThrottled, None),
    (400, "ThrottlingException", "Rate exceeded", SesThrottled, None),
    (400, "Throttling", "Daily message quota exceeded.", DailyQuotaExceeded, "daily_quota"),
    (400, "LimitExceededException", "Daily quota exceeded", DailyQuotaExceeded, "daily_quota"),
    (400, "AccountSuspendedException", "Account suspended", AccountPaused, "account_paused"),
    (400, "SendingPausedException", "Sending paused", AccountPaused, "account_paused"),
    (400, "MailFromDomainNotVerifiedException", "no", SenderRejected, "sender_rejected"),
    (400, "MessageRejected", UNVERIFIED.format(FROM), SenderRejected, "sender_rejected"),
    (400, "MessageRejected", UNVERIFIED.format("example.com"), SenderRejected, "sender_rejected"),
    (400, "MessageRejected", UNVERIFIED.format(RECIPIENT), SesRejected, None),
    (400, "MessageRejected", "Illegal header 'X'.", SesRejected, None),
    (400, "BadRequestException", "Invalid raw message", SesRejected, None),
    (
        404,
        "NotFoundException",
        "Configuration set <x> does not exist.",
        ProviderMisconfigured,
        "misconfigured",
    ),
    (
        403,
        "AccessDeniedException",
        "not authorized to perform: ses:SendEmail",
        ProviderMisconfigured,
        "misconfigured",
    ),
    (500, "InternalFailure", "internal", SesUnavailable, None),
    (503, "ServiceUnavailable", "unavailable", SesUnavailable, None),
    (400, "SomethingNewException", "?", SesUnavailable, None),
]


@pytest.mark.parametrize(("status", "code", "message", "expected", "condition"), ERROR_ROWS)
async def test_every_ses_error_is_mapped(
    renderer: Renderer,
    tmp_path: Path,
    status: int,
    code: str,
    message: str,
    expected: type[NotifierError],
    condition: str | None,
) -> None:
    email = build(renderer, tmp_path, size=None)
    reached = Reached()
    answer = SesAnswer(status=status, code=code, message=message)
    async with SesApi(answer) as api, one_attempt_client(api.endpoint_url) as client:
        ses = transport(client, settings(api.endpoint_url))
        ses.start_batch(1)
        with pytest.raises(NotifierError) as caught:
            await ses.deliver(email, reached=reached)
        stats = await ses.finish_batch()

    assert type(caught.value) is expected
    assert code in caught.value.reason
    assert RECIPIENT not in caught.value.reason
    assert FROM not in caught.value.reason
    assert reached.calls == 1
    assert len(api.requests) == 1
    held = ses.held()
    assert (held.condition if held else None) == condition
    throttled = expected is SesThrottled
    assert stats.throttled == ses.limits.throttled_replies == int(throttled)


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (S3Action.INTERNAL_ERROR, SesUnavailable),  # 500, not SES's document: no code to read
        (S3Action.SLOW_DOWN, SesUnavailable),  # 503
        (S3Action.DROP, DeliveryUnknown),  # the request went out; the connection reset
    ],
)
async def test_faults_in_front_of_moto(
    aws: MotoServer,
    s3_proxy: S3FaultProxy,
    renderer: Renderer,
    tmp_path: Path,
    action: S3Action,
    expected: type[NotifierError],
) -> None:
    await verify_sender(aws)
    s3_proxy.set_rules(S3Rule(action))
    reached = Reached()
    async with one_attempt_client(s3_proxy.endpoint_url) as client:
        ses = transport(client, settings(s3_proxy.endpoint_url))
        with pytest.raises(NotifierError) as caught:
            await ses.deliver(build(renderer, tmp_path, size=None), reached=reached)
    assert type(caught.value) is expected
    assert s3_proxy.counts[action] == 1
    assert reached.calls == 1
    assert moto_sent(aws) == []


async def test_a_stall_after_the_request_went_out_is_delivery_unknown(
    s3_proxy: S3FaultProxy, renderer: Renderer, tmp_path: Path
) -> None:
    s3_proxy.set_rules(S3Rule(S3Action.STALL))
    reached = Reached()
    async with one_attempt_client(s3_proxy.endpoint_url) as client:
        ses = transport(client, settings(s3_proxy.endpoint_url), timeout=0.5)
        with pytest.raises(DeliveryUnknown, match=r"no answer within 0\.5 s"):
            await ses.deliver(build(renderer, tmp_path, size=None), reached=reached)
    assert reached.calls == 1
    assert s3_proxy.counts[S3Action.STALL] == 1


async def test_a_refused_connection_is_unavailable_and_nothing_was_sent(
    renderer: Renderer, tmp_path: Path
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    async with one_attempt_client(endpoint) as client:
        ses = transport(client, settings(endpoint))
        with pytest.raises(SesUnavailable, match=r"EndpointConnectionError.*nothing was sent"):
            await ses.deliver(build(renderer, tmp_path, size=None))
    assert ses.held() is None


async def test_botocore_never_resends_after_an_attempt_without_an_answer(
    aws: MotoServer, s3_proxy: S3FaultProxy, renderer: Renderer, tmp_path: Path
) -> None:
    """Three attempts allowed: the first times out after the request went out, so a second
    could deliver the email twice; the transport stops botocore from sending it."""
    await verify_sender(aws)
    s3_proxy.set_rules(S3Rule(S3Action.STALL, times=1))
    async with one_attempt_client(s3_proxy.endpoint_url, read_timeout=0.5, attempts=3) as client:
        ses = transport(client, settings(s3_proxy.endpoint_url))
        lost = r"no answer after the request went out \(ReadTimeoutError\)"
        with pytest.raises(DeliveryUnknown, match=lost):
            await ses.deliver(build(renderer, tmp_path, size=None))
    assert s3_proxy.request_count == 1
    assert moto_sent(aws) == []


async def test_botocore_retries_an_answered_failure(
    aws: MotoServer, s3_proxy: S3FaultProxy, renderer: Renderer, tmp_path: Path
) -> None:
    """A 500 is an answer: nothing was taken, so botocore's second attempt is safe."""
    await verify_sender(aws)
    s3_proxy.set_rules(S3Rule(S3Action.INTERNAL_ERROR, times=1))
    reached = Reached()
    async with one_attempt_client(s3_proxy.endpoint_url, attempts=3) as client:
        ses = transport(client, settings(s3_proxy.endpoint_url))
        receipt = await ses.deliver(build(renderer, tmp_path, size=None), reached=reached)
    [sent] = moto_sent(aws)
    assert receipt.provider_id == sent.message_id
    assert s3_proxy.request_count == 2
    assert reached.calls == 1


# --------------------------------------------------------------------------- before the request


async def test_a_held_condition_refuses_before_anything_is_read_or_sent(
    renderer: Renderer, tmp_path: Path
) -> None:
    email = build(renderer, tmp_path, size=1000)
    async with SesApi() as api, one_attempt_client(api.endpoint_url) as client:
        ses = transport(client, settings(api.endpoint_url))
        ses.limits.trip(AccountPaused("paused"), hold=60)
        email.attachment.unlink()  # type: ignore[union-attr]  # would fail if it were read
        with pytest.raises(AccountPaused):
            await ses.deliver(email)
    assert api.requests == []


async def test_an_unreadable_attachment_sends_nothing(renderer: Renderer, tmp_path: Path) -> None:
    email = build(renderer, tmp_path, size=1000)
    assert email.attachment is not None
    email.attachment.write_bytes(b"shorter")
    reached = Reached()
    async with SesApi() as api, one_attempt_client(api.endpoint_url) as client:
        ses = transport(client, settings(api.endpoint_url))
        with pytest.raises(AttachmentUnreadable):
            await ses.deliver(email, reached=reached)
        assert ses.budget.held == 0
    assert api.requests == []
    assert reached.calls == 0


async def test_limits_and_life(renderer: Renderer, tmp_path: Path) -> None:
    async with SesApi() as api, one_attempt_client(api.endpoint_url) as client:
        ses = transport(client, settings(api.endpoint_url))
        assert ses.name == "ses"
        assert await ses.server_size_limit() == SES_MAX_MESSAGE_BYTES == 40_000_000
        await ses.refresh_limits()  # a fixed rate: nothing to read, never raises
        await ses.aclose()
        # The client is the caller's: still open, and sends still go through it.
        await transport(client, settings(api.endpoint_url)).deliver(build(renderer, tmp_path, None))
    assert len(api.requests) == 1


@pytest.mark.parametrize("budget", [0, -1])
def test_a_bad_budget_is_refused(budget: int) -> None:
    with pytest.raises(ValueError, match="budget"):
        ByteBudget(budget)


# --------------------------------------------------------------------------- the byte budget


async def test_the_byte_budget_bounds_the_requests_in_flight(
    renderer: Renderer, tmp_path: Path
) -> None:
    """Twelve messages, a budget for three: the peer holds every request until three are in
    flight, and never sees more; then a message larger than the whole budget goes alone."""
    small = [build(renderer, tmp_path, size=200_000 + i) for i in range(12)]
    one = max(request_footprint(e.size) for e in small)
    capacity = 3 * one
    big = build(renderer, tmp_path, size=capacity)  # its footprint is ~6.3 budgets
    assert request_footprint(big.size) > capacity
    snapshots: list[list[int]] = []

    def answer(request: SesRequest) -> SesAnswer:
        snapshots.append([request_footprint(len(r.raw)) for r in [*api.in_flight, request]])
        return SesAnswer()

    async with SesApi(answer) as api, one_attempt_client(api.endpoint_url) as client:
        api.gate = asyncio.Event()
        ses = transport(client, settings(api.endpoint_url), max_inflight_bytes=capacity)
        sends = [asyncio.create_task(ses.deliver(e)) for e in small]
        async with asyncio.timeout(30):
            await api.wait_in_flight(3)
        assert ses.budget.held <= capacity
        api.gate.set()
        await asyncio.gather(*sends)
        assert api.peak_in_flight == 3
        assert all(sum(s) <= capacity for s in snapshots)
        snapshots.clear()
        mixed = [small[0], big, small[1], small[2]]
        await asyncio.gather(*(ses.deliver(e) for e in mixed))
        assert ses.budget.held == 0

    big_footprint = request_footprint(big.size)
    assert len(snapshots) == 4
    for snapshot in snapshots:
        assert sum(snapshot) <= capacity or snapshot == [big_footprint]
    assert [big_footprint] in snapshots


async def test_the_budget_is_first_come_first_served_and_cancel_safe() -> None:
    budget = ByteBudget(10)
    order: list[str] = []

    async def take(name: str, size: int, release: asyncio.Event) -> None:
        async with budget.hold(size):
            order.append(name)
            await release.wait()

    gates = {name: asyncio.Event() for name in "abcd"}
    a = asyncio.create_task(take("a", 6, gates["a"]))
    await asyncio.sleep(0)
    b = asyncio.create_task(take("b", 20, gates["b"]))  # larger than it all: waits to be alone
    c = asyncio.create_task(take("c", 2, gates["c"]))  # would fit, but b came first
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == ["a"]
    assert budget.held == 6
    b.cancel()  # b leaves the queue: c fits beside a
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == ["a", "c"]
    assert budget.held == 8
    d = asyncio.create_task(take("d", 20, gates["d"]))
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == ["a", "c"]
    gates["a"].set()
    gates["c"].set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert order == ["a", "c", "d"]
    assert budget.held == 20
    gates["d"].set()
    await asyncio.gather(a, c, d)
    with pytest.raises(asyncio.CancelledError):
        await b
    assert budget.held == 0


async def test_a_waiter_cancelled_as_its_turn_comes_gives_the_bytes_back() -> None:
    budget = ByteBudget(10)
    await budget.acquire(10)
    waiter = asyncio.create_task(budget.acquire(5))
    await asyncio.sleep(0)
    budget.release(10)  # grants the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.held == 0
