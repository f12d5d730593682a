"""The batch report: a real BatchResult's EMF metric lines, valid documents (checked against
the spec's rules in support/emf.py), counted per outcome and per error class."""

from __future__ import annotations

import io
import re

import pytest
from emf import directive_of, parse_lines, units_of

from async_notifier.batch.outcome import Action, BatchResult, DeadLetter, Outcome, Retry
from async_notifier.batch.report import metrics_from_batch
from async_notifier.errors import (
    BadMessage,
    DailyQuotaExceeded,
    DownloadFailed,
    Expired,
    InternalError,
    NotifierError,
    RecipientSuppressed,
    RecipientUnverified,
    SenderRejected,
    SmtpUnavailable,
)
from async_notifier.logs import configure, request_id
from async_notifier.ports import PoolStats, Receipt

NAMESPACE = "AsyncNotifier"


def outcome(
    message_id: str,
    *,
    error: NotifierError | None = None,
    action: Action = "sent",
    size: int = 0,
    retries: int = 0,
) -> Outcome:
    return Outcome(
        message_id,
        error=error,
        action=None if error else action,
        video_id=f"v-{message_id}",
        status="COMPLETED",
        bytes=size,
        retries=retries,
        duration=0.01,
    )


@pytest.fixture
def batch() -> BatchResult:
    result = BatchResult.of(
        [
            outcome("1", size=1_000),
            outcome("2", size=500, retries=2),
            outcome("3", action="sent_link", size=30_000_000),
            outcome("4", action="duplicate"),
            outcome("5", action="already_delivered"),
            outcome("6", error=BadMessage("not JSON")),
            outcome("7", error=BadMessage("no email")),
            # A failed record has no action: never counted as sent.
            outcome("8", error=DownloadFailed("reset"), size=4_096, retries=3),
            outcome("9", error=SmtpUnavailable("421")),
            outcome("10", error=InternalError("KeyError: 'x'"), retries=1),
            outcome("11", error=RecipientUnverified("Cognito user 'u1' has not verified")),
            outcome("12", error=RecipientSuppressed("addr-0123456789 is suppressed")),
        ]
    )
    # Settled: the permanent failures went to the dead-letter queue, the rest are retried.
    result.fates = [
        DeadLetter(o.error.kind if o.error else "")
        if o.message_id in ("6", "7", "11", "12")
        else Retry(30)
        for o in result.errors
    ]
    return result


def test_batch_metrics(batch: BatchResult) -> None:
    metrics = metrics_from_batch(
        batch,
        duration_s=1.2345,
        pool=PoolStats(connections_opened=3, circuit_opened=1),
        namespace=NAMESPACE,
        function_name="notifier-prod",
    )
    out = io.StringIO()
    text = metrics.emit(out)
    assert out.getvalue() == text
    documents = parse_lines(text)
    main, *by_class = documents

    assert directive_of(main)["Namespace"] == NAMESPACE
    assert directive_of(main)["Dimensions"] == [["FunctionName"]]
    assert main["FunctionName"] == "notifier-prod"
    expected = {
        "RecordsReceived": 12,
        "RecordsSent": 3,
        "RecordsFailed": 7,
        "BatchItemFailures": 3,
        "RecordsDeadLettered": 4,
        "RecordsRetried": 3,
        "Retries": 6,
        "BytesAttached": 1_500,
        "LinksSent": 1,
        "Duplicates": 1,
        "AlreadyDelivered": 1,
        "SmtpConnectionsOpened": 3,
        "SmtpCircuitOpened": 1,
        "SmtpThrottled": 0,
        "MessagesAccepted": 0,  # no receipt in this batch's outcomes
        "FallbackMessages": 0,
        "TransportThrottled": 0,
        "TransportUnavailable": 1,
        "RecordsHeld": 0,
        "RecordsExpired": 0,
        "RecipientsUnverified": 1,
        "RecordsSuppressed": 1,
        "InvocationDuration": 1234.5,
    }
    assert {name: main[name] for name in units_of(main)} == expected
    assert units_of(main)["BytesAttached"] == "Bytes"
    assert units_of(main)["InvocationDuration"] == "Milliseconds"
    assert units_of(main)["RecordsSent"] == "Count"

    failed = {}
    for document in by_class:
        directive = directive_of(document)
        assert directive["Dimensions"] == [["FunctionName", "ErrorClass"]]
        assert units_of(document) == {"RecordsFailed": "Count"}
        assert document["FunctionName"] == "notifier-prod"
        failed[document["ErrorClass"]] = document["RecordsFailed"]
    assert failed == {
        "bad_message": 2,
        "download_failed": 1,
        "smtp_unavailable": 1,
        "internal": 1,
        "recipient_unverified": 1,
        "suppressed": 1,
    }
    assert sum(failed.values()) == main["RecordsFailed"]


