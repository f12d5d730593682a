"""Every record's fate, decided in one place: a table over error classes, receive counts
and the settings that bear on it (a dead-letter queue, the retry back-off)."""

from __future__ import annotations

import itertools
import json

import pytest

from async_notifier import errors
from async_notifier.batch.disposition import Policy, backoff_seconds, disposition
from async_notifier.batch.outcome import Ack, DeadLetter, Outcome, Retry
from async_notifier.config import Settings
from async_notifier.errors import (
    BadMessage,
    DeadlineExceeded,
    DeliveryUnknown,
    GroupBlocked,
    InternalError,
    NotifierError,
    ProviderCondition,
    RecipientRejected,
    SmtpUnavailable,
)
from async_notifier.messages import SqsRecord


def record(receive_count: int = 1) -> SqsRecord:
    return SqsRecord.from_event(
        {
            "messageId": "m-1",
            "body": json.dumps({"video_id": "v"}),
            "attributes": {"ApproximateReceiveCount": str(receive_count)},
        }
    )


def failed(error: NotifierError, receive_count: int = 1) -> Outcome:
    return Outcome("m-1", error=error, record=record(receive_count))


def every_error_class() -> list[type[NotifierError]]:
    """Each class a record can fail with: all of `errors.py`'s NotifierError subclasses."""
    found = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, NotifierError)
    ]
    assert len(found) >= 20, "errors.py holds the whole hierarchy"
    return sorted(found, key=lambda cls: cls.__name__)


# Exact delays in the tables: the jitter has tests of its own below.
WITH_DLQ = Policy(dead_letter_queue=True, backoff=True, jitter=False)
NO_DLQ = Policy(dead_letter_queue=False, backoff=True, jitter=False)
NO_BACKOFF = Policy(dead_letter_queue=True, backoff=False, jitter=False)
NEITHER = Policy(dead_letter_queue=False, backoff=False, jitter=False)


@pytest.mark.parametrize(
    ("error", "receive_count", "policy", "fate"),
    [
        (BadMessage("not JSON"), 1, WITH_DLQ, DeadLetter("bad_message: not JSON")),
        (BadMessage("not JSON"), 3, NO_DLQ, Retry(120)),
        (BadMessage("not JSON"), 3, NEITHER, Retry(None)),
        (RecipientRejected("550"), 2, NO_BACKOFF, DeadLetter("smtp_rejected: 550")),
        (SmtpUnavailable("421"), 1, WITH_DLQ, Retry(30)),
        (SmtpUnavailable("421"), 5, WITH_DLQ, Retry(300)),
        (SmtpUnavailable("421"), 60, WITH_DLQ, Retry(300)),
        (SmtpUnavailable("421"), 4, NO_BACKOFF, Retry(None)),
        (DeliveryUnknown("lost"), 1, WITH_DLQ, Retry(30)),
        (DeadlineExceeded("late"), 2, WITH_DLQ, Retry(60)),
        (GroupBlocked("earlier"), 1, WITH_DLQ, Retry(30)),
        (InternalError("KeyError"), 1, WITH_DLQ, Retry(30)),
    ],
)
def test_the_fate_table(
    error: NotifierError, receive_count: int, policy: Policy, fate: object
) -> None:
    assert disposition(failed(error, receive_count), policy) == fate


@pytest.mark.parametrize(
    ("cls", "policy", "receive_count"),
    list(
        itertools.product(
            every_error_class(), [WITH_DLQ, NO_DLQ, NO_BACKOFF, NEITHER], [1, 2, 7, 1000]
        )
    ),
)
def test_every_error_class_under_every_setting(
    cls: type[NotifierError], policy: Policy, receive_count: int
) -> None:
    """Retrying is for what can get better; a dead-letter queue only for what cannot."""
    error = cls("reason")
    fate = disposition(failed(error, receive_count), policy)
    if not error.transient and policy.dead_letter_queue:
        assert fate == DeadLetter(f"{error.kind}: reason")
    elif policy.backoff and isinstance(error, ProviderCondition):
        assert fate == Retry(1)  # held: back when the pool tries again (retry_after 0 here)
    elif policy.backoff:
        assert fate == Retry(backoff_seconds(receive_count))
    else:
        assert fate == Retry(None)
    # A dead letter that did not arrive stays in the queue as a retry, never acknowledged.
    fallback = disposition(failed(error, receive_count), policy, dead_letter_failed=True)
    assert isinstance(fallback, Retry)


def test_a_delivered_record_is_acknowledged_whatever_the_settings() -> None:
    for policy in (WITH_DLQ, NO_DLQ, NO_BACKOFF, NEITHER):
        for action in ("sent", "sent_link", "duplicate", "already_delivered"):
            assert disposition(Outcome("m-1", action=action), policy) == Ack()  # type: ignore[arg-type]


def test_a_failure_without_an_sqs_record_can_only_be_reported() -> None:
    """Not even a record (no messageId, not an object): nothing to copy or to delay."""
    outcome = Outcome("", error=BadMessage("record is not an object"))
    assert disposition(outcome, WITH_DLQ) == Retry(None)


