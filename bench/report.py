"""Turn the measured rows into the JSON document and the text table.

Derived numbers, all from the median of a target's runs in a scenario (`--repeat`; with one
run, that run's numbers):
- ratio project/baseline per scenario: records/s, MiB/s and peak RSS;
- with `--vs REF`, ratio project/previous per scenario, the same three, with each
  target's spread and share of the protocol limit (`compare.py`);
- protocol limit of a delayed SMTP server: `pool_size / (round_trips x smtp_delay)` messages
  per second (see README.md for why one round trip per message is the default), and the
  project's fraction of it, also shown against two round trips per message; for every
  project (and previous) row with an SMTP delay (`remote`, cold, and `remote-warm`, warm);
- memory flatness: the project's peak RSS in `scale` against `small`, and its growth during
  the call (peak minus the RSS just before it);
- fleet pacing (`throttled`): the time a fleet took to deliver everything against the
  ideal records / account rate, and the share of MAIL commands the account refused;
- the SES API's byte budget (`ses-large`): each row's peak RSS beside the SES row's bound,
  the RSS before the call + SES_MAX_INFLIGHT_BYTES + one message's footprint;
- the performance targets, each marked met or not (informational: never the exit status).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from . import compare
from .scenarios import HANDLERS, Scenario, human_size

# 2: `--repeat` and `--vs`: rows have `run`; `summaries`, `previous` and `comparison`;
# `protocol_limits` have `target`; ratios, limits, scale and checks use the medians.
SCHEMA = 2


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
    previous: dict[str, Any] | None = None,
    skipped: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    summaries = compare.summarize(rows)
    limits = protocol_limits(summaries, args.round_trips)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": duration_s,
        "argv": sys.argv[1:],
        "quick": bool(args.quick),
        "machine": machine(),
        "load_average_at_start": load_average,
        "code": code,
        "previous": previous,
        "settings": {
            "pool_size": args.pool_size,
            "round_trips": args.round_trips,
            "sink": args.sink,
            "target": ",".join(args.targets),
            "vs": args.vs,
            "repeat": args.repeat,
            "env": args.env,
        },
        "scenarios": [dataclasses.asdict(s) for s in scenarios],
        "imports": imports,
        "results": rows,
        "skipped": skipped or [],
        "summaries": summaries,
        "ratios": baseline_ratios(scenarios, summaries),
        "comparison": (
            compare.comparison(summaries, limits, imports, previous) if previous else None
        ),
        "protocol_limits": limits,
        "scale": memory_flatness(summaries),
        "cold_start": cold_start(summaries),
        "helpers": helpers,
    }
    results["checks"] = checks(results)
    return results


def baseline_ratios(
    scenarios: list[Scenario], summaries: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """project / baseline per scenario where both have numbers."""
    ratios = []
    for scenario in scenarios:
        project = compare.find(summaries, scenario.name, "project")
        baseline = compare.find(summaries, scenario.name, "baseline")
        if project and baseline:
            ratios.append(
                {
                    "scenario": scenario.name,
                    "records_per_s": compare.ratio(
                        project["records_per_s"], baseline["records_per_s"]
                    ),
                    "mib_per_s": compare.ratio(project["mib_per_s"], baseline["mib_per_s"]),
                    "peak_rss": compare.ratio(project["peak_rss_mib"], baseline["peak_rss_mib"]),
                }
            )
    return ratios


def protocol_limits(summaries: list[dict[str, Any]], round_trips: float) -> list[dict[str, Any]]:
    """The SMTP protocol limit of each delayed handler run, and its share of it."""
    limits = []
    for row in summaries:
        if row["target"] in HANDLERS and row["smtp_delay_ms"] > 0 and "wall_s" in row:
            delay = row["smtp_delay_ms"] / 1000
            limit = row["pool_size"] / (round_trips * delay)
            limits.append(
                {
                    "scenario": row["scenario"],
                    "target": row["target"],
                    "pool_size": row["pool_size"],
                    "smtp_delay_ms": row["smtp_delay_ms"],
                    "round_trips": round_trips,
                    "limit_records_per_s": limit,
                    "records_per_s": row["records_per_s"],
                    "fraction": row["records_per_s"] / limit,
                    "limit_2rt_records_per_s": row["pool_size"] / (2 * delay),
                    "fraction_2rt": row["records_per_s"] / (row["pool_size"] / (2 * delay)),
                    "warm": bool(row.get("warmup_records")),
                }
            )
    return limits


def cold_start(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A cold process, as Lambda reports it: its init (the handler's import, `Init
    Duration`) and its first invocation (`Duration`), beside the warm row (`remote` against
    `remote-warm`), for each handler target that ran both."""
    found = []
    for target in HANDLERS:
        cold = compare.find(summaries, "remote", target)
        warm = compare.find(summaries, "remote-warm", target)
        if not (cold and warm and cold.get("records_per_s") and warm.get("records_per_s")):
            continue
        found.append(
            {
                "target": target,
                "init_ms": cold["import_ms"],
                "first_invocation_s": cold["wall_s"],
                "first_records_per_s": cold["records_per_s"],
                "warm_records_per_s": warm["records_per_s"],
                "share_of_warm": cold["records_per_s"] / warm["records_per_s"],
            }
        )
    return found