def test_emit_writes_raw_lines_to_stdout_through_the_package_logs(
    batch: BatchResult, capsys: pytest.CaptureFixture[str]
) -> None:
    """Raw EMF lines on stdout, whatever LOG_LEVEL, not wrapped in the JSON log format: the
    documents themselves, with only Lambda's `level` (the package's: a filter that lets its
    logs through lets the metrics through) and an RFC 3339 `timestamp` in front."""
    logger = configure("ERROR")
    try:
        metrics = metrics_from_batch(batch, duration_s=0.5, namespace=NAMESPACE, function_name=None)
        text = metrics.emit()
        written = parse_lines(capsys.readouterr().out)
    finally:
        for log_handler in list(logger.handlers):
            logger.removeHandler(log_handler)
    assert [list(d)[:3] for d in written] == [["level", "timestamp", "_aws"]] * len(written)
    assert {d.pop("level") for d in written} == {"ERROR"}
    for document in written:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", document.pop("timestamp"))
    assert written == parse_lines(text)
    main, *by_class = parse_lines(text)
    assert directive_of(main)["Dimensions"] == [[]]  # no dimensions: the namespace-wide metric
    assert all(directive_of(d)["Dimensions"] == [["ErrorClass"]] for d in by_class)


def test_all_good_batch_has_no_error_class_lines() -> None:
    result = BatchResult.of([outcome("1", size=10), outcome("2", size=20)])
    text = metrics_from_batch(result, duration_s=0.1, namespace=NAMESPACE, function_name="f").emit(
        io.StringIO()
    )
    (main,) = parse_lines(text)
    assert main["RecordsFailed"] == 0
    assert main["BytesAttached"] == 30
    assert main["RecordsSent"] == 2


def test_request_id_is_a_property(batch: BatchResult) -> None:
    token = request_id.set("c6af9ac6-7b61-11e6-9a41-93e8deadbeef")
    try:
        metrics = metrics_from_batch(batch, duration_s=0.1, namespace=NAMESPACE, function_name="f")
    finally:
        request_id.reset(token)
    for document in parse_lines(metrics.emit(io.StringIO())):
        assert document["request_id"] == "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"
        assert "request_id" not in units_of(document)


def test_held_expired_and_paced_records_are_counted() -> None:
    """Provider-wide conditions by Condition, expired notifications, throttling replies and
    the pace the instance ended at: what the fleet's alarms and dashboard watch."""
    result = BatchResult.of(
        [
            outcome("1", error=DailyQuotaExceeded("454 daily quota")),
            outcome("2", error=DailyQuotaExceeded("454 daily quota")),
            outcome("3", error=SenderRejected("553 sender")),
            outcome("4", error=SmtpUnavailable("421")),
        ]
    )
    result.fates = [Retry(60), Retry(60), Retry(30), DeadLetter("expired", Expired("old"))]
    metrics = metrics_from_batch(
        result,
        duration_s=0.1,
        pool=PoolStats(throttled=4, send_rate=6.5),
        namespace=NAMESPACE,
        function_name="f",
    )
    assert metrics.value("RecordsHeld") == 3
    assert metrics.value("RecordsHeld", {"Condition": "daily_quota"}) == 2
    assert metrics.value("RecordsHeld", {"Condition": "sender_rejected"}) == 1
    assert metrics.value("RecordsHeld", {"Condition": "login_failed"}) is None
    assert metrics.value("RecordsExpired") == 1
    assert metrics.value("SmtpThrottled") == 4
    assert metrics.value("SendRate") == 6.5
    unpaced = metrics_from_batch(result, duration_s=0.1, namespace=NAMESPACE, function_name="f")
    assert unpaced.value("SendRate") is None  # no rate set: nothing to report


def test_messages_accepted_by_transport_and_what_the_fallback_carried() -> None:
    result = BatchResult.of(
        [
            Outcome("1", action="sent", receipt=Receipt("smtp", "q1")),
            Outcome("2", action="sent", receipt=Receipt("ses", "0100-abc")),
            Outcome("3", action="sent_link", receipt=Receipt("ses")),
            Outcome("4", action="duplicate"),  # nothing sent for it
            outcome("5", error=SmtpUnavailable("421")),
            outcome("6", error=DailyQuotaExceeded("454")),  # held, not unavailable
        ]
    )
    result.fates = [Retry(30), Retry(30)]
    metrics = metrics_from_batch(
        result,
        duration_s=0.1,
        pool=PoolStats(throttled=3, fallback_messages=2),
        namespace=NAMESPACE,
        function_name="f",
    )
    assert metrics.value("MessagesAccepted") == 3
    assert metrics.value("MessagesAccepted", {"Transport": "ses"}) == 2
    assert metrics.value("MessagesAccepted", {"Transport": "smtp"}) == 1
    assert metrics.value("FallbackMessages") == 2
    assert metrics.value("TransportThrottled") == 3
    assert metrics.value("TransportUnavailable") == 1
