"""EMF metric lines: valid documents (checked against the spec's rules in support/emf.py,
independently of the module's own constants), split, typed and refused where CloudWatch would."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import pytest
from emf import directive_of, parse_lines, units_of

from async_notifier.config import validate_namespace
from async_notifier.metrics import InvocationMetrics

NAMESPACE = "AsyncNotifier"


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
        # The log handler puts Lambda's `level` and `timestamp` in front of every line.
        (lambda m: m.add("level"), "collides"),
        (lambda m: m.set_property("timestamp", "x"), "collides"),
        (lambda m: m.add("X", dimensions={"level": "v"}), "invalid dimension name"),
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
