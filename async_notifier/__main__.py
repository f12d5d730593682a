"""Command line: `async-notifier run --queue-url URL` (or `python -m async_notifier run ...`).

`run` runs the SQS runner, so the worker can live in a container or on a VM with the same
batch code as the Lambda function; settings come from the same environment variables.
`preview` renders one email to files without sending it, for whoever edits the templates.
`redrive` moves dead-lettered notifications back to a queue once their cause is fixed.
`status` prints what became of a video's notifications (STATUS_TABLE). `canary` proves a
deployment: it mails SES's mailbox simulator through the queue and waits for the statuses.
Each command imports its modules when it runs, so neither pays for the other's (and
`--help` stays instant).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from . import __version__

if TYPE_CHECKING:
    from .aws.redrive import Progress, RedriveResult

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130
# SQS's limit for WaitTimeSeconds: runner.MAX_WAIT_TIME, repeated so that building the
# parser does not import the runner (tests/test_preview.py checks they agree).
MAX_WAIT_TIME = 20
# SQS's limit for MaxNumberOfMessagesPerSecond: aws.redrive.MAX_MOVE_RATE, repeated for the
# same reason (tests/aws/test_redrive.py checks they agree).
MAX_MOVE_RATE = 500


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _wait_time(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_WAIT_TIME:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_WAIT_TIME}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be a number of seconds, at least 0")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a number of seconds, more than 0")
    return value


def _move_rate(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_MOVE_RATE:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_MOVE_RATE}")
    return value


def _queue_url(text: str) -> str:
    if not text.startswith(("https://", "http://")) or text.count("/") < 4:
        raise argparse.ArgumentTypeError(
            f"not a queue URL: {text[:200]!r} (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="async-notifier",
        description="Email users the ZIP of their video's frames, from SQS notifications.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run",
        help="consume an SQS queue as Lambda's event source mapping would",
        description=(
            "Long-poll an SQS queue, process batches with the same code as the Lambda "
            "handler (each within --batch-timeout, its messages kept hidden meanwhile), "
            "delete the successes and leave failures for redelivery (and the DLQ). "
            "SIGTERM/SIGINT stop it after the batch in flight. Settings are read from the "
            "environment (SMTP_SERVER, EMAIL_FROM, AWS_REGION, AWS_ENDPOINT_URL...)."
        ),
    )
    run_parser.add_argument("--queue-url", required=True, help="the SQS queue to consume")
    run_parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=100,
        help="most records per batch (default: %(default)s)",
    )
    run_parser.add_argument(
        "--batch-window",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="how long to keep filling a batch after its first message (default: %(default)s)",
    )
    run_parser.add_argument(
        "--wait-time",
        type=_wait_time,
        default=MAX_WAIT_TIME,
        metavar="SECONDS",
        help="ReceiveMessage long-poll WaitTimeSeconds, 0-20 (default: %(default)s)",
    )
    run_parser.add_argument(
        "--batch-timeout",
        type=_positive_seconds,
        default=900.0,
        metavar="SECONDS",
        help=(
            "time allowed per batch, as a Lambda function's timeout: records still running "
            "DEADLINE_MARGIN_SECONDS before it are cancelled and retried (default: %(default)s)"
        ),
    )
    run_parser.add_argument(
        "--drain",
        action="store_true",
        help="exit once the queue is empty, failures waiting for redelivery included",
    )
    run_parser.add_argument(
        "--max-batches", type=_positive_int, metavar="N", help="exit after N batches"
    )
    run_parser.add_argument(
        "--fleet-size",
        type=_positive_int,
        metavar="N",
        help=(
            "how many runners share the mail account's rate (SMTP_RATE_LIMIT): each paces "
            "itself to its share (default: FLEET_SIZE, else 1)"
        ),
    )
    preview_parser = commands.add_parser(
        "preview",
        help="render an email to .html, .txt and .eml files without sending it",
        description=(
            "Render the email for one message body with the worker's own parser, templates "
            "(CSS inlined) and MIME builder, write OUT/<status>-<locale>.{html,txt,eml} and "
            "print the subject. Nothing is sent and no AWS or SMTP setting is needed. "
            "COMPLETED emails get a small dummy ZIP attached, or a download link with --link."
        ),
    )
    preview_parser.add_argument(
        "--data",
        type=Path,
        metavar="FILE",
        help="JSON file with the message body (the SQS body's fields); default: a built-in sample",
    )
    preview_parser.add_argument(
        "--status",
        type=str.upper,
        choices=("COMPLETED", "FAILED"),
        help="override the data's status",
    )
    preview_parser.add_argument("--locale", help="override the data's locale (pt-BR, en)")
    preview_parser.add_argument(
        "--link",
        metavar="URL",
        help="COMPLETED only: show the download-link variant (ZIP too large to attach)",
    )
    preview_parser.add_argument(
        "--out",
        type=Path,
        default=Path("preview"),
        metavar="DIR",
        help="where to write the files (default: %(default)s)",
    )
    preview_parser.add_argument(
        "--from",
        dest="sender",
        metavar="ADDRESS",
        help='the From header (default: "Async Notifier <no-reply@example.com>")',
    )
    preview_parser.add_argument(
        "--templates",
        type=Path,
        metavar="DIR",
        help="templates directory to render from (default: the package's templates/)",
    )
    redrive_parser = commands.add_parser(
        "redrive",
        help="move dead-lettered notifications back to a queue",
        description=(
            "Move the messages of a dead-letter queue back to a queue, once the cause of "
            "their failure is fixed. Without --reason SQS moves them all (a message move "
            "task); with --reason, or where move tasks do not exist, they are copied and "
            "deleted one by one. Prints a summary by reason (error_class). Needs only "
            "AWS_REGION and AWS_ENDPOINT_URL (and the usual AWS credentials)."
        ),
    )
    redrive_parser.add_argument(
        "--from",
        dest="source",
        type=_queue_url,
        required=True,
        metavar="DLQ_URL",
        help="the dead-letter queue",
    )
    redrive_parser.add_argument(
        "--to",
        dest="destination",
        type=_queue_url,
        metavar="QUEUE_URL",
        help="where the messages go (default: the DLQ's one source queue)",
    )
    redrive_parser.add_argument(
        "--reason",
        metavar="REASON[,REASON...]",
        help=(
            "move only the messages with these error_class values (max_receive_count: those "
            "SQS's redrive policy moved); the rest stay in the DLQ"
        ),
    )
    redrive_parser.add_argument(
        "--dry-run",
        action="store_true",
        help="count the messages by reason, move nothing",
    )
    redrive_parser.add_argument(
        "--max-per-second",
        type=_move_rate,
        metavar="N",
        help=f"move at most N messages a second, 1-{MAX_MOVE_RATE} (default: as fast as SQS)",
    )
    status_parser = commands.add_parser(
        "status",
        help="print the delivery status and history of a video's notifications, or of one",
        description=(
            "Print each notification's delivery status (STATUS_TABLE) and its history: "
            "every state with its time, reason, provider message id, transport and attempt. "
            "Exit 0 when something was found, 1 when nothing was, 2 on a usage or settings "
            "error, 3 when the table cannot be read. Needs STATUS_TABLE, AWS_REGION "
            "(and AWS_ENDPOINT_URL), and credentials allowed dynamodb:GetItem and "
            "dynamodb:Query on the table."
        ),
    )
    status_parser.add_argument(
        "--video-id", metavar="ID", help="every notification of this video, oldest first"
    )
    status_parser.add_argument(
        "--notification-id",
        metavar="ID",
        help=(
            "one notification: its tracking id (the status events' tracking_id) or its "
            "email's Message-ID; with --video-id, also the producer's notification_id"
        ),
    )
    status_parser.add_argument(
        "--json", action="store_true", help="print JSON for scripts instead of text"
    )
    canary_parser = commands.add_parser(
        "canary",
        help="prove the deployed path: mail SES's mailbox simulator, wait for the statuses",
        description=(
            "Publish three notifications to the notification queue, addressed to SES's "
            "mailbox simulator (success, bounce and complaint addresses), and wait until "
            "STATUS_TABLE says delivered, bounced and complained. Exit 0 when all three "
            "came, 1 when one is missing (each listed, with what came instead), 2 on a "
            "settings error, 3 when the queue or the table cannot be used. Needs "
            "STATUS_TABLE, AWS_REGION, and credentials allowed sqs:SendMessage on the queue "
            "and dynamodb:GetItem on the table. The first thing to run after `sam deploy`."
        ),
    )
    canary_parser.add_argument(
        "--queue-url", type=_queue_url, required=True, help="the notification queue"
    )
    canary_parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the statuses (default: %(default)s)",
    )
    canary_parser.add_argument(
        "--interval",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="how often to read them (default: %(default)s)",
    )
    canary_parser.add_argument(
        "--zip",
        metavar="s3://BUCKET/KEY",
        help=(
            "send COMPLETED notifications of this ZIP (it must exist in an allowed bucket), "
            "which adds the download to the path; default: FAILED ones, which need none"
        ),
    )
    canary_parser.add_argument(
        "--json", action="store_true", help="print the run's summary as JSON"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "preview":
        return _preview(args)
    if args.command == "redrive":
        return _redrive(args)
    if args.command == "status":
        return _status(args)
    if args.command == "canary":
        return _canary(args)
    return _run(args)


def _preview(args: argparse.Namespace) -> int:
    from .config import DEFAULT_TEMPLATES_DIR
    from .mail.preview import (
        DEFAULT_SENDER,
        PreviewError,
        load_notification,
        parse_sender,
        read_data,
        render_preview,
    )

    try:
        data = None if args.data is None else read_data(args.data)
        notification = load_notification(
            data, status=args.status, locale=args.locale, source=str(args.data or "sample")
        )
        preview = render_preview(
            notification,
            out_dir=args.out,
            sender=parse_sender(args.sender or DEFAULT_SENDER),
            templates_dir=args.templates or DEFAULT_TEMPLATES_DIR,
            link=args.link,
        )
    except PreviewError as exc:
        print(f"async-notifier preview: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"Subject: {preview.subject}")
    for path in (preview.html, preview.text, preview.eml):
        print(f"  {path}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses

    from .config import ConfigError, Settings
    from .logs import get_logger
    from .runner import RunnerStats, run, run_until_signal
    from .wiring import build_notifier

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"async-notifier: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.fleet_size is not None:
        settings = dataclasses.replace(settings, fleet_size=args.fleet_size)

    async def work(stop: asyncio.Event) -> RunnerStats:
        async with build_notifier(settings) as notifier:
            return await run(
                settings,
                args.queue_url,
                notifier=notifier,
                batch_size=args.batch_size,
                batch_window=args.batch_window,
                wait_time=args.wait_time,
                batch_timeout=args.batch_timeout,
                drain=args.drain,
                max_batches=args.max_batches,
                stop=stop,
            )

    try:
        asyncio.run(run_until_signal(work))
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("async-notifier: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:  # a setting only the start could judge (the SMTP secret)
        print(f"async-notifier: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:
        # Startup failures (queue missing, endpoint unreachable): logged with the traceback,
        # then one plain line for whoever reads the terminal.
        get_logger().error("runner failed", exc_info=True)
        print(f"async-notifier: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def _redrive(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from .aws.errors import aws_error
    from .aws.redrive import RedriveError, parse_reasons, redrive, sqs_client

    def fail(text: str, status: int) -> int:
        print(f"async-notifier redrive: {text}", file=sys.stderr)
        return status

    try:
        reasons = parse_reasons(args.reason) if args.reason is not None else None
    except ValueError as exc:
        return fail(f"--reason: {exc}", EXIT_CONFIG)
    region = os.environ.get("AWS_REGION", "").strip() or "us-east-1"
    endpoint_url = os.environ.get("AWS_ENDPOINT_URL", "").strip() or None
    bar = ProgressBar(sys.stderr)
    tasks: list[str] = []

    def notice(text: str) -> None:
        if text.startswith("SQS message move task started: "):
            tasks.append(text.rpartition(" ")[2])
        bar.interrupt()
        print(f"async-notifier redrive: {text}", file=sys.stderr)

    async def work() -> RedriveResult:
        async with sqs_client(region, endpoint_url) as sqs:
            return await redrive(
                sqs,
                args.source,
                destination_url=args.destination,
                reasons=reasons,
                dry_run=args.dry_run,
                max_per_second=args.max_per_second,
                on_progress=bar,
                on_notice=notice,
            )

    try:
        result = asyncio.run(work())
    except RedriveError as exc:
        return fail(str(exc), EXIT_CONFIG)
    except (asyncio.CancelledError, KeyboardInterrupt):
        bar.interrupt()
        if tasks:
            print(
                f"async-notifier redrive: the move task goes on in SQS; to stop it: "
                f"aws sqs cancel-message-move-task --task-handle {tasks[-1]}",
                file=sys.stderr,
            )
        return fail("interrupted", EXIT_INTERRUPTED)
    except TimeoutError as exc:
        bar.interrupt()
        return fail(str(exc) or "no answer in time", 1)
    except Exception as exc:
        bar.interrupt()
        error = aws_error(exc)
        if error.code is None:  # no answer: say where it was asked
            return fail(f"{error.type_name} (SQS at {endpoint_url or region})", 1)
        return fail(error.describe(), 1)
    finally:
        bar.close()
    for line in redrive_problems(result):
        print(f"async-notifier redrive: {line}", file=sys.stderr)
    print(redrive_summary(result))
    return 0 if result.ok else 1


EXIT_NOT_FOUND = 1
EXIT_UNAVAILABLE = 3


def _status(args: argparse.Namespace) -> int:
    import asyncio

    from .aws.clients import aws_client
    from .aws.status import DynamoStatusReader, tracking_id_from
    from .config import ConfigError, Settings
    from .delivery_status import StatusRecord
    from .errors import StatusUnavailable
    from .status_view import records_json, records_text

    def fail(text: str, status: int) -> int:
        print(f"async-notifier status: {text}", file=sys.stderr)
        return status

    video_id: str | None = args.video_id
    wanted: str | None = args.notification_id
    if not video_id and not wanted:
        return fail("give --video-id or --notification-id (or both)", EXIT_CONFIG)
    key = tracking_id_from(wanted) if wanted else None
    if wanted and key is None and not video_id:
        return fail(
            f"--notification-id {wanted[:80]!r} is not a tracking id (40 hex digits) nor a "
            "Message-ID: to find a producer's notification_id, give its --video-id too",
            EXIT_CONFIG,
        )
    try:
        settings = Settings.for_status()
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    table = settings.status_table or ""

    async def read() -> list[StatusRecord]:
        async with aws_client("dynamodb", settings) as client:
            reader = DynamoStatusReader(client, table)
            if not video_id:
                found = await reader.get(key or "")
                return [] if found is None else [found]
            records = await reader.for_video(video_id)
            if wanted:
                records = [
                    r for r in records if key == r.tracking_id or wanted == r.notification_id
                ]
            return records

    try:
        records = asyncio.run(read())
    except StatusUnavailable as exc:
        return fail(f"{exc} (table {table})", EXIT_UNAVAILABLE)
    except (asyncio.CancelledError, KeyboardInterrupt):
        return fail("interrupted", EXIT_INTERRUPTED)
    if args.json:
        print(records_json(records))
    elif records:
        print(records_text(records))
    if not records:
        asked = " and ".join(
            f"{name} {value}"
            for name, value in (("video", video_id), ("notification", wanted))
            if value
        )
        return fail(f"no status for {asked} in {table}", EXIT_NOT_FOUND)
    return 0


def _canary(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from .canary import CanaryResult, new_run_id, parse_zip_location
    from .config import ConfigError, Settings
    from .wiring import run_canary_on

    def fail(text: str, status: int) -> int:
        print(f"async-notifier canary: {text}", file=sys.stderr)
        return status

    try:
        zip_location = parse_zip_location(args.zip) if args.zip else None
    except ValueError as exc:
        return fail(f"--zip: {exc}", EXIT_CONFIG)
    try:
        settings = Settings.for_status()
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    run_id = new_run_id()
    seen: dict[str, str] = {}

    def progress(result: CanaryResult) -> None:
        for entry in result.results:
            status = entry.record.status if entry.record is not None else "-"
            if seen.get(entry.probe.kind, "-") != status:
                seen[entry.probe.kind] = status
                print(f"  {entry.probe.kind}: {status}", file=sys.stderr, flush=True)

    print(
        f"async-notifier canary {run_id}: 3 notifications to SES's mailbox simulator via "
        f"{args.queue_url}; waiting up to {args.timeout:g} s for their statuses in "
        f"{settings.status_table}...",
        file=sys.stderr,
        flush=True,
    )
    try:
        result = asyncio.run(
            run_canary_on(
                settings,
                args.queue_url,
                run_id=run_id,
                wait=args.timeout,
                interval=args.interval,
                zip_location=zip_location,
                on_progress=progress,
            )
        )
    except (asyncio.CancelledError, KeyboardInterrupt):
        return fail("interrupted", EXIT_INTERRUPTED)
    if args.json:
        print(json.dumps(result.summary(), indent=2))
    else:
        for entry in result.results:
            status = entry.record.status if entry.record is not None else "no status"
            verdict = "ok" if entry.ok else "MISSING"
            print(
                f"{entry.probe.kind:<9}  expected {entry.probe.expected:<10}  got "
                f"{status:<13}  {verdict}  {entry.probe.tracking_id}"
            )
    if result.error is not None:
        return fail(result.error, EXIT_UNAVAILABLE)
    if not result.ok:
        why = f"timed out after {args.timeout:g} s" if result.timed_out else "a dead end"
        for line in result.missing():
            fail(f"missing: {line}", 1)
        return fail(f"FAILED ({why}): run {run_id}", 1)
    print(f"async-notifier canary: passed in {result.seconds:.1f} s", file=sys.stderr)
    return 0


class ProgressBar:
    """`redrive`'s progress on a stream: one bar redrawn with `\\r` on a terminal, else a
    line every `interval` seconds (a log file must not get one per round)."""

    WIDTH = 30

    def __init__(self, stream: TextIO, *, tty: bool | None = None, interval: float = 5.0):
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._interval = interval
        self._last = -math.inf
        self._drawn = False

    def __call__(self, progress: Progress) -> None:
        text = self.render(progress)
        if self._tty:
            self._stream.write(f"\r{text}")
            self._drawn = True
        else:
            now = time.monotonic()
            if now - self._last < self._interval:
                return
            self._last = now
            self._stream.write(f"{text}\n")
        self._stream.flush()

    def render(self, progress: Progress) -> str:
        counts = f"{progress.moved} moved, {progress.seen} seen"
        if not progress.total:
            return counts
        done = min(1.0, progress.seen / progress.total)
        filled = round(done * self.WIDTH)
        return f"[{'#' * filled}{'-' * (self.WIDTH - filled)}] {counts} of about {progress.total}"

    def interrupt(self) -> None:
        """End the bar's line, so that other output starts on a line of its own."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False

    def close(self) -> None:
        self.interrupt()


