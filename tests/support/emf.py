"""CloudWatch's embedded metric format, checked against the spec's rules here, independently
of the package's own constants: shared by the metrics tests and the batch report's tests."""

from __future__ import annotations

import json
import math
import time
from typing import Any

# From the CloudWatch MetricDatum / EMF specification.
VALID_UNITS = {
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes",
    "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count",
    "Bytes/Second", "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second",
    "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second",
    "Gigabits/Second", "Terabits/Second", "Count/Second", "None",
}  # fmt: skip


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
