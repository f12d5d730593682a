"""Command line: `async-notifier run --queue-url URL` (or `python -m async_notifier run ...`).

`run` runs the SQS runner, so the worker can live in a container or on a VM with the same
batch code as the Lambda function; settings come from the same environment variables.
`preview` renders one email to files without sending it, for whoever edits the templates.
Each command imports its modules when it runs, so neither pays for the other's (and
`--help` stays instant).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130
# SQS's limit for WaitTimeSeconds: runner.MAX_WAIT_TIME, repeated so that building the
# parser does not import the runner (tests/test_preview.py checks they agree).
MAX_WAIT_TIME = 20


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "preview":
        return _preview(args)
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
    except Exception as exc:
        # Startup failures (queue missing, endpoint unreachable): logged with the traceback,
        # then one plain line for whoever reads the terminal.
        get_logger().error("runner failed", exc_info=True)
        print(f"async-notifier: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
