"""`python -m bench --quick` runs end to end, so `make bench` cannot rot.

Only completeness and delivery are asserted: every scenario ran every target it should,
every record of every run reached the SMTP sink exactly once, and nothing the benchmark
started is left running. Never speed: that is what the benchmark reports, and a shared
machine cannot promise it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_RUNS = {
    ("small", "baseline"),
    ("small", "project"),
    ("large", "baseline"),
    ("large", "project"),
    ("remote", "baseline"),
    ("remote", "project"),
    ("remote-warm", "project"),
    ("scale", "project"),
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench") / "r.json"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout, json.loads(out.read_text())


def _running(pattern: str) -> list[str]:
    """Command lines of live processes matching `pattern` (pgrep, or /proc without it)."""
    if shutil.which("pgrep"):
        found = subprocess.run(
            ["pgrep", "-af", pattern], capture_output=True, text=True, check=False
        )
        return [line for line in found.stdout.splitlines() if "pgrep" not in line]
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if text and re.search(pattern, text):
            lines.append(text)
    return lines


def test_quick_run_covers_every_scenario_and_target(quick: tuple[str, dict[str, Any]]) -> None:
    _, results = quick
    assert results["ok"] is True
    assert results["quick"] is True
    runs = {(row["scenario"], row["target"]) for row in results["results"]}
    assert runs == EXPECTED_RUNS
    assert len(results["results"]) == len(EXPECTED_RUNS)


def test_every_record_of_every_run_was_delivered_once(quick: tuple[str, dict[str, Any]]) -> None:
    _, results = quick
    for row in results["results"]:
        where = f"{row['scenario']}/{row['target']}"
        assert row["errors"] == [], where
        assert row["ok"] is True, where
        assert row["records"] > 0, where
        # A warm-up invocation (remote-warm) delivers its own records through the same sink.
        expected = row["records"] + row.get("warmup_records", 0)
        assert row["delivered"] == expected, where
        assert row["unique_delivered"] == expected, where
        assert row["duplicates"] == 0, where
        assert row["failures"] == 0, where
        assert row["delivered_bytes"] > row["attachment_bytes"], where  # base64 inflates


def test_measurements_are_complete_and_positive(quick: tuple[str, dict[str, Any]]) -> None:
    _, results = quick
    for row in results["results"]:
        where = f"{row['scenario']}/{row['target']}"
        for key in ("wall_s", "records_per_s", "mib_per_s", "peak_rss_mib", "import_ms"):
            assert isinstance(row[key], float | int), (where, key)
            assert row[key] > 0, (where, key)
        assert row["smtp_connections"] >= 1, where
        # Run from the copy taken at start, not from the (possibly changing) working tree.
        assert row["module_file"].startswith(results["work_dir"]), where
        if row["target"] == "baseline":
            assert row["smtp_connections"] == row["records"], where  # the old design
        if row["scenario"] == "remote-warm":
            assert row["warmup_records"] > 0, where
            assert row["warmup_wall_s"] > 0, where
    assert {r["scenario"] for r in results["ratios"]} == {"small", "large", "remote"}
    for ratio in results["ratios"]:
        assert all(ratio[key] > 0 for key in ("records_per_s", "mib_per_s", "peak_rss"))
    limits = results["protocol_limits"]
    assert sorted(limit["scenario"] for limit in limits) == ["remote", "remote-warm"]
    for limit in limits:
        assert limit["limit_records_per_s"] > 0, limit["scenario"]
        assert limit["fraction"] > 0, limit["scenario"]
    assert results["scale"]["scale_peak_rss_mib"] > 0
    assert results["imports"]["handler_ms"] > 0
    assert results["imports"]["aioboto3_ms"] > 0


def test_the_table_and_ratios_are_printed(quick: tuple[str, dict[str, Any]]) -> None:
    stdout, _ = quick
    assert "records/s" in stdout
    assert "project / baseline:" in stdout
    assert "protocol limit" in stdout
    assert "ERROR" not in stdout


def test_nothing_the_benchmark_started_is_left_running(
    quick: tuple[str, dict[str, Any]],
) -> None:
    _, results = quick
    assert results["helpers"], "the benchmark should list the processes it started"
    # Our helpers and targets carry the run's work dir on their command line; moto its port.
    leftovers = _running(re.escape(results["work_dir"]))
    for helper in results["helpers"]:
        if helper["name"] == "moto":
            port = helper["command"][-1]
            leftovers += _running(rf"moto_server -H 127\.0\.0\.1 -p {port}( |$)")
    assert leftovers == []