def _by_reason(counts: Counter[str]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted_counts(counts))


def sorted_counts(counts: Counter[str]) -> list[tuple[str, int]]:
    """The largest count first, then by name: the same order on every run."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def redrive_summary(result: RedriveResult) -> str:
    """One line for stdout, e.g. `moved 12 of 15 messages to URL: expired 10, ...; left 3
    (bad_message 3)`."""
    to = result.destination_url
    if result.task is not None:
        task = result.task
        line = (
            f"moved {task.moved} of {max(task.moved, task.to_move or 0)} messages to {to} "
            f"(SQS message move task {task.status}"
        )
        if task.failure_reason:
            line += f": {task.failure_reason}"
        return line + ")"
    if result.method == "dry_run":
        selected = sum(result.selected.values())
        line = f"dry run: would move {selected} of {result.seen_count} messages to {to}"
        if result.selected:
            line += f": {_by_reason(result.selected)}"
        left = sum(result.left.values())
        if left:
            line += f"; would leave {left} ({_by_reason(result.left)})"
        return line
    line = f"moved {result.moved_count} of {result.seen_count} messages to {to}"
    if result.moved:
        line += f": {_by_reason(result.moved)}"
    failed = sum(result.failed.values())
    if failed:
        line += f"; not moved {failed} ({_by_reason(result.failed)})"
    left = sum(result.left.values())
    if left:
        line += f"; left {left} ({_by_reason(result.left)})"
    return line


def redrive_problems(result: RedriveResult) -> list[str]:
    """What the operator must know besides the summary (stderr)."""
    lines: list[str] = []
    if result.error is not None:
        lines.append(f"stopped early: {result.error}")
    if result.failed:
        lines.append(
            f"{sum(result.failed.values())} messages could not be sent: they stay in the DLQ"
        )
    if result.not_deleted:
        lines.append(
            f"{len(result.not_deleted)} messages were sent but not deleted from the DLQ, so "
            "they are in both queues (a second delivery is harmless with IDEMPOTENCY_TABLE "
            f"set: the worker mails a notification once); message ids: "
            f"{', '.join(result.not_deleted[:20])}"
        )
    if result.not_released:
        lines.append(
            f"{result.not_released} messages stay hidden in the DLQ for up to 15 minutes "
            "(ChangeMessageVisibility failed)"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
