"""Lambda's logging conventions, on the lines the handler really writes to stdout.

Every line logged inside Lambda carries Powertools' keys: `cold_start` (the first invocation
of a process, or of a SnapStart restore), `function_name`, `function_memory_size` and, when
Lambda traces the invocation, `xray_trace_id`. The cold start also writes a `ColdStart`
metric, once. Under Lambda's JSON log format Lambda reads each line's `level` and
`timestamp` and drops the lines below the application log level: every line must carry a
level Lambda knows, and no metric line may fall below that level.

The handler runs in this process against aiosmtpd and moto; Lambda's context object has no
local peer, so `FakeLambdaContext` stands in for it, and Lambda's filter (a service, not a
library) is written down here from its documentation (`kept_by_lambda`). The same rules are
checked on the real runtime client in tests/test_runtime.py.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any

import pytest
from emf import directive_of, validate_emf
from faults import S3Action, S3FaultProxy, S3Rule
from servers import FakeLambdaContext, SmtpSink, failed_ids, sqs_event, sqs_record

import handler

LAMBDA_KEYS = {"cold_start", "function_name", "function_memory_size", "xray_trace_id"}
# Lambda's levels, least severe first: a line counts as INFO unless its `level` is one of
# these (any case) and its `timestamp` is RFC 3339.
LAMBDA_LEVELS = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"]
RFC_3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
ROOTS = {
    "req-1": "1-67891233-abcdef012345678912345678",
    "req-2": "1-67891234-0123456789abcdef01234567",
}
# Root need not come first, and the header carries more than the trace.
TRACE_HEADERS = {
    "req-1": f"Root={ROOTS['req-1']};Parent=53995c3f42cd8ad8;Sampled=1",
    "req-2": f"Parent=0123456789abcdef;Root={ROOTS['req-2']};Sampled=0;Lineage=1:abc:0",
    "req-3": None,  # not traced: no xray_trace_id
}
pytestmark = pytest.mark.usefixtures("lambda_env")


@pytest.fixture(autouse=True)
def outside_lambda(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the variables Lambda sets, whatever the shell running the tests exports."""
    for name in (
        "AWS_LAMBDA_FUNCTION_NAME",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_LOG_FORMAT",
        "AWS_LAMBDA_LOG_LEVEL",
        "_X_AMZN_TRACE_ID",
    ):
        monkeypatch.delenv(name, raising=False)


def written(out: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(log lines, EMF documents): every line the package wrote is one JSON object."""
    lines = [json.loads(line) for line in out.splitlines()]
    assert all(isinstance(line, dict) for line in lines)
    documents = [line for line in lines if "_aws" in line]
    for document in documents:
        validate_emf(json.dumps(document))
    return [line for line in lines if "_aws" not in line], documents


def kept_by_lambda(line: dict[str, Any], application_level: str) -> bool:
    """Lambda's JSON log format: is this stdout line sent on at that application level?"""
    level = str(line.get("level", "")).upper()
    timestamp = line.get("timestamp")
    if level not in LAMBDA_LEVELS or not (
        isinstance(timestamp, str) and RFC_3339_UTC.fullmatch(timestamp)
    ):
        level = "INFO"
    return LAMBDA_LEVELS.index(level) >= LAMBDA_LEVELS.index(application_level)


def invoke(request: str, *records: dict[str, Any]) -> None:
    context = FakeLambdaContext(aws_request_id=request, function_name="notifier")
    assert failed_ids(handler.lambda_handler(sqs_event(records), context)) == []


def email(n: int) -> dict[str, Any]:
    body = {"video_id": f"v{n}", "status": "FAILED", "email": f"u{n}@example.com"}
    return sqs_record(body, f"m{n}")


def by_request(lines: list[dict[str, Any]]) -> dict[str | None, list[dict[str, Any]]]:
    grouped: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        grouped[line.get("request_id")].append(line)
    return grouped


def cold_starts(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in documents if "ColdStart" in d]


def test_the_first_invocation_is_cold_and_each_carries_its_own_trace(
    smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lambda's runtime sets `_X_AMZN_TRACE_ID` anew before each invocation: each one's
    lines carry its own trace, and an untraced one none."""
    for n, (request, header) in enumerate(TRACE_HEADERS.items()):
        if header is None:
            monkeypatch.delenv("_X_AMZN_TRACE_ID")
        else:
            monkeypatch.setenv("_X_AMZN_TRACE_ID", header)
        invoke(request, email(n))
    smtp_sink.wait_for(3)
    logs, documents = written(capsys.readouterr().out)

    grouped = by_request(logs)
    assert set(grouped) == set(TRACE_HEADERS)  # every line inside an invocation
    for request, lines in grouped.items():
        assert {line["cold_start"] for line in lines} == {request == "req-1"}, request
        assert {line["function_name"] for line in lines} == {"notifier"}
        assert {line["function_memory_size"] for line in lines} == {512}
        assert {line.get("xray_trace_id") for line in lines} == {ROOTS.get(request)}, request
        assert all(list(line)[:3] == ["timestamp", "level", "message"] for line in lines)

    [cold] = cold_starts(documents)
    assert directive_of(cold) == {
        "Namespace": "AsyncNotifier",
        "Dimensions": [["FunctionName"]],
        "Metrics": [{"Name": "ColdStart", "Unit": "Count"}],
    }
    assert (cold["ColdStart"], cold["FunctionName"], cold["request_id"]) == (1, "notifier", "req-1")
    # The batches' own documents are untouched: one per invocation, no ColdStart among them.
    batches = [d for d in documents if "RecordsReceived" in d]
    assert [d["request_id"] for d in batches] == list(TRACE_HEADERS)


def test_a_snapstart_restore_starts_cold_again(
    smtp_sink: SmtpSink, capsys: pytest.CaptureFixture[str]
) -> None:
    """A copy restored from a snapshot is a new sandbox: its first invocation is a cold
    start, whatever the process did before the snapshot."""
    invoke("before", email(1))
    handler.process.before_snapshot()
    handler.process.after_restore()
    invoke("restored", email(2))
    invoke("warm", email(3))
    smtp_sink.wait_for(3)
    logs, documents = written(capsys.readouterr().out)

    grouped = by_request(logs)
    cold = {request: {line["cold_start"] for line in grouped[request]} for request in grouped}
    assert cold == {"before": {True}, "restored": {True}, "warm": {False}}
    assert [d["request_id"] for d in cold_starts(documents)] == ["before", "restored"]


def test_lines_of_the_init_phase_name_the_function_and_no_invocation(
    s3_proxy: S3FaultProxy, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In the init phase (`handler` imported in Lambda) the worker reads the account's SES
    quota; when that fails, its warnings say which function, and claim no invocation: no
    request id, no cold_start, no trace (the trace variable is an earlier invocation's, if
    anything)."""
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "notifier")
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
    monkeypatch.setenv("_X_AMZN_TRACE_ID", TRACE_HEADERS["req-1"])
    monkeypatch.setenv("SMTP_RATE_LIMIT", "auto")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.endpoint_url)
    s3_proxy.set_rules(S3Rule(S3Action.INTERNAL_ERROR))

    handler.process.init(ses_events=False)
    logs, documents = written(capsys.readouterr().out)

    [warning] = [line for line in logs if line["message"] == "cannot read the sending quota"]
    assert warning["level"] == "WARN"
    assert (warning["function_name"], warning["function_memory_size"]) == ("notifier", 1024)
    assert not {"request_id", "cold_start", "xray_trace_id"} & set(warning)
    assert documents == []  # no invocation yet, so no ColdStart either


