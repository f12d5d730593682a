"""`make run-local`: the worker's whole job, end to end, on this machine.

A new user should see the real thing within a minute, with nothing but Python installed:
moto (or any endpoint already running, such as LocalStack) serves S3, SQS and DynamoDB, a
mail catcher files what the worker sends under the outbox, and the SQS runner — the same
batch code as the Lambda function — drains a queue holding good and bad notifications. Then
SES reports what became of each email: a delivery, or a permanent bounce for one of the
demo's recipients. No local endpoint publishes SES's events, so the demo writes the ones
SES would (`ses_feed`, labelled as simulated) and puts them on the SES events queue, where
the second entry point records them: the bounce in the suppression table, each event as its
email's delivery status (STATUS_TABLE). The next message to the bounced recipient is
suppressed. The report says, per message, what happened and where its email is, then each
notification's delivery status as `async-notifier status` reads it; the exit status says
whether every message ended where it should (emailed, recorded, or in the dead-letter
queue, with the status it should have).
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

from ..aws.errors import aws_error
from ..aws.status import DynamoStatusReader, create_status_table
from ..aws.tables import create_table
from ..batch.outcome import BatchResult
from ..config import Settings
from ..delivery_status import StatusRecord
from ..logs import JsonFormatter, configure
from ..runner import BatchWorker, RunnerStats
from ..runner import run as run_queue
from ..wiring import build_notifier, build_ses_recorder
from .mailcatcher import CaughtMail, MailCatcher, clear_outbox
from .moto import MotoProcess
from .ses_feed import Outcome, mail_tags, parse_email, recipients, ses_events, sns_envelope
from .ses_outbox import sent_messages

REGION = "us-east-1"
LOG_NAME = "worker.log"
Expect = Literal["sent", "dlq", "recorded"]
# The recipient SES reports as bounced in the demo's second part.
BOUNCING = "ana.souza@example.com"
SENDER = "no-reply@example.com"


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
    transport: Literal["smtp", "ses"] = "smtp"  # ses: the endpoint's SES v2 API


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
    recorded: bool = False  # an SES event the second entry point wrote down
    # The delivery status it should end with (None: none, its body is not a notification),
    # and, once read back from STATUS_TABLE, the one it has.
    expect_status: str | None = None
    status: StatusRecord | None = None
    status_read: bool = False

    @property
    def result(self) -> str:
        if self.emails:
            return "sent"
        if self.recorded:
            return "recorded"
        if self.in_dlq:
            return "moved to DLQ"
        if self.tries == 0:
            return "not received"
        return "failed, will be retried"

    @property
    def as_expected(self) -> bool:
        if self.status_read:
            found = self.status.status if self.status is not None else None
            if found != self.expect_status:
                return False
        if self.expect == "sent":
            return bool(self.emails)
        if self.expect == "recorded":
            return self.recorded
        return self.in_dlq and not self.emails


@dataclass
class Report:
    samples: list[Sample]
    endpoint_url: str
    outbox: Path
    log_file: Path
    stats: RunnerStats | None = None
    resource_name: str = ""  # the bucket and the queue (its DLQ: +"-dlq")
    skipped: str = ""  # a part of the demo this endpoint cannot show, and why
    status_table: str = ""  # where the statuses were read from ("": none were)
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
        if kind == "bad-email":  # not a notification: no tracking id, so no status
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
        # SES's (simulated) word on each email: the bouncing recipient's bounce.
        expect_status = "bounced" if address == BOUNCING else "delivered"
        if status == "missing-zip":
            label = f"COMPLETED {locale}, ZIP missing"
            zip_key = None  # announced but never uploaded
            expect = "dlq"
            expect_status = "dead_lettered"
        sample = Sample(number, label, json.dumps(message), expect, video_id, zip_key)
        sample.expect_status = expect_status
        samples.append(sample)
    return samples


def ses_samples(
    first_number: int, sent: list[tuple[bytes, str]], samples: list[Sample]
) -> list[Sample]:
    """The events SES would publish about the emails sent so far (`ses_feed`): a permanent
    bounce for those to BOUNCING, a delivery for the rest; one SES events queue message
    each, as SNS puts it there."""
    by_video = {sample.video_id: sample for sample in samples if sample.video_id}
    feed: list[Sample] = []
    for raw, provider_id in sent:
        message = parse_email(raw)
        video_id = (mail_tags(message).get("video_id") or [""])[0]
        source = by_video.get(video_id)
        to = [address.lower() for address in recipients(message)]
        outcome: Outcome = "bounced" if BOUNCING in to else "delivered"
        what = "bounced, permanent" if outcome == "bounced" else "delivered"
        about = f"#{source.number}" if source else (video_id or "?")
        for event in ses_events(message, outcome, message_id=provider_id):
            label = f"SES (simulated): {about} {what}"
            feed.append(Sample(first_number + len(feed), label, sns_envelope(event), "recorded"))
    return feed


def again_sample(number: int) -> Sample:
    """A message to the recipient SES reported as bounced: suppressed, never mailed."""
    video_id = f"demo-{number:04d}"
    name, address, file_name = _PEOPLE["pt-BR"]
    message = {
        "video_id": video_id,
        "status": "FAILED",
        "email": address,
        "name": name,
        "file_name": file_name,
        "message": "a second try, after the bounce",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    again = Sample(number, "FAILED pt-BR, to the bounced", json.dumps(message), "dlq", video_id)
    again.expect_status = "suppressed"
    return again


# --------------------------------------------------------------------------- the run


def resource_environment(name: str, dlq_url: str, *, suppression: bool) -> dict[str, str]:
    """The demo's own resources: its bucket is the one bucket allowed, its tables the
    suppression list and the delivery statuses, and permanent failures go straight to the
    dead-letter queue (with their reason), as a deployed stack does."""
    values = {"ALLOWED_BUCKETS": name, "DEAD_LETTER_QUEUE_URL": dlq_url}
    if suppression:
        values["SUPPRESSION_TABLE"] = name
        values["STATUS_TABLE"] = status_table_name(name)
    return values


def status_table_name(name: str) -> str:
    return f"{name}-status"


def worker_environment(
    endpoint_url: str, smtp_port: int, transport: str = "smtp"
) -> dict[str, str]:
    """The worker's settings for the demo: local endpoints only, and fake AWS credentials.

    Fake credentials also make it impossible to touch a real AWS account by mistake.
    """
    return {
        "TRANSPORT": transport,
        # moto's and LocalStack's SES say 1 message/s: the demo need not wait for that.
        "SMTP_RATE_LIMIT": "none",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint_url,
        "SMTP_SERVER": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "SMTP_TLS": "none",
        "EMAIL_FROM": f"Async Notifier <{SENDER}>",
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
    "IDEMPOTENCY_TABLE",
    "ALLOWED_KEY_PREFIX",
    "LINK_SIGNING_SECRET_ID",
    "SUPPRESSION_TABLE",
    "STATUS_TABLE",
    "STATUS_TOPIC_ARN",
    "FALLBACK_TRANSPORT",
    "SES_REGION",
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


@dataclass(frozen=True)
class _Resources:
    name: str  # the bucket's, the suppression table's and the queue's (DLQ: "-dlq")
    queue_url: str
    dlq_url: str
    ses_queue_url: str  # SES events (bounces, complaints), as the SNS subscription fills it
    #: Why the endpoint has no suppression table ("" when it has one): LocalStack run
    #: without Docker serves no DynamoDB (its DynamoDB is DynamoDB Local, a Java download).
    no_table: str = ""


@contextlib.asynccontextmanager
async def _resources(
    sqs: Any, s3: Any, dynamodb: Any, options: Options, *, cleanup: bool
) -> AsyncIterator[_Resources]:
    """A bucket, the queues and the suppression table, with unique names; removed
    afterwards when asked (on an endpoint the demo did not start). Such an endpoint may
    serve no DynamoDB: the demo then runs without the suppression table."""
    name = f"async-notifier-demo-{uuid.uuid4().hex[:8]}"
    await s3.create_bucket(Bucket=name)
    dlq_url = (await sqs.create_queue(QueueName=f"{name}-dlq"))["QueueUrl"]
    dlq_arn = (await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"]))[
        "Attributes"
    ]["QueueArn"]
    redrive = {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(options.max_receive_count)}
    attributes = {
        "VisibilityTimeout": str(options.visibility_timeout),
        "RedrivePolicy": json.dumps(redrive),
    }
    queue_url = (await sqs.create_queue(QueueName=name, Attributes=attributes))["QueueUrl"]
    ses_url = (await sqs.create_queue(QueueName=f"{name}-ses", Attributes=attributes))["QueueUrl"]
    no_table = ""
    try:
        await create_table(dynamodb, name)
        await create_status_table(dynamodb, status_table_name(name))
    except Exception as exc:
        if not cleanup:  # our own moto serves DynamoDB: a failure here is a bug
            raise
        no_table = aws_error(exc).describe()
    try:
        yield _Resources(name, queue_url, dlq_url, ses_url, no_table)
    finally:
        if cleanup:
            for url in (queue_url, ses_url, dlq_url):
                with contextlib.suppress(Exception):
                    await sqs.delete_queue(QueueUrl=url)
            if not no_table:
                for table in (name, status_table_name(name)):
                    with contextlib.suppress(Exception):
                        await dynamodb.delete_table(TableName=table)
            with contextlib.suppress(Exception):
                listing = await s3.list_objects_v2(Bucket=name)
                for item in listing.get("Contents", []):
                    await s3.delete_object(Bucket=name, Key=item["Key"])
                await s3.delete_bucket(Bucket=name)


class NoSesApi(RuntimeError):
    """The endpoint serves no SES v2 API (LocalStack's community edition does not)."""


async def _require_ses_v2(endpoint_url: str) -> None:
    """Fail at once, and say why, where the SES v2 API is missing: every email would fail."""
    async with _client("sesv2", endpoint_url) as sesv2:
        try:
            await sesv2.list_email_identities()
        except Exception as exc:
            raise NoSesApi(
                f"{endpoint_url} serves no SES v2 API ({_clip(str(exc), 120)}): "
                "run `make run-local TRANSPORT=ses` without AWS_ENDPOINT_URL (moto serves it)"
            ) from None


async def _send(sqs: Any, queue_url: str, samples: list[Sample]) -> None:
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


async def _drain(
    worker: BatchWorker,
    settings: Settings,
    queue_url: str,
    samples: list[Sample],
    options: Options,
    stop: asyncio.Event,
    out: TextIO,
) -> RunnerStats:
    """Run the SQS runner on `queue_url` until it is empty, noting what each sample became."""
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
            elif sample.expect == "recorded":
                sample.recorded = True
        failed = len(result.failures) + len(result.dead_lettered)
        _print(out, f"  batch of {len(records)}: {len(records) - failed} ok, {failed} failed")

    return await run_queue(
        settings,
        queue_url,
        notifier=worker,
        batch_size=10,
        batch_window=0.2,
        wait_time=options.wait_time,
        drain=True,
        stop=stop,
        on_batch=on_batch,
    )


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


async def _sent_so_far(
    options: Options, catcher: MailCatcher, endpoint_url: str
) -> list[tuple[bytes, str]]:
    """Each email sent so far, raw, with the id SES's events give it: SES's MessageId
    through the SES API; through the mail catcher, which is no SES, one made up."""
    if options.transport == "ses":
        kept = await asyncio.to_thread(sent_messages, endpoint_url)
        return [(sent.raw, sent.message_id) for sent in kept]
    return [(m.eml.read_bytes(), f"simulated-{m.index:04d}") for m in catcher.messages]


async def _read_statuses(reader: DynamoStatusReader, samples: list[Sample]) -> None:
    """Each notification's delivery status, as `async-notifier status --video-id` reads it."""
    for sample in samples:
        if sample.expect == "recorded":
            continue
        if sample.video_id:
            records = await reader.for_video(sample.video_id)
            sample.status = records[-1] if records else None
        sample.status_read = True


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
        apply_environment(worker_environment(endpoint_url, catcher.port, options.transport))
        stack.enter_context(_worker_log(log_file, os.environ.get("LOG_LEVEL") or "INFO"))
        where = f"moto, started for this run, pid {moto.pid}" if moto else "already running"
        _print(out, f"S3 + SQS:     {endpoint_url} ({where})")
        if options.transport == "ses":
            _print(out, f"SES v2 API:   {endpoint_url} (kept there, filed → {_show(outbox)}/)")
        else:
            _print(out, f"mail catcher: smtp://127.0.0.1:{catcher.port} → {_show(outbox)}/")

        report = Report([], endpoint_url, outbox, log_file)
        async with (
            _client("sqs", endpoint_url) as sqs,
            _client("s3", endpoint_url) as s3,
            _client("dynamodb", endpoint_url) as dynamodb,
            _resources(sqs, s3, dynamodb, options, cleanup=moto is None) as made,
        ):
            if options.transport == "ses":  # SES sends only from a verified identity
                async with _client("ses", endpoint_url) as ses:
                    await ses.verify_email_identity(EmailAddress=SENDER)
                await _require_ses_v2(endpoint_url)
            suppression = not made.no_table
            os.environ.update(
                resource_environment(made.name, made.dlq_url, suppression=suppression)
            )
            if not suppression:
                report.skipped = (
                    f"SES's events, suppression and delivery status: {endpoint_url} serves "
                    "no DynamoDB table "
                    f"({_clip(made.no_table, 80)})"
                )
            settings = Settings.from_env()
            report.resource_name = bucket = made.name
            report.samples = samples = build_samples(options.messages, bucket)
            for sample in samples:
                if sample.zip_key:
                    body = make_zip(options.zip_size, seed=sample.number)
                    await s3.put_object(Bucket=bucket, Key=sample.zip_key, Body=body)
            await _send(sqs, made.queue_url, samples)
            zips = sum(1 for s in samples if s.zip_key)
            _print(
                out,
                f"queue:        {made.queue_url.rsplit('/', 1)[-1]} (VisibilityTimeout "
                f"{options.visibility_timeout} s, DLQ after {options.max_receive_count} "
                f"receives), bucket {bucket} ({zips} ZIPs of {_size(options.zip_size)})",
            )
            _print(
                out,
                f"sent {len(samples)} messages; running the SQS runner until the queue is "
                "drained (bad ones go to the dead-letter queue, failed ones come back)...",
            )
            watchdog = asyncio.get_running_loop().call_later(options.timeout, stop.set)
            try:
                async with build_notifier(settings) as notifier:
                    report.stats = await _drain(
                        notifier, settings, made.queue_url, samples, options, stop, out
                    )
                    if report.stats.drained and suppression:
                        so_far = await _sent_so_far(options, catcher, endpoint_url)
                        feed = ses_samples(len(samples) + 1, so_far, samples)
                        samples += feed
                        _print(
                            out,
                            f"SES reports a delivery for each email and a permanent bounce "
                            f"for {BOUNCING} (simulated: no local endpoint publishes SES's "
                            "events); the SES events function records them, then the demo "
                            "mails the bounced recipient again...",
                        )
                        await _send(sqs, made.ses_queue_url, feed)
                        ses_settings = Settings.from_env(sending=False)
                        async with build_ses_recorder(ses_settings) as recorder:
                            ses_queue = made.ses_queue_url
                            await _drain(recorder, settings, ses_queue, feed, options, stop, out)
                        again = again_sample(len(samples) + 1)
                        samples.append(again)
                        await _send(sqs, made.queue_url, [again])
                        report.stats = await _drain(
                            notifier, settings, made.queue_url, [again], options, stop, out
                        )
            finally:
                watchdog.cancel()
            if not report.stats.drained:
                report.timed_out = time.monotonic() - started >= options.timeout
                report.interrupted = not report.timed_out
            ids, originals = await _dead_letters(sqs, made.dlq_url)
            if options.transport == "ses":
                for sent in await asyncio.to_thread(sent_messages, endpoint_url):
                    catcher.file(sent.source, sent.destinations, sent.raw)
            for sample in samples:
                sample.in_dlq = sample.message_id in ids or sample.message_id in originals
                sample.emails = [m for m in catcher.messages if m.video_id == sample.video_id]
            if suppression and settings.status_table:
                report.status_table = settings.status_table
                await _read_statuses(DynamoStatusReader(dynamodb, settings.status_table), samples)
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
    if report.status_table:
        print_statuses(report, out)
        _print(out, "")
    sent = sum(1 for s in report.samples if s.emails)
    dead = sum(1 for s in report.samples if s.in_dlq)
    recorded = sum(1 for s in report.samples if s.recorded)
    summary = (
        f"{len(report.samples)} messages: {sent} emailed, {recorded} SES events recorded, "
        f"{dead} in the dead-letter queue ({report.seconds:.1f} s)."
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
    if report.skipped:
        _print(out, f"Skipped {report.skipped}; `make run-local` on moto shows it.")
    _print(
        out,
        f"Open the .html files in a browser and the .eml files in a mail client; "
        f"worker logs: {_show(report.log_file)}",
    )


def print_statuses(report: Report, out: TextIO) -> None:
    """Each notification's delivery status and history, read back from STATUS_TABLE."""
    _print(
        out,
        f"Delivery status ({report.status_table}; SES's events simulated by the demo; "
        "`async-notifier status --video-id ID` prints the same from a deployed table):",
    )
    rows = [("#", "video", "status", "history")]
    for sample in report.samples:
        if not sample.status_read:
            continue
        record = sample.status
        if record is None:
            rows.append((str(sample.number), sample.video_id or "-", "none", "not a notification"))
            continue
        steps = []
        for entry in record.history:
            step = f"{entry.state} {entry.time[11:23]}"
            if entry.reason:
                step += f" ({_clip(entry.reason, 60)})"
            steps.append(step)
        rows.append((str(sample.number), record.video_id or "-", record.status, ", ".join(steps)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        line = f"{row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}"
        _print(out, line.rstrip())


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
