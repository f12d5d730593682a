"""A fleet against one provider account, in scaled time: pacing, outages, retry by age.

Two runner replicas (the batch code Lambda runs) share a moto queue with a redrive policy and
one relay with an account's limits (`bench.relay.ThrottlingRelay`: R messages/s counted at
MAIL FROM, "Daily message quota exceeded" while its quota is spent). The back-off's base and
cap are 1 s and 2 s instead of 30 s and 300 s, so hours of production become seconds here.
No assertion is about time: each is a count the relay or the queues keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest
from conditions import until
from queues import (
    Queues,
    client,
    counts,
    create_queues,
    make_table,
    notification,
    receive_all,
    send,
)
from servers import MotoServer

from async_notifier.config import Settings
from async_notifier.runner import RunnerStats, run
from async_notifier.wiring import build_notifier
from bench.relay import ThrottlingRelay

RATE = 20.0  # the account's messages per second, for the whole fleet
REPLICAS = 2
NOTIFICATIONS = 60
OUTAGE = 3.0  # seconds of "Daily message quota exceeded", from the first refused MAIL


@pytest.fixture
def relay() -> Any:
    with ThrottlingRelay(RATE) as account:
        yield account


IDEMPOTENCY_TABLE = "fleet-idempotency"


@pytest.fixture
def sqs(aws: MotoServer) -> Any:
    make_table(aws.endpoint_url, IDEMPOTENCY_TABLE)
    return client("sqs", aws.endpoint_url)


def fleet_env(relay: ThrottlingRelay, queues: Queues, **extra: str) -> dict[str, str]:
    """Each replica's settings. SQS delivers at least once (a message whose visibility runs
    out on a loaded machine is received again while its first copy is still being sent):
    the idempotency table is what makes the fleet's delivery exactly once, as in production."""
    return {
        "SMTP_SERVER": relay.host,
        "SMTP_PORT": str(relay.port),
        "SMTP_TLS": "none",
        "EMAIL_FROM": "Async Notifier <no-reply@example.com>",
        "ALLOWED_BUCKETS": "*",
        "SMTP_POOL_SIZE": "4",
        "MAX_CONCURRENCY": "16",
        # The account's rate, shared by the fleet: each replica paces at RATE / REPLICAS.
        "SMTP_RATE_LIMIT": str(RATE),
        "FLEET_SIZE": str(REPLICAS),
        # Scaled time: a hold of 1 s doubling to 2 s, a back-off of 1 s doubling to 2 s.
        "SMTP_BREAKER_COOLDOWN_SECONDS": "1",
        "RETRY_BACKOFF_BASE_SECONDS": "1",
        "RETRY_BACKOFF_CAP_SECONDS": "2",
        "RETRY_BASE_DELAY": "0.05",
        "DEAD_LETTER_QUEUE_URL": queues.dlq_url,
        "IDEMPOTENCY_TABLE": IDEMPOTENCY_TABLE,
        **extra,
    }


async def run_fleet(
    env: dict[str, str], queue_url: str, done: Any, *, give_up_after: float = 60.0
) -> list[RunnerStats]:
    """REPLICAS runners on the queue until `done()` (or `give_up_after` s), then stopped."""
    settings = Settings.from_env(env)
    stop = asyncio.Event()

    async def replica() -> RunnerStats:
        async with build_notifier(settings) as notifier:
            return await run(
                settings,
                queue_url,
                notifier=notifier,
                batch_size=10,
                batch_window=0.2,
                wait_time=1,
                stop=stop,
            )

    tasks = [asyncio.create_task(replica()) for _ in range(REPLICAS)]
    deadline = time.monotonic() + give_up_after
    # `done` reads the relay's counters, kept by its own thread: there is no event to await.
    while not done() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    stop.set()
    return list(await asyncio.gather(*tasks))


