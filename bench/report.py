"""Turn the measured rows into the JSON document and the text table.

Derived numbers:
- ratio project/baseline per scenario: records/s, MiB/s and peak RSS;
- protocol limit of a delayed SMTP server: `pool_size / (round_trips x smtp_delay)` messages
  per second (see README.md for why one round trip per message is the default), and the
  project's fraction of it, also shown against two round trips per message; for every
  project row with an SMTP delay (`remote`, cold, and `remote-warm`, warm);
- memory flatness: the project's peak RSS in `scale` against `small`, and its growth during
  the call (peak minus the RSS just before it);
- the targets of issue 5, each marked met or not (informational: never the exit status).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Any

from .scenarios import Scenario, human_size

SCHEMA = 1


def machine() -> dict[str, Any]:
    cpu_model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_total_kib = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    mem_total_kib = int(line.split()[1])
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "nproc": affinity or os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model or platform.processor() or None,
        "mem_total_gib": round(mem_total_kib / 1024 / 1024, 1) if mem_total_kib else None,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def code_fingerprint(root: Path) -> dict[str, Any]:
    """Which code was measured: a hash of the handler, the package and the templates.

    The benchmark runs a copy of the working tree, not a commit; this identifies it.
    """
    files = sorted(
        path
        for pattern in (
            "handler.py",
            "async_notifier/**/*.py",
            "templates/**/*",
            "requirements.txt",
        )
        for path in root.glob(pattern)
        if path.is_file() and "__pycache__" not in path.parts
    )
    digest = hashlib.sha256()
    newest = 0.0
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
        newest = max(newest, path.stat().st_mtime)
    return {
        "sha256": digest.hexdigest()[:16],
        "files": len(files),
        "newest_change": dt.datetime.fromtimestamp(newest, dt.UTC).isoformat(timespec="seconds"),
    }


def _row(rows: list[dict[str, Any]], scenario: str, target: str) -> dict[str, Any] | None:
    for row in rows:
        if row["scenario"] == scenario and row["target"] == target and "wall_s" in row:
            return row
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def build(
    *,
    args: argparse.Namespace,
    scenarios: list[Scenario],
    rows: list[dict[str, Any]],
    imports: dict[str, Any] | None,
    started: dt.datetime,
    duration_s: float,
    helpers: list[dict[str, Any]],
    code: dict[str, Any],
    load_average: list[float] | None = None,
) -> dict[str, Any]:
    ratios = []
    for scenario in scenarios:
        project, baseline = (
            _row(rows, scenario.name, "project"),
            _row(rows, scenario.name, "baseline"),
        )
        if project and baseline:
            ratios.append(
                {
                    "scenario": scenario.name,
                    "records_per_s": _ratio(project["records_per_s"], baseline["records_per_s"]),
                    "mib_per_s": _ratio(project["mib_per_s"], baseline["mib_per_s"]),
                    "peak_rss": _ratio(project["peak_rss_mib"], baseline["peak_rss_mib"]),
                }
            )
    limits = []
    for row in rows:
        if row["target"] == "project" and row["smtp_delay_ms"] > 0 and "wall_s" in row:
            delay = row["smtp_delay_ms"] / 1000
            limit = row["pool_size"] / (args.round_trips * delay)
            limits.append(
                {
                    "scenario": row["scenario"],
                    "pool_size": row["pool_size"],
                    "smtp_delay_ms": row["smtp_delay_ms"],
                    "round_trips": args.round_trips,
                    "limit_records_per_s": limit,
                    "project_records_per_s": row["records_per_s"],
                    "fraction": row["records_per_s"] / limit,
                    "limit_2rt_records_per_s": row["pool_size"] / (2 * delay),
                    "fraction_2rt": row["records_per_s"] / (row["pool_size"] / (2 * delay)),
                    "warm": bool(row.get("warmup_records")),
                }
            )
    scale = None
    small_row, scale_row = _row(rows, "small", "project"), _row(rows, "scale", "project")
    if small_row and scale_row:
        scale = {
            "small_peak_rss_mib": small_row["peak_rss_mib"],
            "scale_peak_rss_mib": scale_row["peak_rss_mib"],
            "change": scale_row["peak_rss_mib"] / small_row["peak_rss_mib"] - 1,
            "small_rss_before_mib": small_row["rss_before_mib"],
            "scale_rss_before_mib": scale_row["rss_before_mib"],
            "small_growth_in_call_mib": small_row["peak_rss_mib"] - small_row["rss_before_mib"],
            "scale_growth_in_call_mib": scale_row["peak_rss_mib"] - scale_row["rss_before_mib"],
        }
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": duration_s,
        "argv": sys.argv[1:],
        "quick": bool(args.quick),
        "machine": machine(),
        "load_average_at_start": load_average,
        "code": code,
        "settings": {
            "pool_size": args.pool_size,
            "round_trips": args.round_trips,
            "sink": args.sink,
            "target": args.target,
            "env": args.env,
        },
        "scenarios": [dataclasses.asdict(s) for s in scenarios],
        "imports": imports,
        "results": rows,
        "ratios": ratios,
        "protocol_limits": limits,
        "scale": scale,
        "helpers": helpers,
    }
    results["checks"] = checks(results)
    return results


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The measurable targets of issue 5, where this run has the rows to judge them."""
    rows = results["results"]
    ratios = {r["scenario"]: r for r in results["ratios"]}
    found: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, met: bool | None, shown: str) -> None:
        if value is not None:
            found.append({"check": name, "goal": goal, "value": value, "shown": shown, "met": met})

    if (r := ratios.get("small")) and r["records_per_s"] is not None:
        v = r["records_per_s"]
        add("small: records/s vs baseline", v, ">= 3x", v >= 3, f"{v:.1f}x")
    if (row := _row(rows, "large", "project")) is not None:
        v = row["peak_rss_mib"]
        add("large: project peak RSS", v, "<= 128 MiB", v <= 128, f"{v:.0f} MiB")
    if (r := ratios.get("large")) and r["mib_per_s"] is not None:
        v = r["mib_per_s"]
        add("large: MiB/s vs baseline", v, ">= 1x", v >= 1, f"{v:.2f}x")
    if (r := ratios.get("remote")) and r["records_per_s"] is not None:
        v = r["records_per_s"]
        add("remote: records/s vs baseline", v, ">= 25x", v >= 25, f"{v:.1f}x")
    for name in ("remote", "remote-warm"):
        for limit in results["protocol_limits"]:
            if limit["scenario"] == name:
                v = limit["fraction"]
                add(
                    f"{name}: share of protocol limit",
                    v,
                    f">= 85% of {limit['limit_records_per_s']:.0f}/s",
                    v >= 0.85,
                    f"{v:.0%}",
                )
    if (scale := results["scale"]) is not None:
        v = scale["change"]
        add("scale: peak RSS vs small", v, "within 15%", abs(v) <= 0.15, f"{v:+.0%}")
        if scale["small_growth_in_call_mib"] > 0:
            v = scale["scale_growth_in_call_mib"] / scale["small_growth_in_call_mib"] - 1
            add("scale: growth in call vs small", v, "within 15%", abs(v) <= 0.15, f"{v:+.0%}")
    if results["imports"] is not None:
        v = results["imports"]["ratio"]
        add("import handler vs import aioboto3", v, "<= 1.2x", v <= 1.2, f"{v:.2f}x")
    return found