def test_under_lambdas_json_format_the_metrics_pass_the_application_level(
    smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """LoggingConfig with LogFormat JSON and ApplicationLogLevel WARN: Lambda sets
    AWS_LAMBDA_LOG_LEVEL=WARN, which wins over LOG_LEVEL. No INFO line is written (Lambda
    would drop it), the warnings say WARN (Python's WARNING reads as INFO to Lambda, and
    would be dropped), and every metric line is kept."""
    monkeypatch.setenv("AWS_LAMBDA_LOG_FORMAT", "JSON")
    monkeypatch.setenv("AWS_LAMBDA_LOG_LEVEL", "WARN")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    invoke("first", email(1))
    context = FakeLambdaContext(aws_request_id="no-records", function_name="notifier")
    assert failed_ids(handler.lambda_handler({"Records": "none"}, context)) == []
    smtp_sink.wait_for(1)
    logs, documents = written(capsys.readouterr().out)

    [warning] = logs  # nothing below WARN
    assert warning["message"] == "event has no Records list; nothing to do"
    assert warning["level"] == "WARN"
    assert kept_by_lambda(warning, "WARN")
    assert {d["level"] for d in documents} == {"WARN"}
    assert all(kept_by_lambda(d, "WARN") for d in documents)
    assert len(cold_starts(documents)) == 1
    assert [d["request_id"] for d in documents if "RecordsReceived" in d] == ["first"]


@pytest.mark.parametrize(
    ("level", "expected"),
    [("DEBUG", "DEBUG"), ("INFO", "INFO"), ("WARNING", "WARN"), ("ERROR", "ERROR")],
)
def test_every_line_has_a_level_and_a_timestamp_lambda_reads(
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    level: str,
    expected: str,
) -> None:
    """Whatever LOG_LEVEL (no LoggingConfig: Lambda passes no level), each line says a level
    Lambda knows, and metric lines say the package's level or INFO, whichever is higher, so
    that an application level set to match LOG_LEVEL keeps them."""
    monkeypatch.setenv("LOG_LEVEL", level)
    invoke("one", email(1))
    smtp_sink.wait_for(1)
    logs, documents = written(capsys.readouterr().out)

    for line in [*logs, *documents]:
        assert line["level"] in LAMBDA_LEVELS
        assert RFC_3339_UTC.fullmatch(line["timestamp"]), line["timestamp"]
    assert {d["level"] for d in documents} == {"INFO" if expected == "DEBUG" else expected}
    assert all(kept_by_lambda(line, expected) for line in [*logs, *documents])
