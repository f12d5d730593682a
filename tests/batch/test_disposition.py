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


WITH_DLQ = Policy(dead_letter_queue=True, backoff=True)
NO_DLQ = Policy(dead_letter_queue=False, backoff=True)
NO_BACKOFF = Policy(dead_letter_queue=True, backoff=False)
NEITHER = Policy(dead_letter_queue=False, backoff=False)


@pytest.mark.parametrize(
    ("error", "receive_count", "policy", "fate"),
    [
        (BadMessage("not JSON"), 1, WITH_DLQ, DeadLetter("bad_message: not JSON")),
        (BadMessage("not JSON"), 3, NO_DLQ, Retry(120)),
        (BadMessage("not JSON"), 3, NEITHER, Retry(None)),
        (RecipientRejected("550"), 2, NO_BACKOFF, DeadLetter("smtp_rejected: 550")),
        (SmtpUnavailable("421"), 1, WITH_DLQ, Retry(30)),
        (SmtpUnavailable("421"), 6, WITH_DLQ, Retry(900)),
        (SmtpUnavailable("421"), 60, WITH_DLQ, Retry(900)),
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
    assert Policy.from_settings(Settings.from_env(base)) == NO_DLQ
    with_dlq = {**base, "DEAD_LETTER_QUEUE_URL": "https://sqs/1/dlq", "RETRY_BACKOFF": "false"}
    assert Policy.from_settings(Settings.from_env(with_dlq)) == NO_BACKOFF


@pytest.mark.parametrize(
    ("receive_count", "seconds"),
    [(0, 30), (1, 30), (2, 60), (3, 120), (5, 480), (6, 900), (10, 900), (10_000, 900)],
)
def test_backoff_doubles_per_receive_and_is_capped(receive_count: int, seconds: int) -> None:
    assert backoff_seconds(receive_count) == seconds


def test_backoff_with_custom_base_and_cap() -> None:
    assert backoff_seconds(4, base=5, cap=1000) == 40
    assert backoff_seconds(4, base=5, cap=30) == 30