def profile_summary(path: Path, records: int, top: int = 30) -> str:
    """The costliest functions of a cProfile run, by own time and by cumulative time."""
    import io
    import pstats

    out = io.StringIO()
    out.write(f"cProfile of the project's lambda_handler call, {records} records ({path.name})\n")
    out.write("Timings are inflated by the profiler; compare functions, not totals.\n")
    stats = pstats.Stats(str(path), stream=out)
    stats.strip_dirs()
    for key in ("tottime", "cumulative"):
        out.write(f"\n==== top {top} by {key}\n")
        stats.sort_stats(key).print_stats(top)
    return out.getvalue()


# --------------------------------------------------------------------------- text


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _table(headers: list[str], body: list[list[str]], right: set[int]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in body)]


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        f"async_notifier benchmark{' (quick)' if results['quick'] else ''}: "
        f"{m['nproc']} CPU(s) {m['cpu_model'] or ''}, {m['mem_total_gib']} GiB, "
        f"Python {m['python']}; SMTP pool {results['settings']['pool_size']}, "
        f"sink {results['settings']['sink']}; {results['duration_s']:.0f} s in all",
        f"code {results['code']['sha256']} (newest file {results['code']['newest_change']}, "
        "run from a copy taken at start), load average at start "
        + _fmt((results["load_average_at_start"] or [None])[0], ".2f"),
        "",
    ]
    if results["code"].get("working_tree_changed"):
        out[-1:] = [
            "NOTE: the working tree changed during the run; the numbers are for the copy "
            f"taken at start ({results['code']['sha256']}).",
            "",
        ]
    headers = [
        "scenario", "target", "records", "size", "delay ms", "wall s", "records/s",
        "MiB/s", "peak RSS MiB", "SMTP conns", "import ms", "CPU ms/rec", "status",
    ]  # fmt: skip
    body = []
    for row in results["results"]:
        delay = (
            f"{row['smtp_delay_ms']:g}/{row['s3_delay_ms']:g}"
            if row["smtp_delay_ms"] or row["s3_delay_ms"]
            else "-"
        )
        body.append(
            [
                row["scenario"],
                row["target"],
                str(row["records"]),
                human_size(row["size_bytes"]),
                delay,
                _fmt(row.get("wall_s"), ".2f"),
                _fmt(row.get("records_per_s"), ".1f"),
                _fmt(row.get("mib_per_s"), ".1f"),
                _fmt(row.get("peak_rss_mib"), ".0f"),
                _fmt(row.get("smtp_connections"), "d"),
                _fmt(row.get("import_ms"), ".0f"),
                _fmt(row.get("cpu_ms_per_record"), ".2f"),
                ("ok" if row["ok"] else "ERROR") + (" (profiled)" if row.get("profiled") else ""),
            ]
        )
    out += _table(headers, body, right=set(range(2, 12)))
    out.append("(delay ms = SMTP/S3; peak RSS = VmHWM of the target during the call)")
    for row in results["results"]:
        if row.get("warmup_records"):
            out.append(
                f"({row['scenario']}/{row['target']}: the process's second invocation, after a "
                f"warm-up of {row['warmup_records']} records that took "
                f"{_fmt(row.get('warmup_wall_s'), '.2f')} s; the row is the second call's)"
            )
    out += ["", "CPU seconds during each run (whole target process incl. start-up; helpers):"]
    body = []
    noisy = []
    for row in results["results"]:
        helpers = row.get("helper_cpu_s") or {}
        body.append(
            [
                row["scenario"],
                row["target"],
                _fmt(row.get("process_wall_s"), ".2f"),
                _fmt(row.get("target_process_cpu_s"), ".2f"),
                _fmt(helpers.get("moto"), ".2f"),
                _fmt(helpers.get("sink"), ".2f"),
                _fmt(helpers.get("proxy"), ".2f"),
                _fmt(row.get("other_cpu_s"), ".2f"),
            ]
        )
        share = row.get("other_cpu_share")
        if share is not None and share > 0.10:
            noisy.append(f"{row['scenario']}/{row['target']} ({share:.0%})")
    out += _table(
        ["scenario", "target", "process s", "target", "moto", "sink", "proxy", "others"],
        body,
        right=set(range(2, 8)),
    )
    if noisy:
        out.append(
            "NOTE: other processes on this machine used over 10% of its CPUs during "
            + ", ".join(noisy)
            + "; those numbers are disturbed."
        )
    if results["ratios"]:
        out += ["", "project / baseline:"]
        body = [
            [
                r["scenario"],
                _fmt(r["records_per_s"], ".1f") + "x",
                _fmt(r["mib_per_s"], ".1f") + "x",
                _fmt(r["peak_rss"], ".2f") + "x",
            ]
            for r in results["ratios"]
        ]
        out += _table(["scenario", "records/s", "MiB/s", "peak RSS"], body, right={1, 2, 3})
    trips = []
    for row in results["results"]:
        if row.get("smtp_round_trips_per_message") is not None:
            s3 = row.get("s3_round_trips")
            warm = row.get("warmup_records") or 0
            trips.append(
                f"  {row['scenario']}/{row['target']}: "
                f"{row['smtp_round_trips_per_message']:.2f} per message"
                + (f"; S3: {s3 / (row['records'] + warm):.2f} per record" if s3 else "")
                + (f" (over both calls: {row['records']} + {warm} warm-up records)" if warm else "")
            )
    if trips:
        out += [
            "",
            "SMTP round trips (client turns seen by the proxy, set-up and QUIT included; "
            "over every message of the run, a warm-up's too):",
        ]
        out += trips
    for limit in results["protocol_limits"]:
        out += [
            "",
            f"{limit['scenario']}: protocol limit = pool / (round trips x SMTP delay) = "
            f"{limit['pool_size']} / ({limit['round_trips']:g} x "
            f"{limit['smtp_delay_ms'] / 1000:g} s) = {limit['limit_records_per_s']:.0f} "
            f"records/s; project "
            f"{limit['project_records_per_s']:.1f} records/s = {limit['fraction']:.0%} of it",
            f"  (with 2 round trips per message, i.e. waiting for the final 250 before the next "
            f"MAIL: {limit['limit_2rt_records_per_s']:.0f} records/s, project at "
            f"{limit['fraction_2rt']:.0%})",
        ]
    if (scale := results["scale"]) is not None:
        out += [
            "",
            f"memory flatness: project peak RSS {scale['scale_peak_rss_mib']:.0f} MiB in scale vs "
            f"{scale['small_peak_rss_mib']:.0f} MiB in small ({scale['change']:+.0%}); "
            f"before the call {scale['scale_rss_before_mib']:.0f} vs "
            f"{scale['small_rss_before_mib']:.0f} MiB (event and libraries), growth during the "
            f"call {scale['scale_growth_in_call_mib']:.0f} vs "
            f"{scale['small_growth_in_call_mib']:.0f} MiB",
        ]
    if (imports := results["imports"]) is not None:
        out += [
            "",
            f"import time (median of {imports['samples']} fresh interpreters): import handler "
            f"{imports['handler_ms']:.0f} ms, import aioboto3 {imports['aioboto3_ms']:.0f} ms, "
            f"ratio {imports['ratio']:.2f}",
        ]
    if results["checks"]:
        out += [
            "",
            "targets of issue 5"
            + (" (quick mode: indicative only)" if results["quick"] else "")
            + ":",
        ]
        body = [
            [c["check"], c["goal"], c["shown"], "met" if c["met"] else "NOT met"]
            for c in results["checks"]
        ]
        out += _table(["check", "goal", "measured", ""], body, right=set())
    errors = [(r["scenario"], r["target"], e) for r in results["results"] for e in r["errors"]]
    if errors or not results["ok"]:
        out += ["", "ERRORS:"]
        out += [f"  {s}/{t}: {e}" for s, t, e in errors] or ["  the run did not complete"]
    return "\n".join(out)