async def test_a_fleet_delivers_everything_once_through_an_outage_and_the_accounts_rate(
    aws: MotoServer, sqs: Any, relay: ThrottlingRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    queues = create_queues(sqs, visibility_timeout=5, max_receive_count=50, prefix="fleet")
    for i in range(NOTIFICATIONS):
        send(sqs, queues.url, notification(f"v{i}", status="FAILED", email=f"u{i}@example.com"))
    relay.quota_exceeded = True

    async def end_outage() -> tuple[int, int]:
        # OUTAGE seconds from the fleet's first MAIL, however long the replicas take to start.
        await until(lambda: relay.quota_refusals >= 1)
        await asyncio.sleep(OUTAGE)
        relay.quota_exceeded = False
        return relay.mail_commands, relay.rate_refusals

    outage = asyncio.create_task(end_outage())
    stats = await run_fleet(
        fleet_env(relay, queues), queues.url, lambda: len(relay.accepted) >= NOTIFICATIONS
    )
    mail_at_recovery, refusals_at_recovery = await outage

    # Every notification emailed exactly once, none dead-lettered, the queue empty.
    assert len(relay.accepted) == NOTIFICATIONS
    assert set(relay.accepted.values()) == {1}
    assert receive_all(sqs, queues.dlq_url) == []
    assert counts(sqs, queues.url) == dict.fromkeys(counts(sqs, queues.url), 0)
    # Through the outage the fleet held back instead of retrying every record: a refused
    # MAIL per hold and replica, not one per record and attempt.
    assert 1 <= relay.quota_refusals <= 12
    assert sum(s.paused for s in stats) >= 1  # the runners stopped receiving meanwhile
    # Once the account accepted again, the fleet paced to its rate: few "slow down" replies.
    sends = relay.mail_commands - mail_at_recovery
    slow_down = relay.rate_refusals - refusals_at_recovery
    assert sends >= NOTIFICATIONS
    assert slow_down <= 0.03 * sends, (slow_down, sends)


async def test_a_fleet_with_a_misjudged_share_settles_under_the_accounts_rate(
    aws: MotoServer, sqs: Any, relay: ThrottlingRelay
) -> None:
    """Each replica believes it is alone (FLEET_SIZE=1): together they offer twice the
    account's rate. AIMD halves each one's pace on "Maximum sending rate exceeded", so the
    fleet settles just under the rate instead of a quarter of its sends being refused."""
    queues = create_queues(sqs, visibility_timeout=5, max_receive_count=50, prefix="fleet")
    for i in range(NOTIFICATIONS * 2):
        send(sqs, queues.url, notification(f"v{i}", status="FAILED", email=f"u{i}@example.com"))
    await run_fleet(
        fleet_env(relay, queues, FLEET_SIZE="1"),
        queues.url,
        lambda: len(relay.accepted) >= NOTIFICATIONS * 2,
    )
    assert len(relay.accepted) == NOTIFICATIONS * 2
    assert set(relay.accepted.values()) == {1}
    assert receive_all(sqs, queues.dlq_url) == []
    assert relay.rate_refusals <= 0.15 * relay.mail_commands, (
        relay.rate_refusals,
        relay.mail_commands,
    )


async def test_a_notification_older_than_max_delivery_age_is_dead_lettered_as_expired(
    aws: MotoServer, sqs: Any, relay: ThrottlingRelay
) -> None:
    """The age is SQS's SentTimestamp: a record the relay cannot take and that is older than
    MAX_DELIVERY_AGE goes to the dead-letter queue with reason `expired` and its last error;
    a young one goes back to the queue."""
    queues = create_queues(sqs, visibility_timeout=2, max_receive_count=50, prefix="age")
    send(sqs, queues.url, notification("old", status="FAILED", email="old@example.com"))
    send(sqs, queues.url, notification("young", status="FAILED", email="young@example.com"))
    relay.quota_exceeded = True
    messages = sqs.receive_message(
        QueueUrl=queues.url, MaxNumberOfMessages=10, WaitTimeSeconds=1, AttributeNames=["All"]
    )["Messages"]
    assert len(messages) == 2
    records = []
    for message in messages:
        attributes = dict(message["Attributes"])
        if json.loads(message["Body"])["video_id"] == "old":  # sent two hours ago
            attributes["SentTimestamp"] = str(int((time.time() - 7200) * 1000))
        records.append(
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": attributes,
                "messageAttributes": {},
                "eventSource": "aws:sqs",
                "eventSourceARN": queues.arn,
                "awsRegion": "us-east-1",
            }
        )
    settings = Settings.from_env(fleet_env(relay, queues, MAX_DELIVERY_AGE="3600"))
    async with build_notifier(settings) as notifier:
        result = await notifier.process(records)
    assert relay.accepted == {}
    assert [o.error.kind for o in result.dead_lettered if o.error] == ["smtp_daily_quota"]
    assert len(result.failures) == 1  # the young one: back to the queue
    dead = receive_all(sqs, queues.dlq_url)
    assert len(dead) == 1
    attributes = {k: v["StringValue"] for k, v in dead[0]["MessageAttributes"].items()}
    assert attributes["error_class"] == "expired"
    assert "MAX_DELIVERY_AGE (3600 s" in attributes["error_reason"]
    assert "last error smtp_daily_quota" in attributes["error_reason"]
    assert json.loads(dead[0]["Body"])["video_id"] == "old"
    with contextlib.suppress(Exception):
        sqs.delete_queue(QueueUrl=queues.url)