def test_the_policy_comes_from_the_settings() -> None:
    base = {"SMTP_SERVER": "smtp.test", "EMAIL_FROM": "a@example.com", "ALLOWED_BUCKETS": "*"}
    assert Policy.from_settings(Settings.from_env(base)) == Policy(dead_letter_queue=False)
    with_dlq = {
        **base,
        "DEAD_LETTER_QUEUE_URL": "https://sqs/1/dlq",
        "RETRY_BACKOFF": "false",
        "MAX_DELIVERY_AGE": "3600",
        "RETRY_BACKOFF_BASE_SECONDS": "5",
        "RETRY_BACKOFF_CAP_SECONDS": "60",
    }
    assert Policy.from_settings(Settings.from_env(with_dlq)) == Policy(
        dead_letter_queue=True, backoff=False, base=5, cap=60, max_age=3600
    )


@pytest.mark.parametrize(
    ("receive_count", "seconds"),
    [(0, 30), (1, 30), (2, 60), (3, 120), (4, 240), (5, 300), (10, 300), (10_000, 300)],
)
def test_backoff_doubles_per_receive_and_is_capped(receive_count: int, seconds: int) -> None:
    assert backoff_seconds(receive_count) == seconds


def test_backoff_with_custom_base_and_cap() -> None:
    assert backoff_seconds(4, base=5, cap=1000) == 40
    assert backoff_seconds(4, base=5, cap=30) == 30


# --------------------------------------------------------------------------- retry by age


def aged(error: NotifierError, age: float, receive_count: int = 3) -> tuple[Outcome, float]:
    """A failed outcome whose message SQS received `age` seconds before the returned now."""
    now = 1_800_000_000.0
    raw = {
        "messageId": "m-1",
        "body": json.dumps({"video_id": "v"}),
        "attributes": {
            "ApproximateReceiveCount": str(receive_count),
            "SentTimestamp": str(int((now - age) * 1000)),
        },
    }
    return Outcome("m-1", error=error, record=SqsRecord.from_event(raw)), now


def test_a_transient_failure_is_retried_until_the_notification_is_too_old() -> None:
    policy = Policy(dead_letter_queue=True, max_age=3600, jitter=False)
    young, now = aged(SmtpUnavailable("421 try later"), age=3599, receive_count=40)
    assert disposition(young, policy, now=now) == Retry(300)  # 40 receives: no matter
    old, now = aged(SmtpUnavailable("421 try later"), age=3600, receive_count=2)
    fate = disposition(old, policy, now=now)
    assert isinstance(fate, DeadLetter)
    assert isinstance(fate.error, errors.Expired)
    assert fate.reason.startswith("expired: not delivered within MAX_DELIVERY_AGE (3600 s")
    assert "last error smtp_unavailable: 421 try later" in fate.reason
    # Its dead letter did not arrive: it stays in the queue, to expire again next time.
    assert isinstance(disposition(old, policy, now=now, dead_letter_failed=True), Retry)


def test_an_old_record_without_a_dead_letter_queue_is_left_to_the_redrive_policy() -> None:
    old, now = aged(SmtpUnavailable("421"), age=10**6)
    assert disposition(old, Policy(dead_letter_queue=False, jitter=False), now=now) == Retry(120)


def test_a_record_without_sent_timestamp_never_expires() -> None:
    fate = disposition(failed(SmtpUnavailable("421"), 1000), WITH_DLQ, now=10**12)
    assert fate == Retry(300)


def test_permanent_failures_are_dead_lettered_at_once_whatever_their_age() -> None:
    outcome, now = aged(RecipientRejected("550 no such user"), age=10)
    fate = disposition(outcome, Policy(dead_letter_queue=True), now=now)
    assert fate == DeadLetter("smtp_rejected: 550 no such user")


def test_the_backoff_is_jittered_between_half_its_step_and_its_step() -> None:
    policy = Policy(base=30, cap=300)
    for receive_count, step in ((1, 30), (3, 120), (9, 300)):
        delays = {policy.delay(receive_count) for _ in range(300)}
        assert min(delays) >= step // 2
        assert max(delays) <= step
        assert len(delays) > 5  # spread, not one value


def test_a_held_record_comes_back_when_the_pool_tries_again_spread_within_the_cap() -> None:
    policy = Policy(cap=300)
    held = errors.DailyQuotaExceeded("454 daily quota", retry_after=40.2)
    delays = {policy.hold(held) for _ in range(300)}
    assert min(delays) >= 41
    assert max(delays) <= 62
    assert len(delays) > 5
    long_hold = errors.CircuitOpen("down", retry_after=3600)
    assert policy.hold(long_hold) == 300
    fate = disposition(failed(held, receive_count=7), Policy(dead_letter_queue=True, jitter=False))
    assert fate == Retry(41)  # not the receive count's back-off: the condition's
