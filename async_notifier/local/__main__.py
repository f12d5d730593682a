"""`python -m async_notifier.local`: what `make run-local` runs (see `demo`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import ConfigError
from ..runner import stop_on_signals
from .demo import Options, Report, run_local

EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python -m async_notifier.local",
        description=(
            "Run the worker end to end on this machine: S3 + SQS (moto, or the endpoint "
            "given), a mail catcher writing to the outbox, and the SQS runner draining a "
            "queue of good and bad notifications. Prints what happened to each message."
        ),
    )
    parser.add_argument(
        "--messages",
        type=_at_least(3),
        default=defaults.messages,
        help="how many messages to send, at least 3 (default: %(default)s)",
    )
    parser.add_argument(
        "--zip-size",
        type=_at_least(1),
        default=defaults.zip_size,
        metavar="BYTES",
        help="size of each sample ZIP (default: %(default)s)",
    )
    parser.add_argument(
        "--outbox",
        type=Path,
        default=defaults.outbox,
        help="where the caught emails go (default: %(default)s)",
    )
    parser.add_argument(
        "--endpoint-url",
        default="",
        help="an S3 + SQS endpoint already running (e.g. LocalStack); default: start moto",
    )
    parser.add_argument(
        "--visibility-timeout",
        type=_at_least(1),
        default=defaults.visibility_timeout,
        metavar="SECONDS",
        help="the demo queue's VisibilityTimeout (default: %(default)s)",
    )
    parser.add_argument(
        "--max-receive-count",
        type=_at_least(1),
        default=defaults.max_receive_count,
        help="receives before SQS moves a message to the DLQ (default: %(default)s)",
    )
    parser.add_argument(
        "--transport",
        choices=("smtp", "ses"),
        default=defaults.transport,
        help=(
            "smtp: through the mail catcher; ses: through the endpoint's SES v2 API, the "
            "outbox filled from what it kept (default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout,
        metavar="SECONDS",
        help="give up if the queue is not drained by then (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = Options(
        messages=args.messages,
        zip_size=args.zip_size,
        outbox=args.outbox,
        endpoint_url=args.endpoint_url.strip() or None,
        visibility_timeout=args.visibility_timeout,
        max_receive_count=args.max_receive_count,
        timeout=args.timeout,
        transport=args.transport,
    )

    async def demo() -> Report:
        stop = asyncio.Event()
        task = asyncio.ensure_future(run_local(options, stop=stop))
        with stop_on_signals(stop, on_second=task.cancel):
            return await task

    try:
        report = asyncio.run(demo())
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("run-local: interrupted; everything it started has been stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        print(f"run-local: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        # Typically an endpoint given with AWS_ENDPOINT_URL that does not answer.
        where = f" (endpoint {options.endpoint_url})" if options.endpoint_url else ""
        print(f"run-local failed{where}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_UNEXPECTED
    if report.interrupted:
        return EXIT_INTERRUPTED
    return 0 if report.ok else EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
