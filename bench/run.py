"""`python -m bench`: start the servers, seed, run every target in a fresh process, report.

With `--vs REF` the target `previous` runs `handler.lambda_handler` from the tree at REF,
interleaved with `project` (the working tree), so a change is measured against the code
before it in the same run, on the same machine.

Exit status: 0 when every run delivered every record, 1 when a run failed or lost
records (the table still prints), 2 on bad arguments, 130 on Ctrl-C. Whether the project
meets the performance targets never changes the exit status; they are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import boto3

from . import control, fleet, payload, previous, report, ses_sent, status_table
from .procs import (
    LOOPBACK,
    ROOT,
    Helper,
    Moto,
    cpu_seconds,
    machine_busy_seconds,
    python_module,
    snapshot_code,
)
from .scenarios import (
    HANDLERS,
    MiB,
    Scenario,
    human_size,
    interleaved,
    parse_names,
    parse_size,
    parse_targets,
    select,
)
from .sinks import RelayProcess, Sink, SinkStats, make_sink

EMAIL_FROM = "Bench <no-reply@bench.example.com>"
# The sender's address: SES (moto's too) sends only from a verified identity.
SENDER = "no-reply@bench.example.com"
# SES_MAX_INFLIGHT_BYTES's default in the project, for a run whose --env unsets nothing.
DEFAULT_SES_BUDGET = 256 * 1024 * 1024
# The only variables a target inherits from the caller's shell; every setting of the
# project is set here (or with --env), so a stray SMTP_* or AWS_* cannot skew a run.
_INHERITED = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM",
     "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHASHSEED", "LD_LIBRARY_PATH", "SYSTEMROOT"}
)  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark handler.lambda_handler against the old sequential design, "
        "or (--vs REF) against the code of a git ref.",
    )
    parser.add_argument(
        "--scenario",
        default="all",
        help="small, large, remote, remote-warm, scale, throttled, ses-large, all (default), "
        "or a comma-separated list",
    )
    parser.add_argument(
        "--target",
        help="comma-separated subset of baseline,project,previous (default baseline,project; "
        "with --vs: project,previous); both = baseline,project",
    )
    parser.add_argument(
        "--vs",
        metavar="REF",
        help="add the target previous: handler.lambda_handler from git REF (a commit, HEAD, "
        "main~3), run interleaved with project",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per target and scenario, interleaved, alternating which target goes first; "
        "medians are compared (default 1)",
    )
    parser.add_argument("--quick", action="store_true", help="small numbers, well under a minute")
    parser.add_argument("--records", type=int, help="records per batch (scale: 4x this)")
    parser.add_argument("--size", type=parse_size, help="attachment bytes (32768, 32K, 20M)")
    parser.add_argument("--smtp-delay", type=float, metavar="MS", help="delay in front of SMTP")
    parser.add_argument("--s3-delay", type=float, metavar="MS", help="delay in front of S3")
    parser.add_argument(
        "--account-rate",
        type=float,
        metavar="R",
        help="throttled: the account's messages/s (default 100; quick 40)",
    )
    parser.add_argument("--pool-size", type=int, default=8, help="SMTP_POOL_SIZE (default 8)")
    parser.add_argument(
        "--round-trips",
        type=float,
        default=1.0,
        help="SMTP round trips per message in the protocol limit (default 1; see README)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/results.json"))
    parser.add_argument("--sink", choices=("aiosmtpd", "smtp-sink"), default="aiosmtpd")
    parser.add_argument(
        "--import-samples", type=int, help="fresh interpreters per import measurement (5; quick 3)"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the project target (repeatable), e.g. MAX_CONCURRENCY=64",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the project under cProfile (slower!); writes profile-<scenario>.pstats/.txt "
        "next to --out",
    )
    parser.add_argument(
        "--status-table",
        nargs="?",
        const="both",
        choices=["both", "project"],
        help="give the project and previous targets (or, with `project`, the project only) a "
        "delivery-status table on moto (STATUS_TABLE; code before the status work ignores "
        "it), and check that each project run wrote a status per record",
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="run the project and previous targets under valgrind's callgrind and report the "
        "instructions each process executed: the same count whatever the machine's speed, "
        "for an A/B closer than wall time can tell (about 50x slower: use a few hundred "
        "--records)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, events)")
    args = parser.parse_args(argv)
    try:
        args.scenarios = parse_names(args.scenario)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        args.targets = parse_targets(args.target, vs=args.vs)
    except ValueError as exc:
        parser.error(str(exc))
    args.previous = None
    if args.vs is not None:
        try:
            args.previous = previous.resolve(args.vs)
        except previous.RefError as exc:
            parser.error(str(exc))
    for name in ("records", "pool_size", "import_samples", "repeat"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.round_trips <= 0:
        parser.error("--round-trips must be positive")
    if args.account_rate is not None and not args.account_rate > 0:
        parser.error("--account-rate must be positive")
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env wants NAME=VALUE, got {item!r}")
    return args


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir()
        self.code = snapshot_code(work / "code")
        self.targets: tuple[str, ...] = args.targets
        # The tree each target runs from (its working directory, first on sys.path).
        self.trees = {"baseline": self.code, "project": self.code}
        if args.previous is not None:
            self.trees["previous"] = previous.extract(
                args.previous, work / "previous", harness=self.code / "bench"
            )
            if not previous.same_requirements(self.code, self.trees["previous"]):
                log(
                    f"NOTE: requirements.txt differs at {args.previous.ref}; it runs with this "
                    "venv's packages"
                )
        self.moto = Moto(self.logs)
        self.sink: Sink = make_sink(args.sink, self.logs, work, self.code)
        self.proxy: Helper | None = None
        self.proxy_control = 0
        self.relay: RelayProcess | None = None  # the SMTP server of a scenario with an account
        self.helper_pids: list[dict[str, Any]] = []
        # Targets a scenario could not run, and why (the report says so under its table).
        self.skipped: list[dict[str, str]] = []

    # -- lifecycle

    def start(self) -> None:
        self.moto.launch()
        self._remember("moto", self.moto.pid, self.moto.command)
        self.sink.launch()
        self._remember("sink", self.sink.pid, getattr(self.sink, "command", []))

    def stop(self) -> None:
        for helper in (self.proxy, self.relay, self.sink, self.moto):
            if helper is not None:
                with contextlib.suppress(Exception):
                    helper.stop()
        self.proxy = self.relay = None

    def _remember(self, name: str, pid: int | None, command: list[str]) -> None:
        self.helper_pids.append({"name": name, "pid": pid, "command": command})

    def _start_proxy(self, scenario: Scenario) -> dict[str, int]:
        routes = []
        if scenario.s3_delay_ms > 0:
            routes += ["--route", f"s3={LOOPBACK}:{self.moto.port}:{scenario.s3_delay_ms}"]
        if scenario.smtp_delay_ms > 0:
            smtp_port = self.relay.port if self.relay is not None else self.sink.port
            routes += ["--route", f"smtp={LOOPBACK}:{smtp_port}:{scenario.smtp_delay_ms}"]
        proxy = Helper(
            f"proxy-{scenario.name}",
            python_module("bench.proxy", *routes, "--run-dir", str(self.work)),
            self.logs,
            cwd=self.code,
        )
        self.proxy = proxy
        proxy.start(ready_line=True)
        info = proxy.read_ready(timeout=30)
        self._remember(proxy.name, proxy.pid, proxy.command)
        self.proxy_control = int(info["control_port"])
        return {str(k): int(v) for k, v in info["ports"].items()}

    def _start_relay(self, scenario: Scenario) -> RelayProcess:
        relay = RelayProcess(self.logs, self.work, self.code, scenario.account_rate)
        self.relay = relay
        relay.launch()
        self._remember(relay.name, relay.pid, relay.command)
        return relay

    # -- measurements

    def measure_imports(self) -> dict[str, Any]:
        """`import handler` (of each tree measured) and `import aioboto3`, each in fresh
        interpreters, alternating."""
        samples = self.args.import_samples or (3 if self.args.quick else 5)
        modules: dict[str, tuple[Path, str]] = {}
        if "project" in self.targets:
            modules["handler"] = (self.code, "handler")
        if "previous" in self.targets:
            modules["previous_handler"] = (self.trees["previous"], "handler")
        modules["aioboto3"] = (self.code, "aioboto3")
        times: dict[str, list[float]] = {name: [] for name in modules}
        for round_ in range(samples + 1):
            # Round 0 only warms the page cache and writes the .pyc files of the copied
            # code (the venv's were compiled by pip), so every sample imports bytecode.
            warm = {"baseline": (self.code, "bench.baseline")} if round_ == 0 else {}
            for name, (tree, module) in {**modules, **warm}.items():
                milliseconds = self._import_ms(tree, module)
                if name in times and round_ > 0:
                    times[name].append(milliseconds)
        found: dict[str, Any] = {"samples": samples}
        for name, values in times.items():
            found[f"{name}_ms"] = statistics.median(values)
            found[f"{name}_samples_ms"] = values
        if "handler_ms" in found:
            found["ratio"] = found["handler_ms"] / found["aioboto3_ms"]
        return found

    def _import_ms(self, tree: Path, module: str) -> float:
        """Milliseconds `import module` took in a fresh interpreter run from `tree`."""
        result = self.work / "import.json"
        completed = subprocess.run(
            python_module("bench.target", "--import", module, "--result", str(result)),
            cwd=tree,
            env=self._target_env(self.work / "tmp", {}),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(
                f"import {module} in {tree.name} failed:\n"
                f"{completed.stderr.decode(errors='replace')}"
            )
        milliseconds: float = json.loads(result.read_text())["import_ms"]
        return milliseconds

    def _skip(self, scenario: Scenario, target: str, why: str) -> None:
        log(f"[{scenario.name}] {target} skipped: {why}")
        self.skipped.append({"scenario": scenario.name, "target": target, "why": why})

    def run_scenario(self, scenario: Scenario) -> list[dict[str, Any]]:
        targets = tuple(t for t in self.targets if t in scenario.targets)
        if "ses" in scenario.transports:
            if "baseline" in self.targets:
                self._skip(scenario, "baseline", "the old design sends by SMTP only")
            if "previous" in targets and not all(
                previous.knows_setting(self.trees["previous"], name)
                for name in ("TRANSPORT", "SES_MAX_INFLIGHT_BYTES")
            ):
                targets = tuple(t for t in targets if t != "previous")
                self._skip(
                    scenario,
                    "previous",
                    "its code does not read both TRANSPORT and SES_MAX_INFLIGHT_BYTES (no SES "
                    "API transport to measure)",
                )
        if not targets:
            log(f"[{scenario.name}] skipped: runs only {', '.join(scenario.targets)}")
            return []
        if scenario.account_rate > 0 and "baseline" in self.targets:
            log(
                f"[{scenario.name}] baseline skipped: the old design reads neither "
                "SMTP_RATE_LIMIT nor FLEET_SIZE (it has no pacing to measure)"
            )
        log(
            f"[{scenario.name}] {scenario.records} records x {human_size(scenario.size)}, "
            f"SMTP delay {scenario.smtp_delay_ms:g} ms, S3 delay {scenario.s3_delay_ms:g} ms"
        )
        self.moto.reset()
        batch = self._seed(scenario)
        rows = []
        try:
            if scenario.account_rate > 0:
                self._start_relay(scenario)
            ports = self._start_proxy(scenario) if scenario.delayed else {}
            # Every round runs each target once (once per transport), and the next round in
            # the reverse order.
            ses_kept = False  # whether moto's SES holds messages of an earlier run
            for repetition in range(self.args.repeat):
                for target in interleaved(targets, repetition):
                    for transport in scenario.transports:
                        if transport == "ses" and ses_kept:
                            # data.json grows with every message moto keeps: start afresh.
                            self.moto.reset()
                            batch = dataclasses.replace(self._seed(scenario), seed_s=batch.seed_s)
                        if self.relay is not None:
                            row = self.run_fleet(scenario, batch, target, repetition + 1, ports)
                        else:
                            row = self.run_target(
                                scenario, batch, target, repetition + 1, ports, transport
                            )
                        ses_kept = ses_kept or transport == "ses"
                        row["seed_s"] = batch.seed_s
                        rows.append(row)
        finally:
            if self.proxy is not None:
                self.proxy.stop()
                self.proxy = None
            if self.relay is not None:
                self.relay.stop()
                self.relay = None
        self.moto.reset()
        return rows

    def _seed(self, scenario: Scenario) -> Batch:
        """Upload the scenario's ZIPs (and its warm-up's) and write the events."""
        items = payload.items(scenario.name, scenario.records)
        started = time.perf_counter()
        s3 = boto3.client(
            "s3",
            endpoint_url=self.moto.endpoint_url,
            region_name=payload.REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # noqa: S106 - moto's dummy credentials
        )
        total_bytes = payload.seed(s3, items, scenario.size)
        seed_s = time.perf_counter() - started
        if self.args.status_table:
            status_table.create(self.moto.endpoint_url)
        if "ses" in scenario.transports:
            ses_sent.verify_sender(self.moto.endpoint_url, payload.REGION, SENDER)
        log(
            f"[{scenario.name}] seeded {len(items)} objects, "
            f"{total_bytes / MiB:.1f} MiB in {seed_s:.1f} s"
        )
        event_path = self.work / f"event-{scenario.name}.json"
        event_path.write_text(json.dumps(payload.build_event(items)), encoding="utf-8")
        warmup: Warmup | None = None
        if scenario.warmup > 0:
            # A first invocation in the same process, before the measured one: its own
            # records (distinct video ids) in the same bucket, the same ZIP size.
            warm_items = payload.items(f"{scenario.name}-warmup", scenario.warmup)
            warm_bytes = payload.seed(s3, warm_items, scenario.size)
            warm_path = self.work / f"event-{scenario.name}-warmup.json"
            warm_path.write_text(json.dumps(payload.build_event(warm_items)), encoding="utf-8")
            warmup = Warmup(warm_path, warm_items, warm_bytes)
            log(
                f"[{scenario.name}] seeded {len(warm_items)} more objects for the warm-up "
                "invocation"
            )
        return Batch(event_path, items, total_bytes, seed_s, warmup)

    def run_target(
        self,
        scenario: Scenario,
        batch: Batch,
        target: str,
        run: int,
        ports: dict[str, int],
        transport: str = "smtp",
    ) -> dict[str, Any]:
        """One run of `target` on the scenario's batch (the `run`-th of `--repeat`), sending
        by `transport`; where a scenario has several, the row's `transport` says which."""
        several = len(scenario.transports) > 1
        name = f"{scenario.name}-{target}" + (f"-{transport}" if several else "")
        name += f"-{run}" if self.args.repeat > 1 else ""
        warmup = batch.warmup
        warm_items = warmup.items if warmup is not None else []
        # What the sink must receive: the measured batch and the warm-up batch, each once.
        expected_messages = scenario.records + len(warm_items)
        tmp_dir = self.work / "tmp" / name
        tmp_dir.mkdir(parents=True)
        result_path = self.work / f"{name}.result.json"
        extra: dict[str, str] = {}
        if target in HANDLERS:
            # Every ZIP must travel as an attachment (the large scenario attaches
            # 20 MiB); the project's default limit would turn bigger ones into links.
            extra["MAX_ATTACHMENT_BYTES"] = str(-(-scenario.size // MiB) * MiB)
            # As in Lambda: the handler's import is the init phase (settings, templates,
            # clients made), measured apart from the first invocation (`import_ms`).
            extra["AWS_LAMBDA_FUNCTION_NAME"] = "async-notifier-bench"
            if several or transport != "smtp":
                extra["TRANSPORT"] = transport
                # moto's SES quota says 1 message/s: no pacing, memory is what is measured.
                extra["SMTP_RATE_LIMIT"] = "none"
            if scenario.ses_max_inflight_bytes:
                extra["SES_MAX_INFLIGHT_BYTES"] = str(scenario.ses_max_inflight_bytes)
            if scenario.max_concurrency:
                extra["MAX_CONCURRENCY"] = str(scenario.max_concurrency)
            if self.args.status_table == "both" or (
                self.args.status_table == "project" and target == "project"
            ):
                extra["STATUS_TABLE"] = status_table.NAME
                status_table.clear(self.moto.endpoint_url)
            extra.update(item.split("=", 1) for item in self.args.env)
        env = self._target_env(tmp_dir, extra, ports)
        row = _row(scenario, target, run, batch, extra)
        row["pool_size"] = self.args.pool_size if target in HANDLERS else None
        if several:
            row["transport"] = transport
        if warmup is not None:
            row["warmup_records"] = len(warm_items)
            row["warmup_attachment_bytes"] = warmup.total_bytes
        self.sink.reset()
        if self.proxy is not None:
            control.query(self.proxy_control, "RESET")
        command = python_module(
            "bench.target", "--target", target, "--event", str(batch.event_path),
            "--result", str(result_path),
        )  # fmt: skip
        if warmup is not None:
            command += ["--warmup-event", str(warmup.event_path)]
        profile = self._profile_path(scenario, target, run)
        if profile is not None:
            command += ["--profile", str(profile)]
            row["profiled"] = True
        all_bytes = batch.total_bytes + (warmup.total_bytes if warmup is not None else 0)
        timeout = 600 + 3 * expected_messages + 4 * all_bytes / MiB
        counted = self.logs / f"callgrind-{name}.out"
        if self.args.callgrind:
            command = [
                "valgrind", "--tool=callgrind", "--quiet", f"--callgrind-out-file={counted}",
                *command,
            ]  # fmt: skip
            timeout *= 100
        helper = Helper(name, command, self.logs, cwd=self.trees[target])
        child = self._execute(helper, env, timeout, result_path, row)
        if self.args.callgrind:
            row["instructions"] = callgrind_total(counted)
            log(f"[{name}] {row['instructions']:,} instructions")
        sink = self.sink.collect(expected=0 if transport == "ses" else expected_messages)
        if transport == "ses":
            if sink.messages or sink.connections:
                row["errors"].append(
                    f"TRANSPORT=ses, yet the SMTP sink got {sink.messages} message(s) on "
                    f"{sink.connections} connection(s)"
                )
            # What the SES API was given is what moto kept; the SMTP counters stay 0.
            sink = ses_sent.stats(ses_sent.raw_messages(self.moto.endpoint_url))
        if self.proxy is not None:
            proxied = control.query(self.proxy_control, "STATS")
            row["s3_connections"] = proxied.get("s3", {}).get("connections")
            row["s3_round_trips"] = proxied.get("s3", {}).get("turns")
            row["smtp_round_trips"] = proxied.get("smtp", {}).get("turns")
            if row["smtp_round_trips"] is not None and sink.messages:
                row["smtp_round_trips_per_message"] = row["smtp_round_trips"] / sink.messages
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if profile is not None and profile.exists():
            row["profile"] = str(profile)
            profile.with_suffix(".txt").write_text(
                report.profile_summary(profile, scenario.records)
            )
        row.update(self._measurements(child, batch.total_bytes))
        if transport == "ses":
            row.update(self._ses_memory(row, extra, sink.max_size))
        self._check(row, child, sink, scenario, batch)
        if "STATUS_TABLE" in extra:
            row["statuses"] = status_table.count(self.moto.endpoint_url)
            if target == "project" and row["statuses"] < expected_messages:
                row["errors"].append(
                    f"STATUS_TABLE holds {row['statuses']} statuses for {expected_messages} "
                    "records: writes were dropped"
                )
            log(f"[{name}] STATUS_TABLE: {row['statuses']} statuses")
        self._log_run(row, sink.connections)
        return row

    @staticmethod
    def _ses_memory(
        row: dict[str, Any], extra: dict[str, str], largest: int | None
    ) -> dict[str, Any]:
        """The SES row's memory goal: the process before the call, plus the budget, plus
        one more message's footprint (see README.md, "ses-large")."""
        budget = int(extra.get("SES_MAX_INFLIGHT_BYTES", DEFAULT_SES_BUDGET))
        found: dict[str, Any] = {"ses_max_inflight_bytes": budget, "max_message_bytes": largest}
        if largest is not None and "rss_before_mib" in row:
            # The project's request_footprint: the message and four copies of its base64.
            footprint = largest + 4 * (4 * -(-largest // 3))
            found["message_footprint_mib"] = footprint / MiB
            found["rss_bound_mib"] = row["rss_before_mib"] + (budget + footprint) / MiB
        return found

    def run_fleet(
        self,
        scenario: Scenario,
        batch: Batch,
        target: str,
        run: int,
        ports: dict[str, int],
    ) -> dict[str, Any]:
        """The batch through `scenario.instances` concurrent instances of `target` against
        the relay's account, and the failed records again, round after round, as SQS would
        redeliver them, until all are delivered or `fleet.MAX_ROUNDS` rounds have run.

        Every instance is configured with the account's whole rate and the fleet's size
        (`SMTP_RATE_LIMIT`, `FLEET_SIZE`); code that ignores `FLEET_SIZE` offers the account
        `instances` times its rate.
        """
        relay = self.relay
        assert relay is not None
        name = f"{scenario.name}-{target}" + (f"-{run}" if self.args.repeat > 1 else "")
        rate = scenario.account_rate
        extra = {
            "MAX_ATTACHMENT_BYTES": str(-(-scenario.size // MiB) * MiB),
            "AWS_LAMBDA_FUNCTION_NAME": "async-notifier-bench",
            "SMTP_RATE_LIMIT": f"{rate:g}",
            "FLEET_SIZE": str(scenario.instances),
        }
        extra.update(item.split("=", 1) for item in self.args.env)
        row = _row(scenario, target, run, batch, extra)
        row.update(
            pool_size=self.args.pool_size,
            instances=scenario.instances,
            account_rate=rate,
            ideal_s=scenario.records / rate,
            invocation_timeout_s=scenario.invocation_timeout_s,
        )
        relay.reset()
        if self.proxy is not None:
            control.query(self.proxy_control, "RESET")
        pending: list[dict[str, Any]] = json.loads(batch.event_path.read_text())["Records"]
        invocations: list[dict[str, Any]] = []
        strays: set[str] = set()
        cpu = _CpuAccount(self._helper_pids())
        started = time.perf_counter()
        for round_ in range(1, fleet.MAX_ROUNDS + 1):
            shares = fleet.split(pending, scenario.instances)
            called = self._invoke_fleet(
                f"{name}-r{round_}", target, shares, extra, ports, row,
                scenario.invocation_timeout_s,
            )  # fmt: skip
            pending = []
            for share, child in zip(shares, called, strict=True):
                failed = fleet.failed_ids(child, share)
                again = [r for r in share if failed is None or r["messageId"] in failed]
                pending += [fleet.redelivered(record) for record in again]
                invocations.append(self._invocation(round_, child, share, len(again)))
                strays.update(child.get("stray_modules") or [])
            row["rounds"] = round_
            if not pending:
                break
        row["process_wall_s"] = time.perf_counter() - started
        row.update(cpu.finish(row["process_wall_s"]))
        row["invocations"] = invocations
        row["lost"] = len(pending)
        if pending:
            row["errors"].append(
                f"{len(pending)} record(s) still failing after {row['rounds']} rounds: lost"
            )
        stats = relay.stats()
        row.update(
            mail_commands=stats["mail_commands"],
            rate_refusals=stats["rate_refusals"],
            quota_refusals=stats["quota_refusals"],
            refused_share=(stats["rate_refusals"] + stats["quota_refusals"])
            / max(stats["mail_commands"], 1),
            **fleet.message_id_check(stats["accepted"], scenario.records),
        )
        if not row["exactly_once"]:
            row["errors"].append(
                f"by Message-ID: {row['accepted_message_ids']} accepted of {scenario.records}, "
                f"{row['message_id_duplicates']} duplicate(s)"
            )
        row.update(self._fleet_measurements(invocations, batch.total_bytes))
        if "wall_s" in row:
            row["ideal_ratio"] = row["wall_s"] / row["ideal_s"]
        sink = SinkStats(
            messages=int(stats["messages"]),
            connections=int(stats["connections"]),
            data_bytes=int(stats["data_bytes"]),
            max_open=int(stats["max_open"]),
            min_size=stats["min_size"],
            video_ids=[str(v) for v in stats["video_ids"]],
        )
        # The checks of any run, on what the fleet delivered in all; what is still failing
        # is reported as lost above, so not again as batchItemFailures.
        child = {"response": {"batchItemFailures": []}, "stray_modules": sorted(strays)}
        self._check(row, child, sink, scenario, batch)
        row["failures"] = len(pending)
        self._log_run(row, sink.connections)
        log(
            f"[{scenario.name}] {target}: {row.get('ideal_ratio', float('nan')):.2f}x the ideal "
            f"{row['ideal_s']:.2f} s, {row['refused_share']:.1%} of {row['mail_commands']} MAIL "
            f"answered 454, {row['rounds']} round(s), {row['lost']} lost"
        )
        return row

    def _invoke_fleet(
        self,
        name: str,
        target: str,
        shares: list[list[dict[str, Any]]],
        extra: dict[str, str],
        ports: dict[str, int],
        row: dict[str, Any],
        timeout_s: float,
    ) -> list[dict[str, Any]]:
        """One concurrent invocation per share, each with a Lambda timeout of `timeout_s`;
        what each child reported (empty if none)."""
        assert self.relay is not None
        helpers, results = [], []
        try:
            for index, share in enumerate(shares):
                event_path = self.work / f"{name}-i{index}.event.json"
                event_path.write_text(json.dumps({"Records": share}), encoding="utf-8")
                result_path = self.work / f"{name}-i{index}.result.json"
                command = python_module(
                    "bench.target", "--target", target, "--event", str(event_path),
                    "--result", str(result_path),
                    "--timeout-ms", str(int(timeout_s * 1000)),
                )  # fmt: skip
                env = self._target_env(
                    self.work / "tmp" / f"{name}-i{index}",
                    extra,
                    {"smtp": self.relay.port, **ports},
                )
                helper = Helper(f"{name}-i{index}", command, self.logs, cwd=self.trees[target])
                helper.start(ready_line=False, env=env)
                helpers.append(helper)
                results.append(result_path)
            # The worker returns before its Lambda timeout; past it (plus start-up) it is hung.
            deadline = time.monotonic() + timeout_s + 60
            for helper in helpers:
                assert helper.process is not None
                try:
                    code = helper.process.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    row["errors"].append(f"{helper.name} timed out")
                    continue
                if code != 0:
                    row["errors"].append(
                        f"{helper.name} exited with {code}: {helper.output(2000).strip()}"
                    )
        finally:
            for helper in helpers:
                helper.stop()
            for index in range(len(shares)):
                shutil.rmtree(self.work / "tmp" / f"{name}-i{index}", ignore_errors=True)
        return [json.loads(path.read_text()) if path.exists() else {} for path in results]

    @staticmethod
    def _invocation(
        round_: int, child: dict[str, Any], share: list[dict[str, Any]], failed: int
    ) -> dict[str, Any]:
        keys = (
            "called_at", "returned_at", "wall_s", "cpu_s", "peak_rss_kib", "import_ms",
            "module_file",
        )  # fmt: skip
        found = {key: child[key] for key in keys if key in child}
        return {"round": round_, "records": len(share), "failed": failed, **found}

    @staticmethod
    def _fleet_measurements(invocations: list[dict[str, Any]], total_bytes: int) -> dict[str, Any]:
        """A fleet's numbers: its delivery time (the rounds' spans), the sum of its CPU, the
        largest instance's peak RSS."""
        wall = fleet.delivery_seconds(invocations)
        if not wall:
            return {}
        records = sum(i["records"] for i in invocations if i["round"] == 1)
        cpu_s = sum(i["cpu_s"] for i in invocations)
        return {
            "wall_s": wall,
            "records_per_s": records / wall,
            "mib_per_s": total_bytes / MiB / wall,
            "cpu_s": cpu_s,
            "cpu_ms_per_record": cpu_s * 1000 / max(records, 1),
            "peak_rss_mib": max(i["peak_rss_kib"] for i in invocations) / 1024,
            "import_ms": statistics.median(i["import_ms"] for i in invocations),
            "module_file": invocations[0].get("module_file"),
        }

    def _profile_path(self, scenario: Scenario, target: str, run: int) -> Path | None:
        """Where `--profile` puts this run's profile: handler targets only, one file per run.

        Absolute, since the target runs from its own tree."""
        if not self.args.profile or target not in HANDLERS:
            return None
        name = f"profile-{scenario.name}"
        if target != "project":
            name += f"-{target}"
        if self.args.repeat > 1:
            name += f"-{run}"
        profile: Path = self.args.out.parent.resolve() / f"{name}.pstats"
        profile.parent.mkdir(parents=True, exist_ok=True)
        return profile

    def _execute(
        self,
        helper: Helper,
        env: dict[str, str],
        timeout: float,
        result_path: Path,
        row: dict[str, Any],
    ) -> dict[str, Any]:
        """Run the target process to its end; its CPU account goes into `row`.

        Returns what the child reported (empty if it wrote nothing).
        """
        cpu = _CpuAccount(self._helper_pids())
        started = time.perf_counter()
        helper.start(ready_line=False, env=env)
        try:
            assert helper.process is not None
            code = helper.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            row["errors"].append(f"timed out after {timeout:.0f} s")
        finally:
            helper.stop()
        row["process_wall_s"] = time.perf_counter() - started
        row.update(cpu.finish(row["process_wall_s"]))
        if code not in (0, None):
            row["errors"].append(f"exited with {code}: {helper.output(2000).strip()}")
        child: dict[str, Any] = {}
        if result_path.exists():
            child = json.loads(result_path.read_text())
        elif code == 0:
            row["errors"].append("wrote no result")
        return child

    def _check(
        self,
        row: dict[str, Any],
        child: dict[str, Any],
        sink: SinkStats,
        scenario: Scenario,
        batch: Batch,
    ) -> None:
        """Whether the run delivered every record, once, with its attachment: sets `ok`."""
        warmup = batch.warmup
        warm_items = warmup.items if warmup is not None else []
        expected_messages = scenario.records + len(warm_items)
        if warmup is not None and "warmup_wall_s" in child:
            row["warmup_wall_s"] = child["warmup_wall_s"]
            warm_failures = (child.get("warmup_response") or {}).get("batchItemFailures")
            if not isinstance(warm_failures, list):
                row["errors"].append(
                    "warm-up response is not a partial batch response: "
                    f"{child.get('warmup_response')!r}"
                )
            elif warm_failures:
                row["errors"].append(f"{len(warm_failures)} warm-up record(s) in batchItemFailures")
        elif warmup is not None and child:
            row["errors"].append("the target reported no warm-up invocation")
        row.update(
            smtp_connections=sink.connections,
            smtp_max_open=sink.max_open,
            min_message_bytes=sink.min_size,
            delivered=sink.messages,
            delivered_bytes=sink.data_bytes,
        )
        failures = (child.get("response") or {}).get("batchItemFailures")
        row["failures"] = len(failures) if isinstance(failures, list) else None
        if child and not isinstance(failures, list):
            row["errors"].append(
                f"response is not a partial batch response: {child.get('response')!r}"
            )
        elif failures:
            row["errors"].append(f"{len(failures)} record(s) in batchItemFailures")
        if sink.messages != expected_messages:
            where = "moto's SES kept" if row.get("transport") == "ses" else "sink received"
            row["errors"].append(
                f"{where} {sink.messages} of {expected_messages} messages"
                + (f" ({scenario.records} + {len(warm_items)} warm-up)" if warm_items else "")
            )
        # Base64 alone makes an attached ZIP 4/3 its size: a smaller message lacks it.
        if sink.min_size is not None and sink.min_size < scenario.size * 4 / 3:
            row["errors"].append(
                f"a message of {sink.min_size} bytes cannot carry a {scenario.size}-byte ZIP: "
                "attachment missing (sent as a link?)"
            )
        if sink.video_ids is not None:
            row.update(self._check_ids([*batch.items, *warm_items], sink.video_ids, row["errors"]))
        if strays := child.get("stray_modules"):
            # Its own tree comes first on sys.path: anything else means other code was measured.
            row["errors"].append(f"loaded modules from outside its tree: {', '.join(strays[:5])}")
        row["ok"] = not row["errors"]

    def _log_run(self, row: dict[str, Any], connections: int) -> None:
        status = "ok" if row["ok"] else "ERROR: " + "; ".join(row["errors"])
        warm_text = ""
        if row.get("warmup_records"):
            warm_text = (
                f" (after a warm-up of {row['warmup_records']} records in "
                f"{row.get('warmup_wall_s', float('nan')):.2f} s; SMTP connections and "
                "round trips include the warm-up)"
            )
        target = row["target"]
        if target == "previous" and self.args.previous is not None:
            target += f" ({self.args.previous.short})"
        if row.get("transport"):
            target += f" by {row['transport']}"
        if self.args.repeat > 1:
            target += f" #{row['run']}"
        log(
            f"[{row['scenario']}] {target}{warm_text}: {row.get('wall_s', float('nan')):.2f} s, "
            f"{row.get('records_per_s', 0):.1f} records/s, "
            f"peak RSS {row.get('peak_rss_mib', 0):.0f} MiB, "
            f"{connections} SMTP connection(s): {status}"
        )

    def previous_info(self) -> dict[str, Any] | None:
        """What `previous` ran, for the report: the ref, its commit and a hash of its code."""
        ref = self.args.previous
        if ref is None:
            return None
        tree = self.trees["previous"]
        return {
            "ref": ref.ref,
            "sha": ref.sha,
            "short_sha": ref.short,
            "subject": ref.subject,
            "code": report.code_fingerprint(tree),
            "same_requirements": previous.same_requirements(self.code, tree),
        }

    def _helper_pids(self) -> dict[str, int | None]:
        # A scenario with an account has the relay as its SMTP server: it is the sink then.
        sink = self.relay if self.relay is not None else self.sink
        pids = {"sink": sink.pid, "moto": self.moto.pid}
        if self.proxy is not None:
            pids["proxy"] = self.proxy.pid
        return pids

    @staticmethod
    def _measurements(child: dict[str, Any], total_bytes: int) -> dict[str, Any]:
        if "wall_s" not in child:
            return {}
        wall = float(child["wall_s"])
        records = int(child["records"])
        return {
            "wall_s": wall,
            "records_per_s": records / wall,
            "mib_per_s": total_bytes / MiB / wall,
            "cpu_s": child["cpu_s"],
            "cpu_ms_per_record": child["cpu_s"] * 1000 / max(records, 1),
            "peak_rss_mib": child["peak_rss_kib"] / 1024,
            "peak_rss_source": child["peak_rss_source"],
            "rss_before_mib": (child["rss_before_kib"] or 0) / 1024,
            "ru_maxrss_mib": child["ru_maxrss_kib"] / 1024,
            "import_ms": child["import_ms"],
            "module_file": child.get("module_file"),
        }

    @staticmethod
    def _check_ids(batch: list[payload.Item], seen: list[str], errors: list[str]) -> dict[str, int]:
        expected = {item.video_id for item in batch}
        counts = Counter(seen)
        missing = len(expected - counts.keys())
        duplicates = sum(n - 1 for n in counts.values() if n > 1)
        unexpected = len(counts.keys() - expected)
        if missing or duplicates or unexpected:
            errors.append(
                f"by X-Video-Id: {missing} missing, {duplicates} duplicate(s), "
                f"{unexpected} unexpected"
            )
        return {"unique_delivered": len(counts.keys() & expected), "duplicates": duplicates}

    def _target_env(
        self, tmp_dir: Path, extra: dict[str, str], ports: dict[str, int] | None = None
    ) -> dict[str, str]:
        ports = ports or {}
        env = {key: value for key, value in os.environ.items() if key in _INHERITED}
        tmp_dir.mkdir(parents=True, exist_ok=True)
        env.update(
            SMTP_SERVER=LOOPBACK,
            SMTP_PORT=str(ports.get("smtp", self.sink.port)),
            SMTP_TLS="none",
            EMAIL_FROM=EMAIL_FROM,
            ALLOWED_BUCKETS=payload.BUCKET,
            SMTP_POOL_SIZE=str(self.args.pool_size),
            AWS_ENDPOINT_URL=f"http://{LOOPBACK}:{ports.get('s3', self.moto.port)}",
            AWS_REGION=payload.REGION,
            AWS_DEFAULT_REGION=payload.REGION,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",  # noqa: S106 - moto's dummy credentials
            AWS_CONFIG_FILE=str(self.work / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.work / "no-aws-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
            TMP_DIR=str(tmp_dir),
        )
        # Not inherited on purpose: PYTHONUNBUFFERED (the project's log lines go to a file,
        # buffered) and PYTHONDONTWRITEBYTECODE (imports run from bytecode, as the venv's
        # packages do, so Python may cache the copied code's modules in the work dir).
        env.update(extra)
        return env


@dataclass(frozen=True)
class Warmup:
    """The warm-up invocation of a scenario: its event file, records and bytes seeded."""

    event_path: Path
    items: list[payload.Item]
    total_bytes: int


@dataclass(frozen=True)
class Batch:
    """What every run of a scenario is given: the event, its records, the bytes seeded
    (and how long seeding took), and the warm-up invocation, if any."""

    event_path: Path
    items: list[payload.Item]
    total_bytes: int
    seed_s: float
    warmup: Warmup | None


class _CpuAccount:
    """Who used the CPUs during one target run: the target, our helpers, everyone else.

    "Other" is the machine's busy time minus ours; on a shared machine it says how much the
    numbers of that run were disturbed (Linux only; None elsewhere).
    """

    def __init__(self, helpers: dict[str, int | None]) -> None:
        self.helpers = helpers
        self.helper_start = {name: cpu_seconds(pid) for name, pid in helpers.items()}
        self.busy_start = machine_busy_seconds()
        self.children_start = _cpu(resource.RUSAGE_CHILDREN)
        self.self_start = _cpu(resource.RUSAGE_SELF)

    def finish(self, wall: float) -> dict[str, Any]:
        helpers: dict[str, float] = {}
        for name, pid in self.helpers.items():
            before, after = self.helper_start[name], cpu_seconds(pid)
            if before is not None and after is not None:
                helpers[name] = after - before
        target = _cpu(resource.RUSAGE_CHILDREN) - self.children_start
        ours = target + sum(helpers.values()) + _cpu(resource.RUSAGE_SELF) - self.self_start
        busy_end = machine_busy_seconds()
        other = None
        if self.busy_start is not None and busy_end is not None:
            other = max(0.0, busy_end - self.busy_start - ours)
        return {
            "target_process_cpu_s": target,
            "helper_cpu_s": helpers,
            "other_cpu_s": other,
            "other_cpu_share": None if other is None else other / (wall * (os.cpu_count() or 1)),
        }


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def callgrind_total(path: Path) -> int | None:
    """The instructions a callgrind run counted (its `totals:` line), None without one."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    return None


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C stops the run cleanly even when started with SIGINT ignored (a shell's `&`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    chosen = select(
        args.scenarios,
        quick=args.quick,
        records=args.records,
        size=args.size,
        smtp_delay_ms=args.smtp_delay,
        s3_delay_ms=args.s3_delay,
        account_rate=args.account_rate,
    )
    work = Path(tempfile.mkdtemp(prefix="async-notifier-bench-"))
    try:
        bench = Bench(args, work)
    except Exception as exc:
        shutil.rmtree(work, ignore_errors=True)
        log(f"benchmark failed: {type(exc).__name__}: {exc}")
        return 1
    started = dt.datetime.now(dt.UTC)
    load_average = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    clock = time.perf_counter()
    rows: list[dict[str, Any]] = []
    imports: dict[str, Any] | None = None
    failed = False
    try:
        bench.start()
        log(f"moto on :{bench.moto.port}, {args.sink} sink on :{bench.sink.port}, work dir {work}")
        if any(target in HANDLERS for target in bench.targets):
            imports = bench.measure_imports()
            medians = ", ".join(
                f"{name.removesuffix('_ms').replace('_', ' ')} {value:.0f} ms"
                for name, value in imports.items()
                if name.endswith("_ms") and not name.endswith("_samples_ms")
            )
            log(f"imports: {medians} (medians of {imports['samples']})")
        for scenario in chosen:
            rows.extend(bench.run_scenario(scenario))
    except (KeyboardInterrupt, SystemExit) as exc:
        log("interrupted; stopping the servers")
        bench.stop()
        shutil.rmtree(work, ignore_errors=True)
        return 130 if isinstance(exc, KeyboardInterrupt) else int(exc.code or 1)
    except Exception as exc:
        failed = True
        log(f"benchmark failed: {type(exc).__name__}: {exc}")
    finally:
        bench.stop()
    code = report.code_fingerprint(bench.code)
    code["working_tree_changed"] = report.code_fingerprint(ROOT)["sha256"] != code["sha256"]
    results = report.build(
        args=args,
        scenarios=chosen,
        rows=rows,
        imports=imports,
        started=started,
        duration_s=time.perf_counter() - clock,
        helpers=bench.helper_pids,
        load_average=load_average,
        code=code,
        previous=bench.previous_info(),
        skipped=bench.skipped,
    )
    failed = failed or not rows or any(not row["ok"] for row in rows)
    results["ok"] = not failed
    results["work_dir"] = str(work)
    text = report.render(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
    log(f"results: {args.out} (and {args.out.with_suffix('.txt')})")
    if failed or args.keep:
        log(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _row(
    scenario: Scenario, target: str, run: int, batch: Batch, env: dict[str, str]
) -> dict[str, Any]:
    """What every run's row says of what it ran (each kind of run adds its own fields)."""
    return {
        "scenario": scenario.name,
        "target": target,
        "run": run,
        "records": scenario.records,
        "size_bytes": scenario.size,
        "attachment_bytes": batch.total_bytes,
        "smtp_delay_ms": scenario.smtp_delay_ms,
        "s3_delay_ms": scenario.s3_delay_ms,
        "env": env,
        "errors": [],
    }
