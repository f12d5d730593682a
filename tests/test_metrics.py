"""EMF metric lines: valid documents (checked against the spec's rules here, independently of
the module's own constants) built from a real BatchResult."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import time
from typing import Any

import pytest

from async_notifier.batch.outcome import Action, BatchResult, DeadLetter, Outcome, Retry
from async_notifier.batch.report import metrics_from_batch
from async_notifier.config import validate_namespace
from async_notifier.errors import (
    BadMessage,
    DownloadFailed,
    InternalError,
    NotifierError,
    SmtpUnavailable,
)
from async_notifier.logs import configure, request_id
from async_notifier.metrics import InvocationMetrics

# From the CloudWatch MetricDatum / EMF specification.
VALID_UNITS = {
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes",
    "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count",
    "Bytes/Second", "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second",
    "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second",
    "Gigabits/Second", "Terabits/Second", "Count/Second", "None",
}  # fmt: skip
NAMESPACE = "AsyncNotifier"


def validate_emf(line: str) -> dict[str, Any]:
    """Assert one log line is a valid EMF document; return it parsed."""
    assert "\n" not in line
    document = json.loads(line)
    assert isinstance(document, dict)
    meta = document["_aws"]
    timestamp = meta["Timestamp"]
    assert isinstance(timestamp, int)
    assert not isinstance(timestamp, bool)
    # EMF accepts timestamps up to 2 weeks old and 2 hours ahead.
    now_ms = time.time() * 1000
    assert now_ms - 14 * 24 * 3600 * 1000 < timestamp < now_ms + 2 * 3600 * 1000
    directives = meta["CloudWatchMetrics"]
    assert isinstance(directives, list)
    assert directives
    for directive in directives:
        assert isinstance(directive["Namespace"], str)
        assert 1 <= len(directive["Namespace"]) <= 255
        assert isinstance(directive["Dimensions"], list)
        for dimension_set in directive["Dimensions"]:
            assert isinstance(dimension_set, list)
            assert len(dimension_set) <= 30
            for key in dimension_set:
                assert isinstance(key, str)
                value = document[key]
                assert isinstance(value, str)
                assert value
        metrics = directive["Metrics"]
        assert 1 <= len(metrics) <= 100
        names = [m["Name"] for m in metrics]
        assert len(names) == len(set(names))
        for metric in metrics:
            assert set(metric) <= {"Name", "Unit", "StorageResolution"}
            assert metric["Unit"] in VALID_UNITS
            value = document[metric["Name"]]
            assert isinstance(value, int | float)
            assert not isinstance(value, bool)
            assert math.isfinite(value)
    return document


def parse_lines(text: str) -> list[dict[str, Any]]:
    assert text.endswith("\n")
    return [validate_emf(line) for line in text.splitlines()]


def directive_of(document: dict[str, Any]) -> dict[str, Any]:
    directive: dict[str, Any] = document["_aws"]["CloudWatchMetrics"][0]
    return directive


def units_of(document: dict[str, Any]) -> dict[str, str]:
    return {m["Name"]: m["Unit"] for m in directive_of(document)["Metrics"]}


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
        ]
    )
    # Settled: the two bad messages went to the dead-letter queue, the rest are retried.
    result.fates = [
        DeadLetter("bad_message") if o.message_id in ("6", "7") else Retry(30)
        for o in result.errors
    ]
    return result


def test_batch_metrics(batch: BatchResult) -> None:
    metrics = metrics_from_batch(
        batch,
        duration_s=1.2345,
        connections_opened=3,
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
        "RecordsReceived": 10,
        "RecordsSent": 3,
        "RecordsFailed": 5,
        "BatchItemFailures": 3,
        "RecordsDeadLettered": 2,
        "RecordsRetried": 3,
        "Retries": 6,
        "BytesAttached": 1_500,
        "LinksSent": 1,
        "Duplicates": 1,
        "AlreadyDelivered": 1,
        "SmtpConnectionsOpened": 3,
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
    assert failed == {"bad_message": 2, "download_failed": 1, "smtp_unavailable": 1, "internal": 1}
    assert sum(failed.values()) == main["RecordsFailed"]


def test_emit_writes_raw_lines_to_stdout_through_the_package_logs(
    batch: BatchResult, capsys: pytest.CaptureFixture[str]
) -> None:
    """Raw EMF lines on stdout, whatever LOG_LEVEL, and not wrapped in the JSON log format."""
    logger = configure("ERROR")
    try:
        metrics = metrics_from_batch(
            batch, duration_s=0.5, connections_opened=0, namespace=NAMESPACE, function_name=None
        )
        text = metrics.emit()
        assert capsys.readouterr().out == text
    finally:
        for log_handler in list(logger.handlers):
            logger.removeHandler(log_handler)
    main, *by_class = parse_lines(text)
    assert directive_of(main)["Dimensions"] == [[]]  # no dimensions: the namespace-wide metric
    assert all(directive_of(d)["Dimensions"] == [["ErrorClass"]] for d in by_class)


def test_all_good_batch_has_no_error_class_lines() -> None:
    result = BatchResult.of([outcome("1", size=10), outcome("2", size=20)])
    text = metrics_from_batch(
        result, duration_s=0.1, connections_opened=1, namespace=NAMESPACE, function_name="f"
    ).emit(io.StringIO())
    (main,) = parse_lines(text)
    assert main["RecordsFailed"] == 0
    assert main["BytesAttached"] == 30
    assert main["RecordsSent"] == 2


def test_request_id_is_a_property(batch: BatchResult) -> None:
    token = request_id.set("c6af9ac6-7b61-11e6-9a41-93e8deadbeef")
    try:
        metrics = metrics_from_batch(
            batch, duration_s=0.1, connections_opened=0, namespace=NAMESPACE, function_name="f"
        )
    finally:
        request_id.reset(token)
    for document in parse_lines(metrics.emit(io.StringIO())):
        assert document["request_id"] == "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"
        assert "request_id" not in units_of(document)


def test_more_than_100_metrics_are_split() -> None:
    metrics = InvocationMetrics(NAMESPACE, dimensions={"FunctionName": "f"})
    for i in range(250):
        metrics.add(f"M{i:03d}", i)
    metrics.set_property("request_id", "r-1")
    documents = parse_lines(metrics.emit(io.StringIO()))
    assert [len(directive_of(d)["Metrics"]) for d in documents] == [100, 100, 50]
    seen: dict[str, float] = {}
    for document in documents:
        assert document["FunctionName"] == "f"
        assert document["request_id"] == "r-1"
        seen.update({name: document[name] for name in units_of(document)})
    assert seen == {f"M{i:03d}": i for i in range(250)}


def test_add_accumulates_and_set_replaces() -> None:
    metrics = InvocationMetrics(NAMESPACE)
    metrics.add("Sent")
    metrics.add("Sent", 2)
    metrics.set("Latency", 5, "Milliseconds")
    metrics.set("Latency", 7.5, "Milliseconds")
    metrics.add("Failed", dimensions={"ErrorClass": "x"})
    metrics.add("Failed", dimensions={"ErrorClass": "x"})
    metrics.add("Failed", dimensions={"ErrorClass": "y"})
    assert metrics.value("Sent") == 3
    assert metrics.value("Latency") == 7.5
    assert metrics.value("Failed", {"ErrorClass": "x"}) == 2
    assert metrics.value("Failed") is None
    documents = parse_lines(metrics.emit(io.StringIO()))
    assert len(documents) == 3


def test_nothing_recorded_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert InvocationMetrics(NAMESPACE).emit() == ""
    assert capsys.readouterr().out == ""


def test_fixed_clock_sets_the_timestamp() -> None:
    metrics = InvocationMetrics(NAMESPACE, clock=lambda: 1_700_000_000.1234)
    metrics.add("X")
    (document,) = metrics.documents()
    assert document["_aws"]["Timestamp"] == 1_700_000_000_123


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.add("X", unit="Widgets"), "unknown unit"),
        (lambda m: m.set("X", float("nan"), "Count"), "finite"),
        (lambda m: m.set("X", float("inf"), "Count"), "finite"),
        (lambda m: m.add("X", True), "finite"),
        (lambda m: m.add(""), "invalid metric name"),
        (lambda m: m.add("x" * 256), "invalid metric name"),
        (lambda m: m.add("_aws"), "collides"),
        (lambda m: m.add("FunctionName"), "collides"),
        (lambda m: m.add("X", dimensions={"FunctionName": "g"}), "repeat"),
        (lambda m: m.add("X", dimensions={"ErrorClass": ""}), "non-empty"),
        (lambda m: m.set_property("FunctionName", "x"), "collides"),
        (lambda m: m.set_property("p", object()), "not JSON serializable"),
    ],
)
def test_invalid_input_is_refused(call: Any, message: str) -> None:
    metrics = InvocationMetrics(NAMESPACE, dimensions={"FunctionName": "f"})
    with pytest.raises((ValueError, TypeError), match=message):
        call(metrics)


def test_unit_and_name_clashes_are_refused() -> None:
    metrics = InvocationMetrics(NAMESPACE)
    metrics.add("X")
    with pytest.raises(ValueError, match="already has unit"):
        metrics.set("X", 1, "Bytes")
    metrics.add("Failed", dimensions={"ErrorClass": "a"})
    with pytest.raises(ValueError, match="both a metric and a dimension"):
        metrics.add("ErrorClass")
    with pytest.raises(ValueError, match="both a metric and a dimension"):
        metrics.add("Y", dimensions={"X": "v"})
    with pytest.raises(ValueError, match="collides"):
        metrics.set_property("X", 1)


@pytest.mark.parametrize("namespace", ["", "AWS/Lambda", "a" * 256, "bad\nname", "ça"])
def test_invalid_namespace(namespace: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        InvocationMetrics(namespace)


@pytest.mark.parametrize("namespace", ["AsyncNotifier", "Video/Notifier-prod", "a.b_c#d:e f"])
def test_valid_namespace(namespace: str) -> None:
    assert validate_namespace(namespace) == namespace


def test_invalid_dimensions() -> None:
    with pytest.raises(ValueError, match="more than 30"):
        InvocationMetrics(NAMESPACE, dimensions={f"D{i}": "v" for i in range(31)})


def test_import_stays_light() -> None:
    """The module is imported at cold start: it must not drag in the batch machinery."""
    code = (
        "import sys, async_notifier.metrics; "
        "heavy = [m for m in ('async_notifier.batch', 'async_notifier.messages', "
        "'aws_lambda_powertools', 'email_validator') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
