"""Consume an SQS queue outside Lambda, the way Lambda's SQS event source mapping does.

The worker has to run in a container, on a VM and in `make run-local` with exactly the batch
code Lambda runs, so this module does what the event source mapping does: long-poll, gather a
batch up to a size or a time window, shape each message like a Lambda SQS record, call
`Notifier.process` within a per-batch deadline (as Lambda bounds an invocation by its
timeout), delete the successes and leave the failures to come back after their visibility
timeout (and reach the dead-letter queue after `maxReceiveCount` receives). Unlike Lambda it
also keeps the messages it holds invisible while a batch runs (a visibility heartbeat), so a
batch longer than the queue's visibility timeout is not delivered to a second consumer. One
SQS client serves the whole run: aiobotocore clients belong to the event loop that opened
them.

`records` shapes messages as Lambda records, `consumer` runs the loop, `heartbeat` keeps
held messages hidden, `signals` stops a run cleanly.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from ..aws.clients import aws_client
from ..config import Settings
from ..logs import get_logger
from .consumer import BatchCallback, BatchWorker, Consumer
from .heartbeat import HEARTBEAT_TASK_NAME, MIN_EXTENSION
from .limits import MAX_MESSAGES_PER_RECEIVE, MAX_WAIT_TIME, STARTUP_TIMEOUT
from .records import QueueInfo, lambda_record
from .signals import run_until_signal, stop_on_signals
from .stats import RunnerStats

__all__ = [
    "DEFAULT_BATCH_TIMEOUT",
    "HEARTBEAT_TASK_NAME",
    "MAX_POLLERS",
    "MAX_WAIT_TIME",
    "MIN_EXTENSION",
    "BatchCallback",
    "BatchWorker",
    "QueueInfo",
    "RunnerStats",
    "lambda_record",
    "run",
    "run_until_signal",
    "sqs_client",
    "stop_on_signals",
]

log = get_logger()

MAX_POLLERS = 10
DEFAULT_BATCH_TIMEOUT = 900.0  # the longest a Lambda invocation may run


def sqs_client(settings: Settings, *, pollers: int, wait_time: int) -> Any:
    """The run's single SQS client, with room for every poll plus the deletes."""
    return aws_client(
        "sqs",
        settings,
        max_pool_connections=pollers + MAX_POLLERS,
        read_timeout=wait_time + 20,  # a long poll must not look like a dead server
    )


async def run(
    settings: Settings,
    queue_url: str,
    *,
    notifier: BatchWorker,
    batch_size: int = 100,
    batch_window: float = 1.0,
    wait_time: int = MAX_WAIT_TIME,
    batch_timeout: float = DEFAULT_BATCH_TIMEOUT,
    drain: bool = False,
    max_batches: int | None = None,
    pollers: int | None = None,
    stop: asyncio.Event | None = None,
    on_batch: BatchCallback | None = None,
) -> RunnerStats:
    """Consume `queue_url` until `stop` is set, `max_batches` ran, or (with `drain`) it is empty.

    Each batch gets `batch_timeout` seconds (less if its messages could not stay hidden that
    long), with the cutoff `settings.deadline_margin` before it, as a Lambda invocation gets
    its timeout. `stop` ends the run after the batch being processed; no receive starts
    after it is set. `on_batch(records, result)` sees every batch after its deletes
    (run-local's report). The caller owns `notifier` (`wiring.build_notifier`) and closes it;
    the run checks its secrets first (`check_secrets`: a broken SMTP secret is refused).
    """
    if not 1 <= batch_size <= 10_000:
        raise ValueError("batch_size must be between 1 and 10000")
    if not 0 <= wait_time <= MAX_WAIT_TIME:
        raise ValueError(f"wait_time must be between 0 and {MAX_WAIT_TIME}")
    if batch_window < 0:
        raise ValueError("batch_window must not be negative")
    if not 0 < batch_timeout < math.inf:
        raise ValueError("batch_timeout must be a positive number of seconds")
    if max_batches is not None and max_batches < 1:
        raise ValueError("max_batches must be at least 1")
    if pollers is None:
        pollers = min(MAX_POLLERS, math.ceil(batch_size / MAX_MESSAGES_PER_RECEIVE))
    if pollers < 1:
        raise ValueError("pollers must be at least 1")
    stop = stop or asyncio.Event()
    # As in a Lambda function's init: a secret no login can use fails the start.
    await notifier.check_secrets()
    async with sqs_client(settings, pollers=pollers, wait_time=wait_time) as sqs:
        attributes = await _queue_attributes(sqs, queue_url)
        queue = QueueInfo(queue_url, attributes["QueueArn"])
        consumer = Consumer(
            sqs,
            queue,
            notifier,
            batch_size=batch_size,
            batch_window=batch_window,
            wait_time=wait_time,
            batch_timeout=batch_timeout,
            margin=settings.deadline_margin,
            visibility_timeout=int(attributes.get("VisibilityTimeout", 30)),
            drain=drain,
            max_batches=max_batches,
            pollers=pollers,
            stop=stop,
            on_batch=on_batch,
        )
        log.info(
            "runner started",
            extra={
                "queue_url": queue_url,
                "queue_arn": queue.arn,
                "batch_size": batch_size,
                "batch_window": batch_window,
                "wait_time": wait_time,
                "batch_timeout": batch_timeout,
                "visibility_timeout": consumer.heartbeat.visibility_timeout,
                "heartbeat_period": consumer.heartbeat.period,
                "pollers": pollers,
                "drain": drain,
                "fleet_size": settings.fleet_size,
                "send_rate": send_rate(settings),
            },
        )
        try:
            await consumer.consume()
        finally:
            await consumer.close()
        stats = consumer.stats
    log.info("runner stopped", extra=vars(stats))
    return stats


def send_rate(settings: Settings) -> float | str | None:
    """This runner's share of the account's rate: sends/s, "auto" (read from SES), or None."""
    limit = settings.smtp_rate_limit
    if limit is None or limit == "auto":
        return limit
    return limit / settings.fleet_size


async def _queue_attributes(sqs: Any, queue_url: str) -> dict[str, str]:
    """The queue's ARN (for the records) and visibility timeout (for the heartbeat)."""
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            response = await sqs.get_queue_attributes(
                QueueUrl=queue_url, AttributeNames=["QueueArn", "VisibilityTimeout"]
            )
    except TimeoutError:
        raise TimeoutError(
            f"GetQueueAttributes got no answer within {STARTUP_TIMEOUT:g} s"
        ) from None
    return dict(response["Attributes"])
