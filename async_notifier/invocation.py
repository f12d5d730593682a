"""What Lambda says about the function and about one invocation, named as Powertools for
AWS Lambda names it: the keys every log line carries inside Lambda, and the ColdStart metric.

Powertools' names (`cold_start`, `function_name`, `function_memory_size`, `xray_trace_id`)
let queries written for its logs run on ours; the request id keeps the key it always had,
`request_id`, rather than a second copy as `function_request_id`. Only `LambdaProcess` uses
this module: the SQS runner's lines carry none of these keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .metrics import InvocationMetrics

TRACE_VARIABLE = "_X_AMZN_TRACE_ID"  # set by Lambda's runtime before each invocation
FUNCTION_NAME_VARIABLE = "AWS_LAMBDA_FUNCTION_NAME"
MEMORY_SIZE_VARIABLE = "AWS_LAMBDA_FUNCTION_MEMORY_SIZE"
COLD_START_METRIC = "ColdStart"


def function_keys(environ: Mapping[str, str]) -> dict[str, Any]:
    """The function's keys, from Lambda's environment: for the lines logged outside an
    invocation (the init phase, SnapStart's hooks). None outside Lambda."""
    name = environ.get(FUNCTION_NAME_VARIABLE)
    if not name:
        return {}
    keys: dict[str, Any] = {"function_name": name}
    memory = _megabytes(environ.get(MEMORY_SIZE_VARIABLE))
    if memory is not None:
        keys["function_memory_size"] = memory
    return keys


def invocation_keys(
    context: Any, *, cold_start: bool, environ: Mapping[str, str]
) -> dict[str, Any]:
    """One invocation's keys: whether it is the first of its process (`cold_start`), the
    function its context names, and its X-Ray trace. Lambda's runtime sets the trace
    variable anew before every invocation, so it is read here, per invocation."""
    keys: dict[str, Any] = {"cold_start": cold_start, **function_keys(environ)}
    name = getattr(context, "function_name", None)
    if isinstance(name, str) and name:
        keys["function_name"] = name
    memory = _megabytes(getattr(context, "memory_limit_in_mb", None))
    if memory is not None:
        keys["function_memory_size"] = memory
    trace = trace_root(environ.get(TRACE_VARIABLE))
    if trace is not None:
        keys["xray_trace_id"] = trace
    return keys


def trace_root(header: str | None) -> str | None:
    """The trace id of an X-Ray trace header (`Root=1-...;Parent=...;Sampled=1`), if any."""
    for part in (header or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == "Root" and value:
            return value
    return None


def cold_start_metrics(
    namespace: str, function_name: str | None, request: str | None = None
) -> InvocationMetrics:
    """ColdStart = 1, in a document of its own, as Powertools writes it: counted once per
    process (and once per SnapStart restore), with the `FunctionName` dimension the rest
    of the namespace's metrics have."""
    metrics = InvocationMetrics(
        namespace, dimensions={"FunctionName": function_name} if function_name else None
    )
    metrics.set(COLD_START_METRIC, 1, "Count")
    if request:
        metrics.set_property("request_id", request)
    return metrics


def _megabytes(value: Any) -> int | None:
    """Lambda gives the memory size as text ("1024"); a number is easier to query."""
    try:
        megabytes = int(value)
    except (TypeError, ValueError):
        return None
    return megabytes if megabytes > 0 else None