def memory_flatness(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The project's peak RSS in scale against small, and the growth during each call."""
    small_row = compare.find(summaries, "small", "project")
    scale_row = compare.find(summaries, "scale", "project")
    if not (small_row and scale_row):
        return None
    return {
        "small_peak_rss_mib": small_row["peak_rss_mib"],
        "scale_peak_rss_mib": scale_row["peak_rss_mib"],
        "change": scale_row["peak_rss_mib"] / small_row["peak_rss_mib"] - 1,
        "small_rss_before_mib": small_row["rss_before_mib"],
        "scale_rss_before_mib": scale_row["rss_before_mib"],
        "small_growth_in_call_mib": small_row["peak_rss_mib"] - small_row["rss_before_mib"],
        "scale_growth_in_call_mib": scale_row["peak_rss_mib"] - scale_row["rss_before_mib"],
    }


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The measurable performance targets, where this run has the rows to judge them."""
    summaries = results["summaries"]
    ratios = {r["scenario"]: r for r in results["ratios"]}
    found: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, met: bool | None, shown: str) -> None:
        if value is not None:
            found.append({"check": name, "goal": goal, "value": value, "shown": shown, "met": met})

    if (r := ratios.get("small")) and r["records_per_s"] is not None:
        v = r["records_per_s"]
        add("small: records/s vs baseline", v, ">= 3x", v >= 3, f"{v:.1f}x")
    if (row := compare.find(summaries, "large", "project")) is not None:
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
            if limit["scenario"] == name and limit["target"] == "project":
                v = limit["fraction"]
                add(
                    f"{name}: share of protocol limit",
                    v,
                    f">= 85% of {limit['limit_records_per_s']:.0f}/s",
                    v >= 0.85,
                    f"{v:.0%}",
                )
    for cold in results["cold_start"]:
        if cold["target"] == "project":
            v = cold["share_of_warm"]
            add("remote: first invocation vs warm", v, ">= 85% of warm", v >= 0.85, f"{v:.0%}")
    if (scale := results["scale"]) is not None:
        v = scale["change"]
        add("scale: peak RSS vs small", v, "within 15%", abs(v) <= 0.15, f"{v:+.0%}")
        if scale["small_growth_in_call_mib"] > 0:
            v = scale["scale_growth_in_call_mib"] / scale["small_growth_in_call_mib"] - 1
            add("scale: growth in call vs small", v, "within 15%", abs(v) <= 0.15, f"{v:+.0%}")
    for row in summaries:
        if row["target"] == "project" and row.get("ideal_ratio") is not None:
            v = row["ideal_ratio"]
            add(
                f"{row['scenario']}: time vs ideal records / rate",
                v,
                f"<= 1.1x of {row['ideal_s']:.2f} s",
                v <= 1.1,
                f"{v:.2f}x",
            )
            v = row["refused_share"]
            add(f"{row['scenario']}: MAIL answered 454", v, "<= 1%", v <= 0.01, f"{v:.1%}")
    for row in summaries:
        if row["target"] == "project" and row.get("rss_bound_mib") is not None:
            v, bound = row["peak_rss_mib"], row["rss_bound_mib"]
            add(
                f"{row['scenario']}: peak RSS by the SES API",
                v,
                f"<= {bound:.0f} MiB (before + budget + 1 message)",
                v <= bound,
                f"{v:.0f} MiB",
            )
    if results["imports"] is not None and "ratio" in results["imports"]:
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


def label(row: dict[str, Any], results: dict[str, Any], *, run: bool = True) -> str:
    """A row's target as the tables show it: `previous@<sha>` for the tree at --vs, and the
    run's number when there are several."""
    text = row["target"]
    if text == "previous" and results.get("previous"):
        text += "@" + results["previous"]["short_sha"]
    if row.get("transport"):
        text += "/" + row["transport"]
    if run and results["settings"]["repeat"] > 1 and "run" in row:
        text += f" #{row['run']}"
    return str(text)


def render(results: dict[str, Any]) -> str:
    sections = (
        _header,
        _runs,
        _fleet,
        _ses_budget,
        _medians,
        _cpu,
        _instructions,
        _baseline_ratios,
        _comparison,
        _round_trips,
        _limits,
        _cold_start,
        _flatness,
        _imports,
        _checks,
        _errors,
    )
    out: list[str] = []
    for section in sections:
        out += section(results)
    return "\n".join(out)


def _header(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    out = [
        f"async_notifier benchmark{' (quick)' if results['quick'] else ''}: "
        f"{m['nproc']} CPU(s) {m['cpu_model'] or ''}, {m['mem_total_gib']} GiB, "
        f"Python {m['python']}; SMTP pool {results['settings']['pool_size']}, "
        f"sink {results['settings']['sink']}; {results['duration_s']:.0f} s in all",
        f"code {results['code']['sha256']} (newest file {results['code']['newest_change']}, "
        "run from a copy taken at start), load average at start "
        + _fmt((results["load_average_at_start"] or [None])[0], ".2f"),
    ]
    if (previous := results.get("previous")) is not None:
        subject = previous["subject"]
        if len(subject) > 60:
            subject = subject[:57] + "..."
        out.append(
            f"previous = {previous['ref']} = {previous['short_sha']} ({subject}), code "
            f"{previous['code']['sha256']}: git archive of that commit, run with this harness "
            "and venv"
        )
        if not previous["same_requirements"]:
            out.append(
                "NOTE: requirements.txt differs between the two trees; both ran with this venv's "
                "packages."
            )
    if (repeat := results["settings"]["repeat"]) > 1:
        out.append(
            f"{repeat} runs per target and scenario, interleaved (each round reverses the "
            "order of the last); the comparisons use medians"
        )
    if results["code"].get("working_tree_changed"):
        out.append(
            "NOTE: the working tree changed during the run; the numbers are for the copy "
            f"taken at start ({results['code']['sha256']})."
        )
    return [*out, ""]


def _delay(row: dict[str, Any]) -> str:
    if row["smtp_delay_ms"] or row["s3_delay_ms"]:
        return f"{row['smtp_delay_ms']:g}/{row['s3_delay_ms']:g}"
    return "-"


def _runs(results: dict[str, Any]) -> list[str]:
    headers = [
        "scenario", "target", "records", "size", "delay ms", "wall s", "records/s",
        "MiB/s", "peak RSS MiB", "SMTP conns", "import ms", "CPU ms/rec", "status",
    ]  # fmt: skip
    body = []
    for row in results["results"]:
        body.append(
            [
                row["scenario"],
                label(row, results),
                str(row["records"]),
                human_size(row["size_bytes"]),
                _delay(row),
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
    out = _table(headers, body, right=set(range(2, 12)))
    out.append("(delay ms = SMTP/S3; peak RSS = VmHWM of the target during the call)")
    if (previous := results.get("previous")) is not None:
        out.append(
            f"(previous@{previous['short_sha']} = handler.lambda_handler of {previous['ref']}; "
            "project = the working tree)"
        )
    for row in results["results"]:
        if row.get("warmup_records"):
            out.append(
                f"({row['scenario']}/{label(row, results)}: the process's second invocation, "
                f"after a warm-up of {row['warmup_records']} records that took "
                f"{_fmt(row.get('warmup_wall_s'), '.2f')} s; the row is the second call's)"
            )
    return out


def _fleet(results: dict[str, Any]) -> list[str]:
    """The runs of a fleet against an account (`throttled`): pacing, refusals, rounds."""
    rows = [row for row in results["results"] if row.get("account_rate")]
    if not rows:
        return []
    first = rows[0]
    out = [
        "",
        f"fleet pacing: {first['instances']} instances (concurrent processes, each its share "
        f"of the batch) against one account of {first['account_rate']:g} messages/s; each "
        f"with SMTP_RATE_LIMIT={first['account_rate']:g} FLEET_SIZE={first['instances']} and "
        f"a Lambda timeout of {first['invocation_timeout_s']:g} s; failed records redelivered, "
        "round after round:",
    ]
    body = [
        [
            row["scenario"],
            label(row, results),
            str(row["records"]),
            _fmt(row["ideal_s"], ".2f"),
            _fmt(row.get("wall_s"), ".2f"),
            _fmt(row.get("ideal_ratio"), ".2f") + "x",
            _fmt(row.get("mail_commands"), "d"),
            _fmt(row.get("rate_refusals"), "d"),
            _fmt(row.get("refused_share"), ".1%"),
            _fmt(row.get("rounds"), "d"),
            _yes_no(row.get("exactly_once")),
            _fmt(row.get("lost"), "d"),
        ]
        for row in rows
    ]
    headers = [
        "scenario", "target", "records", "ideal s", "took s", "x ideal", "MAIL", "454 rate",
        "454 share", "rounds", "once", "lost",
    ]  # fmt: skip
    out += _table(headers, body, right=set(range(2, 12)))
    out += [
        "(ideal = records / account rate; took = each round's span, from its first call to its "
        "last return, summed: the",
        " wait between rounds, SQS's visibility timeout, is not counted, and the account's "
        "bucket refills meanwhile; 454 share = of",
        " every MAIL, the quota's 454s included; once = every Message-ID accepted exactly once; "
        "goals: <= 1.1x ideal, <= 1% 454)",
    ]
    if "baseline" in results["settings"]["target"].split(","):
        out.append(
            "(baseline: not run here, the old design reads neither SMTP_RATE_LIMIT nor "
            "FLEET_SIZE: it has no pacing to measure)"
        )
    return out


def _ses_budget(results: dict[str, Any]) -> list[str]:
    """The runs of a scenario with the SES API (`ses-large`): memory against the budget."""
    rows = [row for row in results["results"] if row.get("transport")]
    notes = [
        f"({s['scenario']}/{s['target']}: not run here, {s['why']})"
        for s in results.get("skipped", [])
    ]
    if not rows:
        return ["", *notes] if notes else []
    out = [
        "",
        "SES API byte budget: the same records by SMTP (streamed from disk) and by the SES API "
        "(each message whole in memory, and botocore's copies of its base64):",
    ]
    body = []
    for row in rows:
        env = row.get("env", {})
        bound = row.get("rss_bound_mib")
        peak = row.get("peak_rss_mib")
        before = row.get("rss_before_mib")
        budget = env.get("SES_MAX_INFLIGHT_BYTES")
        body.append(
            [
                row["scenario"],
                label(row, results),
                f"{row.get('delivered', 0)}/{row['records']}",
                human_size(int(budget)) if budget and row["transport"] == "ses" else "-",
                env.get("MAX_CONCURRENCY", "-"),
                _fmt(before, ".0f"),
                _fmt(peak, ".0f"),
                _fmt(peak - before if peak is not None and before is not None else None, ".0f"),
                _fmt(row.get("message_footprint_mib"), ".0f"),
                _fmt(bound, ".0f"),
                "-" if bound is None or peak is None else "met" if peak <= bound else "NOT met",
            ]
        )
    headers = [
        "scenario", "target", "delivered", "budget", "concurrency", "RSS before", "peak RSS",
        "growth", "1 message", "bound", "goal",
    ]  # fmt: skip
    out += _table(headers, body, right=set(range(2, 10)))
    out += [
        "(MiB; delivered = messages the SMTP sink, or moto's SES, kept of the batch; 1 message = "
        "the largest message's footprint as the",
        " budget counts it, its bytes + 4 copies of their base64; "
        "bound = RSS before + budget + 1 message: "
        "the budget holds at most its bytes, and one",
        " more message's worth is the slack of what is being freed as the next is read; "
        "reported, not enforced)",
    ]
    return out + notes


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "NO"


def _medians(results: dict[str, Any]) -> list[str]:
    if results["settings"]["repeat"] < 2:
        return []
    headers, body = compare.median_table(
        results["summaries"], lambda row: label(row, results, run=False)
    )
    return [
        "",
        "medians per scenario and target (min-max):",
        *_table(headers, body, {2, 3, 4, 5, 6}),
    ]


def _cpu(results: dict[str, Any]) -> list[str]:
    out = ["", "CPU seconds during each run (whole target process incl. start-up; helpers):"]
    body = []
    noisy = []
    for row in results["results"]:
        helpers = row.get("helper_cpu_s") or {}
        body.append(
            [
                row["scenario"],
                label(row, results),
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
            noisy.append(f"{row['scenario']}/{label(row, results)} ({share:.0%})")
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
    return out


def _instructions(results: dict[str, Any]) -> list[str]:
    """`--callgrind`: each target process's instructions, and project against previous."""
    rows = [row for row in results["results"] if row.get("instructions")]
    if not rows:
        return []
    out = ["", "instructions (callgrind; whole target process incl. start-up):"]
    out += _table(
        ["scenario", "target", "instructions", "per record"],
        [
            [
                row["scenario"],
                label(row, results),
                f"{row['instructions']:,}",
                f"{row['instructions'] / max(row.get('records') or 1, 1):,.0f}",
            ]
            for row in rows
        ],
        right={2, 3},
    )
    for scenario in dict.fromkeys(row["scenario"] for row in rows):
        counts: dict[str, list[int]] = {}
        for row in rows:
            if row["scenario"] == scenario:
                counts.setdefault(row["target"], []).append(row["instructions"])
        if "project" in counts and "previous" in counts:
            ratio = statistics.median(counts["project"]) / statistics.median(counts["previous"])
            out.append(
                f"{scenario}: project executes {ratio:.3f}x the instructions of previous "
                f"(medians; above 1 = project costs more)"
            )
    return out


def _baseline_ratios(results: dict[str, Any]) -> list[str]:
    if not results["ratios"]:
        return []
    body = [
        [
            r["scenario"],
            _fmt(r["records_per_s"], ".1f") + "x",
            _fmt(r["mib_per_s"], ".1f") + "x",
            _fmt(r["peak_rss"], ".2f") + "x",
        ]
        for r in results["ratios"]
    ]
    return [
        "",
        "project / baseline:",
        *_table(["scenario", "records/s", "MiB/s", "peak RSS"], body, right={1, 2, 3}),
    ]


def _comparison(results: dict[str, Any]) -> list[str]:
    found = results.get("comparison")
    if found is None:
        return []
    repeat = results["settings"]["repeat"]
    runs = f"medians of {repeat} interleaved runs each" if repeat > 1 else "one run each"
    out = ["", f"project vs previous ({found['ref']}, {found['short_sha']}), {runs}:"]
    if not found["scenarios"]:
        return [*out, "  no scenario where both have numbers"]
    headers, body = compare.comparison_table(found, repeat)
    out += _table(headers, body, right={1, 2, 3, 4, 5})
    out += [
        "(project / previous: records/s and MiB/s above 1x = project faster, peak RSS above "
        "1x = project uses more;",
        " spread = (max - min) / median of records/s, share of limit = of the protocol limit, "
        "each as project / previous"
        + ("" if repeat > 1 else "; --repeat 2 or more shows the spread")
        + ")",
    ]
    if (imports := found["import_handler"]) is not None:
        out.append(
            f"import handler: project {imports['project_ms']:.0f} ms, previous "
            f"{imports['previous_ms']:.0f} ms ({_fmt(imports['ratio'], '.2f')}x)"
        )
    return out


def _round_trips(results: dict[str, Any]) -> list[str]:
    trips = []
    for row in results["results"]:
        if row.get("smtp_round_trips_per_message") is not None:
            s3 = row.get("s3_round_trips")
            warm = row.get("warmup_records") or 0
            trips.append(
                f"  {row['scenario']}/{label(row, results)}: "
                f"{row['smtp_round_trips_per_message']:.2f} per message"
                + (f"; S3: {s3 / (row['records'] + warm):.2f} per record" if s3 else "")
                + (f" (over both calls: {row['records']} + {warm} warm-up records)" if warm else "")
            )
    if not trips:
        return []
    return [
        "",
        "SMTP round trips (client turns seen by the proxy, set-up and QUIT included; "
        "over every message of the run, a warm-up's too):",
        *trips,
    ]


def _limits(results: dict[str, Any]) -> list[str]:
    out = []
    for limit in results["protocol_limits"]:
        who = label(limit, results, run=False)
        name = limit["scenario"] + ("" if limit["target"] == "project" else f" ({who})")
        out += [
            "",
            f"{name}: protocol limit = pool / (round trips x SMTP delay) = "
            f"{limit['pool_size']} / ({limit['round_trips']:g} x "
            f"{limit['smtp_delay_ms'] / 1000:g} s) = {limit['limit_records_per_s']:.0f} "
            f"records/s; {who} "
            f"{limit['records_per_s']:.1f} records/s = {limit['fraction']:.0%} of it",
            f"  (with 2 round trips per message, i.e. waiting for the final 250 before the next "
            f"MAIL: {limit['limit_2rt_records_per_s']:.0f} records/s, {who} at "
            f"{limit['fraction_2rt']:.0%})",
        ]
    return out


def _cold_start(results: dict[str, Any]) -> list[str]:
    out = []
    for cold in results["cold_start"]:
        who = label(cold, results, run=False)
        out += [
            "",
            f"cold start ({who}): init {cold['init_ms']:.0f} ms (the handler's import: Lambda's "
            f"Init Duration), then the first invocation {cold['first_invocation_s']:.2f} s = "
            f"{cold['first_records_per_s']:.1f} records/s, {cold['share_of_warm']:.0%} of the "
            f"warm row's {cold['warm_records_per_s']:.1f} records/s",
        ]
    return out


def _flatness(results: dict[str, Any]) -> list[str]:
    if (scale := results["scale"]) is None:
        return []
    return [
        "",
        f"memory flatness: project peak RSS {scale['scale_peak_rss_mib']:.0f} MiB in scale vs "
        f"{scale['small_peak_rss_mib']:.0f} MiB in small ({scale['change']:+.0%}); "
        f"before the call {scale['scale_rss_before_mib']:.0f} vs "
        f"{scale['small_rss_before_mib']:.0f} MiB (event and libraries), growth during the "
        f"call {scale['scale_growth_in_call_mib']:.0f} vs "
        f"{scale['small_growth_in_call_mib']:.0f} MiB",
    ]


def _imports(results: dict[str, Any]) -> list[str]:
    if (imports := results["imports"]) is None:
        return []
    parts = []
    if "handler_ms" in imports:
        parts.append(f"import handler {imports['handler_ms']:.0f} ms")
    if "previous_handler_ms" in imports:
        parts.append(f"previous's import handler {imports['previous_handler_ms']:.0f} ms")
    parts.append(f"import aioboto3 {imports['aioboto3_ms']:.0f} ms")
    if "ratio" in imports:
        parts.append(f"ratio {imports['ratio']:.2f}")
    return [
        "",
        f"import time (median of {imports['samples']} fresh interpreters): " + ", ".join(parts),
    ]


def _checks(results: dict[str, Any]) -> list[str]:
    if not results["checks"]:
        return []
    body = [
        [c["check"], c["goal"], c["shown"], "met" if c["met"] else "NOT met"]
        for c in results["checks"]
    ]
    return [
        "",
        "performance targets"
        + (" (quick mode: indicative only)" if results["quick"] else "")
        + ":",
        *_table(["check", "goal", "measured", ""], body, right=set()),
    ]


def _errors(results: dict[str, Any]) -> list[str]:
    errors = [
        (r["scenario"], label(r, results), e) for r in results["results"] for e in r["errors"]
    ]
    if not errors and results["ok"]:
        return []
    return [
        "",
        "ERRORS:",
        *([f"  {s}/{t}: {e}" for s, t, e in errors] or ["  the run did not complete"]),
    ]
