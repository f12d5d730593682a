"""Repeated runs and the A/B comparison: medians per target, their spread, project vs previous.

With `--repeat N` each target runs N times per scenario, interleaved with the others. The
report works on medians, one summary per scenario and target, and shows the spread of
each, (max - min) / median: two medians closer than their spreads are the same speed on
this machine today. With `--vs REF`, `project` (the working tree) is compared with
`previous` (the tree at REF), scenario by scenario.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

# Medians are taken of these; the spread is shown for the first four.
METRICS = (
    "wall_s", "records_per_s", "mib_per_s", "peak_rss_mib",
    "rss_before_mib", "cpu_ms_per_record", "import_ms",
    # throttled: delivery time / (records / account rate), share of MAIL answered 454, rounds
    "ideal_ratio", "refused_share", "rounds",
    # ses-large, the SES row: the memory goal (before the call + budget + one message)
    "rss_bound_mib", "max_message_bytes",
)  # fmt: skip
SPREAD = METRICS[:4]
# The same in every run of a scenario and target: taken from the first.
_FIXED = (
    "scenario", "target", "records", "size_bytes", "attachment_bytes", "smtp_delay_ms",
    "s3_delay_ms", "pool_size", "warmup_records", "instances", "account_rate", "ideal_s",
    "transport", "ses_max_inflight_bytes",
)  # fmt: skip


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per scenario, target and transport (`ses-large` runs two), in the order
    they first ran.

    A summary has the keys of a row, each metric the median of the runs that measured it,
    plus `runs`, `measured` (runs with numbers), `ok` (every run) and `spread`. Without a
    measured run it has no `wall_s`, like a row whose target failed to report.
    """
    groups: dict[tuple[str, str, str | None], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["scenario"], row["target"], row.get("transport"))
        groups.setdefault(key, []).append(row)
    return [_summary(runs) for runs in groups.values()]


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    measured = [run for run in runs if "wall_s" in run]
    summary = {key: runs[0].get(key) for key in _FIXED}
    summary.update(runs=len(runs), measured=len(measured), ok=all(run["ok"] for run in runs))
    if not measured:
        return summary
    for key in METRICS:
        values = [run[key] for run in measured if run.get(key) is not None]
        if values:
            summary[key] = statistics.median(values)
    summary["spread"] = {key: spread([run[key] for run in measured]) for key in SPREAD}
    return summary


def spread(values: list[float]) -> dict[str, float | None]:
    """Lowest, highest, and (highest - lowest) / median."""
    middle = statistics.median(values)
    low, high = min(values), max(values)
    return {"min": low, "max": high, "relative": (high - low) / middle if middle else None}


def find(
    summaries: list[dict[str, Any]], scenario: str, target: str, transport: str | None = None
) -> dict[str, Any] | None:
    """The summary of a scenario and target (and transport, where the scenario runs several),
    if it has measurements."""
    for summary in summaries:
        if (
            summary["scenario"] == scenario
            and summary["target"] == target
            and summary.get("transport") == transport
            and "wall_s" in summary
        ):
            return summary
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def comparison(
    summaries: list[dict[str, Any]],
    limits: list[dict[str, Any]],
    imports: dict[str, Any] | None,
    previous: dict[str, Any],
) -> dict[str, Any]:
    """project / previous per scenario both measured: ratios of the medians, their spreads,
    and each one's share of the protocol limit where SMTP was delayed."""
    shares = {(limit["scenario"], limit["target"]): limit["fraction"] for limit in limits}
    scenarios = []
    for mine in summaries:
        if mine["target"] != "project" or "wall_s" not in mine:
            continue
        theirs = find(summaries, mine["scenario"], "previous", mine.get("transport"))
        if theirs is None:
            continue
        scenario = mine["scenario"]
        scenarios.append(
            {
                "scenario": scenario,
                "transport": mine.get("transport"),
                "runs": {"project": mine["measured"], "previous": theirs["measured"]},
                "records_per_s": ratio(mine["records_per_s"], theirs["records_per_s"]),
                "mib_per_s": ratio(mine["mib_per_s"], theirs["mib_per_s"]),
                "peak_rss": ratio(mine["peak_rss_mib"], theirs["peak_rss_mib"]),
                "records_per_s_medians": {
                    "project": mine["records_per_s"],
                    "previous": theirs["records_per_s"],
                },
                "records_per_s_spread": {
                    "project": mine["spread"]["records_per_s"]["relative"],
                    "previous": theirs["spread"]["records_per_s"]["relative"],
                },
                "limit_share": (
                    {
                        "project": shares.get((scenario, "project")),
                        "previous": shares.get((scenario, "previous")),
                    }
                    if mine["smtp_delay_ms"]
                    else None
                ),
            }
        )
    import_times = None
    if imports is not None and "handler_ms" in imports and "previous_handler_ms" in imports:
        import_times = {
            "project_ms": imports["handler_ms"],
            "previous_ms": imports["previous_handler_ms"],
            "ratio": ratio(imports["handler_ms"], imports["previous_handler_ms"]),
        }
    return {
        "ref": previous["ref"],
        "sha": previous["sha"],
        "short_sha": previous["short_sha"],
        "scenarios": scenarios,
        "import_handler": import_times,
    }


# --------------------------------------------------------------------------- text


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _times(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else f"{value:{spec}}x"


Table = tuple[list[str], list[list[str]]]  # headers, rows


def comparison_table(result: dict[str, Any], repeat: int) -> Table:
    """project / previous per scenario; spread (records/s) and limit share as project / previous."""
    body = []
    for item in result["scenarios"]:
        spreads = item["records_per_s_spread"]
        shares = item["limit_share"]
        transport = item.get("transport")
        body.append(
            [
                item["scenario"] + (f" ({transport})" if transport else ""),
                _times(item["records_per_s"]),
                _times(item["mib_per_s"]),
                _times(item["peak_rss"]),
                f"{_pct(spreads['project'])} / {_pct(spreads['previous'])}" if repeat > 1 else "-",
                f"{_pct(shares['project'])} / {_pct(shares['previous'])}" if shares else "-",
            ]
        )
    headers = ["scenario", "records/s", "MiB/s", "peak RSS", "spread", "share of limit"]
    return headers, body


def median_table(summaries: list[dict[str, Any]], label: Callable[[dict[str, Any]], str]) -> Table:
    """Per scenario and target: runs measured, and median (min-max) of the main numbers."""
    body = []
    for summary in summaries:
        cells = [summary["scenario"], label(summary), f"{summary['measured']}/{summary['runs']}"]
        for key, spec in (
            ("wall_s", ".2f"),
            ("records_per_s", ".1f"),
            ("mib_per_s", ".1f"),
            ("peak_rss_mib", ".0f"),
        ):
            if key not in summary:
                cells.append("-")
                continue
            low, high = summary["spread"][key]["min"], summary["spread"][key]["max"]
            cells.append(f"{summary[key]:{spec}} ({low:{spec}}-{high:{spec}})")
        body.append(cells)
    headers = ["scenario", "target", "runs", "wall s", "records/s", "MiB/s", "peak RSS MiB"]
    return headers, body
