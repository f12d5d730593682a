"""Command line: `async-notifier run --queue-url URL` (or `python -m async_notifier run ...`).

Runs the SQS runner, so the worker can live in a container or on a VM with the same batch
code as the Lambda function. Settings come from the same environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from . import __version__
from .config import Settings
from .errors import ConfigError
from .logs import get_logger
from .runner import MAX_WAIT_TIME, RunnerStats, run, run_until_signal

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


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
            "handler, delete the successes and leave failures for redelivery (and the DLQ). "
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
        "--drain",
        action="store_true",
        help="exit once the queue is empty, failures waiting for redelivery included",
    )
    run_parser.add_argument(
        "--max-batches", type=_positive_int, metavar="N", help="exit after N batches"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"async-notifier: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    async def work(stop: asyncio.Event) -> RunnerStats:
        return await run(
            settings,
            args.queue_url,
            batch_size=args.batch_size,
            batch_window=args.batch_window,
            wait_time=args.wait_time,
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
