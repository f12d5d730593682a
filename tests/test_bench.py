"""`python -m bench --quick` runs end to end, so `make bench` cannot rot.

Only completeness and delivery are asserted: every scenario ran every target it should
(`ses-large` once per transport), every record of every run reached the SMTP sink (or, by
the SES API, moto's SES) exactly once, and nothing the benchmark started is left running.
Never speed or memory: that is what the benchmark reports, and a shared machine cannot
promise it. The same holds for the A/B mode (`--vs HEAD`, one scenario,
two interleaved rounds): both trees ran, each its own code, and the comparison is reported.
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

from bench import compare, fleet, previous, ses_sent
from bench.run import parse_args
from bench.scenarios import interleaved, parse_targets
from bench.target import _stray_modules

ROOT = Path(__file__).resolve().parent.parent
# (scenario, target, transport): only ses-large's rows name their transport.
EXPECTED_RUNS = {
    ("small", "baseline", None),
    ("small", "project", None),
    ("large", "baseline", None),
    ("large", "project", None),
    ("remote", "baseline", None),
    ("remote", "project", None),
    ("remote-warm", "project", None),
    ("scale", "project", None),
    ("throttled", "project", None),
    ("ses-large", "project", "smtp"),
    ("ses-large", "project", "ses"),
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


@pytest.fixture(scope="module")
def versus_head(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench-vs") / "r.json"
    completed = subprocess.run(
        [
            sys.executable, "-m", "bench", "--quick", "--vs", "HEAD", "--scenario", "remote",
            "--repeat", "2", "--import-samples", "1", "--out", str(out),
        ],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout, json.loads(out.read_text())


def _head() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def _assert_delivered(row: dict[str, Any]) -> None:
    where = f"{row['scenario']}/{row['target']}/{row.get('run')}"
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
    runs = {(row["scenario"], row["target"], row.get("transport")) for row in results["results"]}
    assert runs == EXPECTED_RUNS
    assert len(results["results"]) == len(EXPECTED_RUNS)


def test_every_record_of_every_run_was_delivered_once(quick: tuple[str, dict[str, Any]]) -> None:
    _, results = quick
    for row in results["results"]:
        _assert_delivered(row)


def test_measurements_are_complete_and_positive(quick: tuple[str, dict[str, Any]]) -> None:
    _, results = quick
    for row in results["results"]:
        where = f"{row['scenario']}/{row['target']}"
        for key in ("wall_s", "records_per_s", "mib_per_s", "peak_rss_mib", "import_ms"):
            assert isinstance(row[key], float | int), (where, key)
            assert row[key] > 0, (where, key)
        if row.get("transport") == "ses":
            assert row["smtp_connections"] == 0, where  # the SES API: no SMTP at all
        else:
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
    assert "fleet pacing: 2 instances" in stdout
    assert "baseline: not run here" in stdout
    assert "ERROR" not in stdout


def test_the_throttled_fleet_delivered_everything_once_through_the_account(
    quick: tuple[str, dict[str, Any]],
) -> None:
    _, results = quick
    [row] = [row for row in results["results"] if row["scenario"] == "throttled"]
    assert row["env"]["SMTP_RATE_LIMIT"] == "40"
    assert row["env"]["FLEET_SIZE"] == "2"
    assert (row["instances"], row["account_rate"], row["ideal_s"]) == (2, 40, 3.0)
    assert row["lost"] == 0
    assert row["exactly_once"] is True
    assert row["accepted_message_ids"] == row["records"]
    assert row["message_id_duplicates"] == 0
    assert 1 <= row["rounds"] <= fleet.MAX_ROUNDS
    # Every record went to exactly one instance in round 1; later rounds carry the failures.
    first = [i for i in row["invocations"] if i["round"] == 1]
    assert len(first) == 2
    assert sum(i["records"] for i in first) == row["records"]
    for round_ in range(2, row["rounds"] + 1):
        failed_before = sum(i["failed"] for i in row["invocations"] if i["round"] == round_ - 1)
        again = sum(i["records"] for i in row["invocations"] if i["round"] == round_)
        assert again == failed_before, round_
    last = [i for i in row["invocations"] if i["round"] == row["rounds"]]
    assert sum(i["failed"] for i in last) == 0
    # Each delivery was one accepted MAIL; refusals are counted apart.
    refused = row["rate_refusals"] + row["quota_refusals"]
    assert row["mail_commands"] >= row["records"] + refused
    assert row["quota_refusals"] == 0
    assert row["refused_share"] == refused / row["mail_commands"]
    checks = {check["check"] for check in results["checks"]}
    assert {"throttled: time vs ideal records / rate", "throttled: MAIL answered 454"} <= checks
    [summary] = [s for s in results["summaries"] if s["scenario"] == "throttled"]
    assert summary["ideal_ratio"] == row["ideal_ratio"] > 0
    assert summary["rounds"] == row["rounds"]


def test_ses_large_sends_the_same_records_by_smtp_and_by_the_ses_api(
    quick: tuple[str, dict[str, Any]],
) -> None:
    stdout, results = quick
    rows = {row["transport"]: row for row in results["results"] if row["scenario"] == "ses-large"}
    assert set(rows) == {"smtp", "ses"}
    for transport, row in rows.items():
        assert row["env"]["TRANSPORT"] == transport
        assert row["env"]["SMTP_RATE_LIMIT"] == "none"
        assert row["env"]["SES_MAX_INFLIGHT_BYTES"] == str(32 * 1024 * 1024)
        assert row["env"]["MAX_CONCURRENCY"] == "32"
    ses = rows["ses"]
    # Delivered = what moto's SES kept, each message carrying its whole ZIP.
    assert ses["delivered"] == ses["unique_delivered"] == ses["records"] == 6
    assert ses["min_message_bytes"] >= ses["size_bytes"] * 4 / 3
    assert ses["max_message_bytes"] >= ses["min_message_bytes"]
    assert ses["ses_max_inflight_bytes"] == 32 * 1024 * 1024
    assert ses["rss_bound_mib"] > ses["rss_before_mib"]
    checks = {check["check"] for check in results["checks"]}
    assert "ses-large: peak RSS by the SES API" in checks
    assert "SES API byte budget" in stdout
    assert "project/ses" in stdout
    assert "(ses-large/baseline: not run here, the old design sends by SMTP only)" in stdout


def test_what_moto_kept_is_counted_like_the_sink_counts() -> None:
    messages = [
        "From: a@example.com\r\nX-Video-Id: v1\r\n\r\nbody\r\nX-Video-Id: not-a-header\r\n",
        "X-VIDEO-ID:  v2 \r\nSubject: x\r\n\r\n" + "A" * 100,
        "Subject: no id\r\n\r\n",
    ]
    found = ses_sent.stats(messages)
    assert (found.messages, found.connections) == (3, 0)
    assert found.video_ids == ["v1", "v2"]
    assert found.data_bytes == sum(len(m) for m in messages)
    assert (found.min_size, found.max_size) == (len(messages[2]), len(messages[1]))
    assert ses_sent.stats([]).min_size is None


def test_previous_runs_ses_large_only_if_its_code_reads_transport(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for tree in (old, new):
        (tree / "async_notifier").mkdir(parents=True)
        (tree / "handler.py").write_text("from async_notifier import run\n")
    (old / "async_notifier" / "config.py").write_text('FALLBACK = env("FALLBACK_TRANSPORT")\n')
    (new / "async_notifier" / "config.py").write_text("transport = env.choice('TRANSPORT')\n")
    assert previous.knows_setting(new, "TRANSPORT")
    assert not previous.knows_setting(old, "TRANSPORT")
    assert previous.knows_setting(ROOT, "TRANSPORT")
    assert previous.knows_setting(ROOT, "SES_MAX_INFLIGHT_BYTES")


def test_a_fleet_shares_the_batch_and_gets_back_only_its_failures() -> None:
    records = [
        {"messageId": f"m{n}", "receiptHandle": "h", "attributes": {"ApproximateReceiveCount": "1"}}
        for n in range(5)
    ]
    assert [[r["messageId"] for r in share] for share in fleet.split(records, 2)] == [
        ["m0", "m1", "m2"],
        ["m3", "m4"],
    ]
    assert len(fleet.split(records[:1], 2)) == 1
    assert fleet.split([], 2) == []
    again = fleet.redelivered(records[0])
    assert again["attributes"]["ApproximateReceiveCount"] == "2"
    assert again["receiptHandle"] != "h"
    assert records[0]["attributes"]["ApproximateReceiveCount"] == "1"  # a copy
    response = {
        "response": {"batchItemFailures": [{"itemIdentifier": "m1"}, {"itemIdentifier": "x"}]}
    }
    assert fleet.failed_ids(response, records) == {"m1"}
    assert fleet.failed_ids({}, records) is None  # no response: the whole batch comes back
    assert fleet.failed_ids({"response": None}, records) is None


def test_a_fleet_time_sums_each_round_from_first_call_to_last_return() -> None:
    calls = [
        {"round": 1, "called_at": 10.0, "returned_at": 14.0},
        {"round": 1, "called_at": 10.5, "returned_at": 12.0},
        {"round": 2, "called_at": 20.0, "returned_at": 21.0},
    ]
    assert fleet.delivery_seconds(calls) == 5.0
    assert fleet.delivery_seconds([*calls, {"round": 2}]) is None
    assert fleet.message_id_check({"<a>": 1, "<b>": 1}, 2)["exactly_once"] is True
    twice = fleet.message_id_check({"<a>": 2, "<b>": 1}, 2)
    assert (twice["exactly_once"], twice["message_id_duplicates"]) == (False, 1)
    assert fleet.message_id_check({"<a>": 1}, 2)["exactly_once"] is False


@pytest.mark.parametrize("run", ["quick", "versus_head"])
def test_nothing_the_benchmark_started_is_left_running(
    run: str, request: pytest.FixtureRequest
) -> None:
    _, results = request.getfixturevalue(run)
    assert results["helpers"], "the benchmark should list the processes it started"
    # Our helpers and targets carry the run's work dir on their command line; moto its port.
    leftovers = _running(re.escape(results["work_dir"]))
    for helper in results["helpers"]:
        if helper["name"] == "moto":
            port = helper["command"][-1]
            leftovers += _running(rf"moto_server -H 127\.0\.0\.1 -p {port}( |$)")
    assert leftovers == []


def test_versus_head_interleaves_both_trees_and_delivers_every_record(
    versus_head: tuple[str, dict[str, Any]],
) -> None:
    _, results = versus_head
    assert results["ok"] is True
    order = [(row["scenario"], row["target"], row["run"]) for row in results["results"]]
    # Round 1: previous then project; round 2 the other way round.
    assert order == [
        ("remote", "previous", 1),
        ("remote", "project", 1),
        ("remote", "project", 2),
        ("remote", "previous", 2),
    ]
    work = Path(results["work_dir"])
    trees = {"previous": work / "previous", "project": work / "code"}
    for row in results["results"]:
        _assert_delivered(row)
        # Each target ran the handler of its own tree (and, checked by the child, nothing
        # of another tree's package: that would be an error in the row).
        assert Path(row["module_file"]).parent == trees[row["target"]], row["target"]
        assert row["pool_size"] == 8


def test_versus_head_reports_the_comparison_with_the_resolved_commit(
    versus_head: tuple[str, dict[str, Any]],
) -> None:
    stdout, results = versus_head
    sha = _head()
    previous = results["previous"]
    assert (previous["ref"], previous["sha"]) == ("HEAD", sha)
    assert sha.startswith(previous["short_sha"])
    assert previous["code"]["files"] > 1  # a fingerprint of the tree taken from HEAD
    comparison = results["comparison"]
    assert (comparison["ref"], comparison["sha"]) == ("HEAD", sha)
    [remote] = comparison["scenarios"]
    assert remote["scenario"] == "remote"
    assert remote["runs"] == {"project": 2, "previous": 2}
    for key in ("records_per_s", "mib_per_s", "peak_rss"):
        assert remote[key] > 0, key
    assert remote["limit_share"]["project"] > 0
    assert remote["limit_share"]["previous"] > 0
    assert comparison["import_handler"]["ratio"] > 0
    medians = {(s["scenario"], s["target"]): s for s in results["summaries"]}
    assert set(medians) == {("remote", "previous"), ("remote", "project")}
    assert all(summary["measured"] == 2 for summary in medians.values())
    assert results["ratios"] == []  # no baseline in this run
    assert f"project vs previous (HEAD, {previous['short_sha']})" in stdout
    assert f"previous@{previous['short_sha']} #2" in stdout
    assert "ERROR" not in stdout


def test_targets_default_to_baseline_and_project_or_to_the_comparison() -> None:
    assert parse_targets(None, vs=None) == ("baseline", "project")
    assert parse_targets("both", vs=None) == ("baseline", "project")
    assert parse_targets(None, vs="HEAD") == ("previous", "project")
    assert parse_targets("project, previous,baseline", vs="HEAD") == (
        "baseline",
        "previous",
        "project",
    )
    for text, vs in (("previous", None), ("baseline,project", "HEAD"), ("proj", None)):
        with pytest.raises(ValueError, match=r"target|--vs"):
            parse_targets(text, vs=vs)


def test_rounds_alternate_which_target_goes_first() -> None:
    targets = ("previous", "project")
    assert [interleaved(targets, n) for n in range(3)] == [
        ("previous", "project"),
        ("project", "previous"),
        ("previous", "project"),
    ]


def test_a_ref_that_is_not_a_commit_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--vs", "no-such-ref-anywhere"])
    assert exited.value.code == 2
    assert "not a commit" in capsys.readouterr().err
    args = parse_args(["--vs", "HEAD"])
    assert args.previous.sha == _head()
    assert args.targets == ("previous", "project")


def test_medians_and_spread_of_repeated_runs() -> None:
    rows = [
        {"scenario": "small", "target": "project", "ok": True, "wall_s": wall,
         "records_per_s": 100 / wall, "mib_per_s": 1 / wall, "peak_rss_mib": rss}
        for wall, rss in ((2.0, 70.0), (1.0, 80.0), (4.0, 60.0))
    ]  # fmt: skip
    rows.append({"scenario": "small", "target": "project", "ok": False, "errors": ["x"]})
    [summary] = compare.summarize(rows)
    assert (summary["runs"], summary["measured"], summary["ok"]) == (4, 3, False)
    assert summary["wall_s"] == 2.0
    assert summary["records_per_s"] == 50.0
    assert summary["peak_rss_mib"] == 70.0
    assert summary["spread"]["records_per_s"] == {"min": 25.0, "max": 100.0, "relative": 1.5}


def test_only_modules_of_the_tree_count_as_its_own(tmp_path: Path) -> None:
    # This interpreter imported `bench` from the repository: for a tree that has its own
    # `bench` package, that is code from elsewhere; for the repository itself it is not.
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    strays = _stray_modules(str(tmp_path))
    assert any(stray.startswith("bench.target ") for stray in strays)
    assert _stray_modules(str(ROOT)) == []


def test_callgrind_counts_are_read_and_compared(tmp_path: Path) -> None:
    """`--callgrind`: the count is callgrind's own `totals:` line, from a real valgrind run
    of a small program, and the report compares the targets' medians."""
    from bench import report
    from bench.run import callgrind_total

    out = tmp_path / "callgrind.out"
    subprocess.run(
        ["valgrind", "--tool=callgrind", "--quiet", f"--callgrind-out-file={out}", "true"],
        check=True,
        timeout=120,
    )
    counted = callgrind_total(out)
    assert counted is not None
    assert counted > 10_000
    assert callgrind_total(tmp_path / "missing.out") is None
    assert parse_args(["--callgrind"]).callgrind is True

    def row(target: str, run: int, instructions: int) -> dict[str, Any]:
        return {"scenario": "small", "target": target, "run": run, "records": 400,
                "instructions": instructions}  # fmt: skip

    rows = [row("previous", 1, 1_000_000), row("project", 1, 1_030_000),
            row("previous", 2, 1_000_200), row("project", 2, 1_029_800)]  # fmt: skip
    results = {"results": rows, "previous": None, "settings": {"repeat": 2}}
    text = "\n".join(report._instructions(results))
    assert "1,030,000" in text
    assert "2,575" in text  # per record
    assert "small: project executes 1.030x the instructions of previous" in text
