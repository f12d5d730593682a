"""Per-invocation CloudWatch metrics as Embedded Metric Format (EMF) log lines.

An EMF line is a JSON log event that CloudWatch Logs turns into metrics: no PutMetricData
call, no extra latency or IAM permission, and the numbers stay searchable in the logs.
This is a small module of our own rather than aws-lambda-powertools' Metrics: the few
rules we need (units, 100 metrics per directive, 30 dimensions) fit in a page, and
importing Powertools' metrics package costs a cold start about 15 ms on top of the
worker's own imports, which bring this module anyway (`python -m bench.import_cost`; the
numbers are in docs/operations.md, "Metrics and logs").
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Literal, get_args

from .config import validate_namespace

Unit = Literal[
    "Seconds",
    "Microseconds",
    "Milliseconds",
    "Bytes",
    "Kilobytes",
    "Megabytes",
    "Gigabytes",
    "Terabytes",
    "Bits",
    "Kilobits",
    "Megabits",
    "Gigabits",
    "Terabits",
    "Percent",
    "Count",
    "Bytes/Second",
    "Kilobytes/Second",
    "Megabytes/Second",
    "Gigabytes/Second",
    "Terabytes/Second",
    "Bits/Second",
    "Kilobits/Second",
    "Megabits/Second",
    "Gigabits/Second",
    "Terabits/Second",
    "Count/Second",
    "None",
]
UNITS: frozenset[str] = frozenset(get_args(Unit))
MAX_METRICS_PER_DIRECTIVE = 100  # EMF: a MetricDirective holds at most 100 metrics
MAX_DIMENSIONS = 30  # EMF: a DimensionSet holds at most 30 keys
MAX_NAME = 255  # CloudWatch metric and namespace names
MAX_DIMENSION_VALUE = 1024
# `_aws` is EMF's metadata; `level` and `timestamp` are put in front of each line by the
# package's log handler (`logs.py`), for Lambda's JSON log format.
_RESERVED = frozenset({"_aws", "level", "timestamp"})
# CloudWatch's namespace characters; "AWS/" is reserved for AWS's own namespaces.

_GroupKey = tuple[tuple[str, str], ...]


class InvocationMetrics:
    """Metrics of one invocation, written as EMF when `emit` is called.

    Metrics share the base `dimensions`; `add`/`set` may name extra dimensions (such as
    ErrorClass), which makes a separate EMF document for each distinct set of values,
    because a document carries one value per dimension key.
    """

    def __init__(
        self,
        namespace: str,
        *,
        dimensions: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.namespace = validate_namespace(namespace)
        self.dimensions = dict(dimensions or {})
        _check_dimensions(self.dimensions)
        self._clock = clock
        self._groups: dict[_GroupKey, dict[str, tuple[float, str]]] = {}
        self._properties: dict[str, Any] = {}

    def add(
        self,
        name: str,
        value: float = 1,
        unit: Unit = "Count",
        *,
        dimensions: Mapping[str, str] | None = None,
    ) -> None:
        """Add to a counter (created at 0)."""
        metrics = self._group(name, unit, dimensions)
        previous = metrics.get(name, (0.0, unit))[0]
        metrics[name] = (previous + _number(name, value), unit)

    def set(
        self,
        name: str,
        value: float,
        unit: Unit,
        *,
        dimensions: Mapping[str, str] | None = None,
    ) -> None:
        """Set a value, replacing any earlier one."""
        metrics = self._group(name, unit, dimensions)
        metrics[name] = (_number(name, value), unit)

    def set_property(self, name: str, value: Any) -> None:
        """A top-level field that is not a metric (e.g. the request id), for Logs Insights."""
        if name in _RESERVED or name in self.dimensions or self._is_metric(name):
            raise ValueError(f"property {name!r} collides with a metric or dimension")
        json.dumps(value)  # fail here, not at emit time
        self._properties[name] = value

    def value(self, name: str, dimensions: Mapping[str, str] | None = None) -> float | None:
        """The current value of a metric (for tests and logs)."""
        entry = self._groups.get(_key(dimensions), {}).get(name)
        return entry[0] if entry else None

    def documents(self) -> list[dict[str, Any]]:
        """The EMF documents: one per dimension set, split at 100 metrics each."""
        timestamp = int(self._clock() * 1000)
        documents: list[dict[str, Any]] = []
        for key, metrics in self._groups.items():
            if not metrics:
                continue
            dimensions = {**self.dimensions, **dict(key)}
            names = list(metrics)
            for start in range(0, len(names), MAX_METRICS_PER_DIRECTIVE):
                chunk = names[start : start + MAX_METRICS_PER_DIRECTIVE]
                directive = {
                    "Namespace": self.namespace,
                    "Dimensions": [list(dimensions)],
                    "Metrics": [{"Name": n, "Unit": metrics[n][1]} for n in chunk],
                }
                document: dict[str, Any] = {
                    "_aws": {"Timestamp": timestamp, "CloudWatchMetrics": [directive]},
                    **self._properties,
                    **dimensions,
                }
                document.update({n: _json_number(metrics[n][0]) for n in chunk})
                documents.append(document)
        return documents

    def lines(self) -> list[str]:
        """The EMF documents, one JSON object per line; none when no metric was recorded."""
        return [json.dumps(d, separators=(",", ":"), ensure_ascii=False) for d in self.documents()]

    def emit(self, stream: IO[str] | None = None) -> str:
        """Write the EMF lines; return them.

        Lambda sends stdout to CloudWatch Logs line by line, where each line that is an EMF
        document becomes metrics. Without `stream` the lines go through the package's log
        handlers (see `logs.emit_raw`), so whoever redirects the logs gets them too; the
        package's handler writes `level` and `timestamp` in front of each, for Lambda's JSON
        log format.
        """
        lines = self.lines()
        if stream is None:
            from .logs import emit_raw

            for line in lines:
                emit_raw(line)
            return "\n".join(lines) + "\n" if lines else ""
        text = "\n".join(lines) + "\n" if lines else ""
        stream.write(text)
        stream.flush()
        return text

    def _group(
        self, name: str, unit: str, dimensions: Mapping[str, str] | None
    ) -> dict[str, tuple[float, str]]:
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise ValueError(f"invalid metric name {name!r}")
        if unit not in UNITS:
            raise ValueError(f"metric {name!r}: unknown unit {unit!r}")
        extra = dict(dimensions or {})
        if set(extra) & set(self.dimensions):
            raise ValueError(f"metric {name!r}: dimensions repeat the base dimensions")
        combined = {**self.dimensions, **extra}
        _check_dimensions(combined)
        if name in _RESERVED or name in combined or name in self._properties:
            raise ValueError(f"metric name {name!r} collides with a dimension or property")
        for other_key in self._groups:
            if name in dict(other_key) or any(k in self._groups[other_key] for k in extra):
                raise ValueError(f"metric {name!r}: a name is both a metric and a dimension")
        metrics = self._groups.setdefault(_key(extra), {})
        if name in metrics and metrics[name][1] != unit:
            raise ValueError(f"metric {name!r} already has unit {metrics[name][1]!r}")
        return metrics

    def _is_metric(self, name: str) -> bool:
        return any(name in metrics or name in dict(key) for key, metrics in self._groups.items())


def _key(dimensions: Mapping[str, str] | None) -> _GroupKey:
    return tuple(sorted((dimensions or {}).items()))


def _check_dimensions(dimensions: Mapping[str, str]) -> None:
    if len(dimensions) > MAX_DIMENSIONS:
        raise ValueError(f"more than {MAX_DIMENSIONS} dimensions")
    for name, value in dimensions.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME or name in _RESERVED:
            raise ValueError(f"invalid dimension name {name!r}")
        if not isinstance(value, str) or not value or len(value) > MAX_DIMENSION_VALUE:
            raise ValueError(f"dimension {name!r} needs a non-empty string value")


def _number(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"metric {name!r}: {value!r} is not a finite number")
    return float(value)


def _json_number(value: float) -> int | float:
    """Whole numbers as JSON integers: shorter lines, and exact in Logs Insights."""
    return int(value) if value.is_integer() and abs(value) < 2**53 else value
