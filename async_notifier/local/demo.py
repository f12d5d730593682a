"""`make run-local`: the worker's whole job, end to end, on this machine.

A new user should see the real thing within a minute, with nothing but Python installed:
moto (or any endpoint already running, such as LocalStack) serves S3 and SQS, a mail catcher
files what the worker sends under the outbox, and the SQS runner — the same batch code as the
Lambda function — drains a queue holding good and bad notifications. The report says, per
message, what happened and where its email is, and the exit status says whether every
message ended where it should (emailed, or in the dead-letter queue after its retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import random
import sys
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from ..batch.outcome import BatchResult
from ..config import Settings
from ..logs import JsonFormatter, configure
from ..runner import RunnerStats
from ..runner import run as run_queue
from ..wiring import build_notifier
from .mailcatcher import CaughtMail, MailCatcher, clear_outbox
from .moto import MotoProcess

REGION = "us-east-1"
LOG_NAME = "worker.log"
Expect = Literal["sent", "dlq"]


@dataclass(frozen=True)
class Options:
    messages: int = 8
    zip_size: int = 256 * 1024
    outbox: Path = Path("outbox")
    endpoint_url: str | None = None  # None: start moto here
    visibility_timeout: int = 2  # seconds: failures come back fast, so the demo is short
    max_receive_count: int = 5
    wait_time: int = 1
    timeout: float = 120.0


@dataclass
class Sample:
    """One message the demo sends, what it should become, and what it became."""

    number: int
    label: str
    body: str
    expect: Expect
    video_id: str | None = None
    zip_key: str | None = None
    message_id: str = ""
    tries: int = 0
    error: str | None = None
    emails: list[CaughtMail] = field(default_factory=list)
    in_dlq: bool = False

    @property
    def result(self) -> str:
        if self.emails:
            return "sent"
        if self.in_dlq:
            return "moved to DLQ"
        if self.tries == 0:
            return "not received"
        return "failed, will be retried"

    @property
    def as_expected(self) -> bool:
        return bool(self.emails) if self.expect == "sent" else self.in_dlq and not self.emails


@dataclass
class Report:
    samples: list[Sample]
    endpoint_url: str
    outbox: Path
    log_file: Path
    stats: RunnerStats | None = None
    resource_name: str = ""  # the bucket and the queue (its DLQ: +"-dlq")
    interrupted: bool = False
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.interrupted
            and not self.timed_out
            and all(sample.as_expected for sample in self.samples)
        )


# --------------------------------------------------------------------------- samples


def make_zip(size: int, seed: int) -> bytes:
    """A real ZIP of fake JPEG frames, about `size` bytes (stored: random bytes don't shrink)."""
    rng = random.Random(seed)
    frame = 64 * 1024
    count = max(1, -(-size // frame))
    overhead = 22 + count * (76 + 2 * len("frame_0000.jpg"))
    share = max(1, (size - overhead) // count)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for index in range(1, count + 1):
            info = zipfile.ZipInfo(f"frame_{index:04d}.jpg", date_time=(2024, 1, 1, 0, 0, 0))
            archive.writestr(info, rng.randbytes(share))
    return buffer.getvalue()


_PEOPLE = {
    "pt-BR": ("Ana Souza", "ana.souza@example.com", "férias na praia.mp4"),
    "en": ("John Smith", "john.smith@example.com", "team offsite.mov"),
}


# The first messages cover every case, so even MESSAGES=3 shows COMPLETED, FAILED and bad.
_KINDS = (
    "completed:pt-BR",
    "failed:en",
    "bad-json",
    "completed:en",
    "bad-email",
    "failed:pt-BR",
    "missing-zip:pt-BR",
)


def _kind(number: int) -> str:
    if number <= len(_KINDS):
        return _KINDS[number - 1]
    return "completed:pt-BR" if number % 2 else "completed:en"


def build_samples(count: int, bucket: str) -> list[Sample]:
    """Good and bad notifications; the first three always cover COMPLETED, FAILED and bad."""
    if count < 3:
        raise ValueError("at least 3 messages: one COMPLETED, one FAILED and one bad")
    samples: list[Sample] = []
    now = datetime.now(UTC).isoformat(timespec="seconds")
    for number in range(1, count + 1):
        video_id = f"demo-{number:04d}"
        kind = _kind(number)
        if kind == "bad-json":
            samples.append(Sample(number, "bad: not JSON", '{"video_id": "demo-broken", ', "dlq"))
            continue
        if kind == "bad-email":
            body = {"video_id": video_id, "status": "COMPLETED", "bucket": bucket, "key": "x.zip"}
            samples.append(
                Sample(number, "bad: no email", json.dumps(body), "dlq", video_id=video_id)
            )
            continue
        status, locale = kind.split(":")
        name, address, file_name = _PEOPLE[locale]
        message: dict[str, Any] = {
            "video_id": video_id,
            "status": "FAILED" if status == "failed" else "COMPLETED",
            "email": address,
            "name": name,
            "file_name": file_name,
            "locale": locale,
            "timestamp": now,
        }
        zip_key = None
        if status == "failed":
            message["message"] = "ffmpeg: moov atom not found (the upload looks truncated)"
            label = f"FAILED {locale}"
        else:
            zip_key = f"frames/{video_id}.zip"
            message.update(bucket=bucket, key=zip_key)
            label = f"COMPLETED {locale}"
        expect: Expect = "sent"
        if status == "missing-zip":
            label = f"COMPLETED {locale}, ZIP missing"
            zip_key = None  # announced but never uploaded
            expect = "dlq"
        samples.append(
            Sample(number, label, json.dumps(message), expect, video_id=video_id, zip_key=zip_key)
        )
    return samples


# --------------------------------------------------------------------------- the run


def worker_environment(endpoint_url: str, smtp_port: int) -> dict[str, str]:
    """The worker's settings for the demo: local endpoints only, and fake AWS credentials.

    Fake credentials also make it impossible to touch a real AWS account by mistake.
    """
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint_url,
        "SMTP_SERVER": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "SMTP_TLS": "none",
        "EMAIL_FROM": "Async Notifier <no-reply@example.com>",
        # Let the queue's short visibility timeout and redrive policy do the retrying, as
        # the demo shows; the worker's own back-off would stretch it to minutes.
        "RETRY_BACKOFF": "false",
    }


_UNSET = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "SMTP_USER",
    "SMTP_PASSWORD",
    "SMTP_CA_FILE",
    "ALLOWED_BUCKETS",
    "DEAD_LETTER_QUEUE_URL",
    "IDEMPOTENCY_TABLE",
)


def apply_environment(values: dict[str, str]) -> None:
    for name in _UNSET:
        os.environ.pop(name, None)
    os.environ.update(values)


def _client(service: str, endpoint_url: str) -> Any:
    import aioboto3
    from aiobotocore.config import AioConfig

    return aioboto3.Session().client(
        service,
        region_name=REGION,
        endpoint_url=endpoint_url,
        config=AioConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


@contextlib.contextmanager
def _worker_log(path: Path, level: str) -> Iterator[None]:
    """Send the worker's JSON logs to a file, so the terminal shows only the report.

    The package's own handlers stay attached (so `configure` stays idempotent) but muted,
    whatever stream they write to.
    """
    logger = configure(level)
    file_handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    file_handler.setFormatter(JsonFormatter())
    muted = list(logger.handlers)
    for handler in muted:
        handler.addFilter(_drop)
    logger.addHandler(file_handler)
    try:
        yield
    finally:
        logger.removeHandler(file_handler)
        file_handler.close()
        for handler in muted:
            handler.removeFilter(_drop)


def _drop(record: logging.LogRecord) -> bool:
    return False


@contextlib.asynccontextmanager
async def _resources(
    sqs: Any, s3: Any, options: Options, *, cleanup: bool
) -> AsyncIterator[tuple[str, str, str]]:
    """A bucket, a queue and its DLQ with unique names; removed afterwards when asked."""
    name = f"async-notifier-demo-{uuid.uuid4().hex[:8]}"
    bucket = name
    await s3.create_bucket(Bucket=bucket)
    dlq_url = (await sqs.create_queue(QueueName=f"{name}-dlq"))["QueueUrl"]
    dlq_arn = (await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"]))[
        "Attributes"
    ]["QueueArn"]
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(options.max_receive_count)}
    queue_url = (
        await sqs.create_queue(
            QueueName=name,
            Attributes={
                "VisibilityTimeout": str(options.visibility_timeout),
                "RedrivePolicy": json.dumps(redrive),
            },
        )
    )["QueueUrl"]
    try:
        yield bucket, queue_url, dlq_url
    finally:
        if cleanup:
            with contextlib.suppress(Exception):
                await sqs.delete_queue(QueueUrl=queue_url)
                await sqs.delete_queue(QueueUrl=dlq_url)
            with contextlib.suppress(Exception):
                listing = await s3.list_objects_v2(Bucket=bucket)
                for item in listing.get("Contents", []):
                    await s3.delete_object(Bucket=bucket, Key=item["Key"])
                await s3.delete_bucket(Bucket=bucket)


async def _dead_letters(sqs: Any, dlq_url: str) -> tuple[set[str], set[str]]:
    """Message ids in the DLQ, moved by the redrive policy or copied by the worker."""
    ids: set[str] = set()
    originals: set[str] = set()
    while True:
        response = await sqs.receive_message(
            QueueUrl=dlq_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            VisibilityTimeout=60,
            MessageAttributeNames=["All"],
        )
        messages = response.get("Messages", [])
        if not messages:
            return ids, originals
        for message in messages:
            ids.add(message["MessageId"])
            original = message.get("MessageAttributes", {}).get("original_message_id", {})
            if original.get("StringValue"):
                originals.add(original["StringValue"])


async def run_local(
    options: Options, *, out: TextIO = sys.stdout, stop: asyncio.Event | None = None
) -> Report:
    """Start what is missing, run the demo, print the report, stop everything again."""
    started = time.monotonic()
    stop = stop or asyncio.Event()
    outbox = options.outbox
    outbox.mkdir(parents=True, exist_ok=True)
    clear_outbox(outbox)
    log_file = outbox / LOG_NAME
    with contextlib.ExitStack() as stack:
        moto: MotoProcess | None = None
        if options.endpoint_url:
            endpoint_url = options.endpoint_url.rstrip("/")
        else:
            moto = stack.enter_context(MotoProcess())  # first: forks before any thread
            endpoint_url = moto.endpoint_url
        catcher = stack.enter_context(MailCatcher(outbox))
        apply_environment(worker_environment(endpoint_url, catcher.port))
        settings = Settings.from_env()
        stack.enter_context(_worker_log(log_file, settings.log_level))
        where = f"moto, started for this run, pid {moto.pid}" if moto else "already running"
        _print(out, f"S3 + SQS:     {endpoint_url} ({where})")
        _print(out, f"mail catcher: smtp://127.0.0.1:{catcher.port} → {_show(outbox)}/")

        report = Report([], endpoint_url, outbox, log_file)
        async with (
            _client("sqs", endpoint_url) as sqs,
            _client("s3", endpoint_url) as s3,
            _resources(sqs, s3, options, cleanup=moto is None) as (bucket, queue_url, dlq_url),
        ):
            report.resource_name = bucket
            report.samples = samples = build_samples(options.messages, bucket)
            for sample in samples:
                if sample.zip_key:
                    body = make_zip(options.zip_size, seed=sample.number)
                    await s3.put_object(Bucket=bucket, Key=sample.zip_key, Body=body)
            for sample in samples:
                response = await sqs.send_message(
                    QueueUrl=queue_url,
                    MessageBody=sample.body,
                    MessageAttributes={
                        "sample": {"DataType": "String", "StringValue": sample.label},
                        "sample_number": {"DataType": "Number", "StringValue": str(sample.number)},
                    },
                )
                sample.message_id = response["MessageId"]
            zips = sum(1 for s in samples if s.zip_key)
            _print(
                out,
                f"queue:        {queue_url.rsplit('/', 1)[-1]} (VisibilityTimeout "
                f"{options.visibility_timeout} s, DLQ after {options.max_receive_count} "
                f"receives), bucket {bucket} ({zips} ZIPs of {_size(options.zip_size)})",
            )
            _print(
                out,
                f"sent {len(samples)} messages; running the SQS runner until the queue is "
                "drained (failed messages come back until they reach the DLQ)...",
            )
            by_id = {sample.message_id: sample for sample in samples}

            def on_batch(records: list[dict[str, Any]], result: BatchResult) -> None:
                errors = {outcome.message_id: outcome for outcome in result.errors}
                for record in records:
                    sample = by_id.get(record["messageId"])
                    if sample is None:
                        continue
                    sample.tries += 1
                    outcome = errors.get(record["messageId"])
                    if outcome is not None and outcome.error is not None:
                        sample.error = f"{outcome.error.kind}: {outcome.error.reason}"
                failed = len(result.failures)
                _print(
                    out,
                    f"  batch of {len(records)}: {len(records) - failed} ok, {failed} failed",
                )

            watchdog = asyncio.get_running_loop().call_later(options.timeout, stop.set)
            try:
                async with build_notifier(settings) as notifier:
                    report.stats = await run_queue(
                        settings,
                        queue_url,
                        notifier=notifier,
                        batch_size=10,
                        batch_window=0.2,
                        wait_time=options.wait_time,
                        drain=True,
                        stop=stop,
                        on_batch=on_batch,
                    )
            finally:
                watchdog.cancel()
            if not report.stats.drained:
                report.timed_out = time.monotonic() - started >= options.timeout
                report.interrupted = not report.timed_out
            ids, originals = await _dead_letters(sqs, dlq_url)
            for sample in samples:
                sample.in_dlq = sample.message_id in ids or sample.message_id in originals
                sample.emails = [m for m in catcher.messages if m.video_id == sample.video_id]
    report.seconds = time.monotonic() - started
    print_report(report, options, out)
    return report


# --------------------------------------------------------------------------- the report


def print_report(report: Report, options: Options, out: TextIO) -> None:
    rows = [("#", "message", "result", "tries", "email files / reason")]
    for sample in report.samples:
        if sample.emails:
            detail = "  ".join(_files(mail) for mail in sample.emails)
        else:
            detail = _clip(sample.error or "-", 110)
        rows.append((str(sample.number), sample.label, sample.result, str(sample.tries), detail))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    _print(out, "")
    for row in rows:
        _print(
            out,
            f"{row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  "
            f"{row[3]:>{widths[3]}}  {row[4]}".rstrip(),
        )
    _print(out, "")
    sent = sum(1 for s in report.samples if s.emails)
    dead = sum(1 for s in report.samples if s.in_dlq)
    summary = (
        f"{len(report.samples)} messages: {sent} emailed, {dead} in the dead-letter queue"
        f" ({report.seconds:.1f} s)."
    )
    if report.interrupted:
        summary += " Interrupted before the queue was drained."
    elif report.timed_out:
        summary += f" Timed out after {options.timeout:.0f} s before the queue was drained."
    elif report.ok:
        summary += " Every message ended where it should."
    else:
        wrong = [str(s.number) for s in report.samples if not s.as_expected]
        summary += f" Unexpected result for message(s) {', '.join(wrong)}."
    _print(out, summary)
    _print(
        out,
        f"Open the .html files in a browser and the .eml files in a mail client; "
        f"worker logs: {_show(report.log_file)}",
    )


def _files(mail: CaughtMail) -> str:
    names = [_show(mail.eml)]
    if mail.html is not None:
        names.append(_show(mail.html))
    return "  ".join(names)


def _show(path: Path) -> str:
    """Relative to the current directory when inside it: shorter, and clickable in terminals."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _size(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MiB"
    if size >= 1024:
        return f"{size // 1024} KiB"
    return f"{size} B"


def _print(out: TextIO, line: str) -> None:
    print(line, file=out, flush=True)
