"""What the worker tells SQS besides the batch response: dead letters and retry back-off.

Lambda's partial batch response can only say "retry this record". Two extra calls make
failures cheaper: a permanently failed record is copied to a dead-letter queue (with the
reason, so nobody has to dig through logs) and then acknowledged; a record that will be
retried gets a visibility timeout that grows with its receive count, so a broken SMTP
server is not hammered every visibility period.

Both are best effort by design: they never raise. A record that could not be routed is
simply reported as failed by the caller, which is what would have happened without them.
Both run after the records, so every call they make is bounded by an `AfterCutoff`: what
does not fit in the invocation's time is left undone (and logged), never allowed to overrun.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Sequence
from typing import Any

from ..after_cutoff import AfterCutoff, OutOfTime
from ..errors import NotifierError
from ..logs import get_logger
from ..messages import SqsRecord
from .errors import aws_error

log = get_logger()

MAX_BATCH_ENTRIES = 10  # SendMessageBatch / ChangeMessageVisibilityBatch limit
# Payload budget per SendMessageBatch call. SQS accepts more nowadays (1 MiB), but 256 KiB
# is what every region and emulator accepts; a larger message simply goes alone.
MAX_BATCH_BYTES = 256 * 1024
MAX_REASON_CHARS = 1000
MAX_VISIBILITY_TIMEOUT = 43_200  # 12 hours, the SQS maximum
FIFO_FALLBACK_GROUP = "dead-letter"

_ARN_RE = re.compile(
    r"^arn:(?P<partition>aws[a-z-]*):sqs:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    r"(?P<name>[A-Za-z0-9_-]{1,80}(?:\.fifo)?)$"
)
# DNS suffix of each partition's SQS endpoints. An unknown partition is an error rather
# than a guess: a wrong host would silently disable back-off for every record.
_PARTITION_DOMAINS = {
    "aws": "amazonaws.com",
    "aws-us-gov": "amazonaws.com",
    "aws-cn": "amazonaws.com.cn",
    "aws-iso": "c2s.ic.gov",
    "aws-iso-b": "sc2s.sgov.gov",
}
# Characters SQS accepts in a string attribute; everything else is replaced.
_NOT_ALLOWED = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_LINE_BREAKS = re.compile(r"[\t\r\n]+")


def queue_url_from_arn(arn: str, endpoint_url: str | None) -> str:
    """The queue URL for an SQS queue ARN (Lambda records carry only the ARN).

    With `endpoint_url` (moto, LocalStack) the URL is `ENDPOINT/ACCOUNT/NAME`, the path
    style both accept.
    """
    match = _ARN_RE.match(arn)
    if match is None:
        raise ValueError(f"not an SQS queue ARN: {arn[:200]!r}")
    account, name = match["account"], match["name"]
    if endpoint_url:
        return f"{endpoint_url.rstrip('/')}/{account}/{name}"
    domain = _PARTITION_DOMAINS.get(match["partition"])
    if domain is None:
        raise ValueError(f"unknown AWS partition in queue ARN: {match['partition']!r}")
    return f"https://sqs.{match['region']}.{domain}/{account}/{name}"


def attribute_text(value: str, limit: int = MAX_REASON_CHARS) -> str:
    """A value safe for a String message attribute: one line, allowed characters, bounded.

    SQS rejects the whole request for a single forbidden character or an empty value, and
    a multi-line reason makes the console and log tools harder to read.
    """
    text = _LINE_BREAKS.sub(" ", _NOT_ALLOWED.sub("\ufffd", value)).strip()
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text or "-"


def _string(value: str, limit: int = MAX_REASON_CHARS) -> dict[str, str]:
    return {"DataType": "String", "StringValue": attribute_text(value, limit)}


def batch_chunks(entries: Sequence[tuple[int, int]], *, max_bytes: int) -> list[list[int]]:
    """Group (index, size) pairs into batches within the entry and payload limits (also the
    redrive command's)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    size = 0
    for index, entry_size in entries:
        if current and (len(current) == MAX_BATCH_ENTRIES or size + entry_size > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(index)
        size += entry_size
    if current:
        chunks.append(current)
    return chunks


def _error_fields(exc: BaseException) -> dict[str, Any]:
    error = aws_error(exc)
    return {
        "error_code": error.name,
        "error": attribute_text(error.message or str(exc), 500),
    }


class DeadLetterRouter:
    """Copies permanently failed records, with the reason, to a dead-letter queue.

    Only records reported back as routed may be acknowledged: the rest must be reported
    as failed so SQS keeps them (and its own redrive policy can still move them).
    """

    def __init__(self, client: Any, queue_url: str) -> None:
        self._client = client
        self._queue_url = queue_url
        self._fifo = queue_url.endswith(".fifo")

    @property
    def queue_url(self) -> str:
        return self._queue_url

    async def route(
        self,
        items: Sequence[tuple[SqsRecord, NotifierError]],
        budget: AfterCutoff | None = None,
    ) -> set[str]:
        """Send each record's original body to the DLQ; return the messageIds that arrived.

        Each SendMessageBatch call runs within `budget` (by default the fixed limits of
        `AfterCutoff(None)`); the records of a call that did not fit are not routed.
        """
        budget = budget or AfterCutoff(None)
        entries = [self._entry(record, error) for record, error in items]
        sizes = [(index, _entry_size(entry)) for index, entry in enumerate(entries)]
        chunks = batch_chunks(sizes, max_bytes=MAX_BATCH_BYTES)
        results = await asyncio.gather(
            *(
                self._send_chunk([items[i][0] for i in chunk], [entries[i] for i in chunk], budget)
                for chunk in chunks
            )
        )
        routed: set[str] = set()
        undone: list[str] = []
        for chunk_routed, chunk_undone in results:
            routed |= chunk_routed
            undone += chunk_undone
        if undone:
            budget.skipped("dead_letter", undone, "out of time")
        return routed

    def _entry(self, record: SqsRecord, error: NotifierError) -> dict[str, Any]:
        attributes: dict[str, dict[str, str]] = {
            "error_class": _string(error.kind, 256),
            "error_reason": _string(error.reason),
            "original_message_id": _string(record.message_id, 256),
            "receive_count": {"DataType": "Number", "StringValue": str(record.receive_count)},
        }
        if record.event_source_arn:
            attributes["source_queue_arn"] = _string(record.event_source_arn, 256)
        entry: dict[str, Any] = {"MessageBody": record.body, "MessageAttributes": attributes}
        if self._fifo:
            entry["MessageGroupId"] = record.message_group_id or FIFO_FALLBACK_GROUP
            # The same record routed twice (e.g. the invocation died before acknowledging
            # it) lands in the DLQ once within SQS's 5-minute deduplication window.
            entry["MessageDeduplicationId"] = hashlib.sha256(
                record.message_id.encode("utf-8", "surrogatepass")
            ).hexdigest()
        return entry

    async def _send_chunk(
        self, records: list[SqsRecord], entries: list[dict[str, Any]], budget: AfterCutoff
    ) -> tuple[set[str], list[str]]:
        """The messageIds routed, and those left undone for lack of time."""
        # messageIds may hold characters batch ids do not allow; positions always fit.
        by_id = {f"m{i}": record for i, record in enumerate(records)}
        batch = [{"Id": f"m{i}", **entry} for i, entry in enumerate(entries)]
        try:
            response = await budget.call(
                lambda: self._client.send_message_batch(QueueUrl=self._queue_url, Entries=batch)
            )
        except OutOfTime:
            return set(), [record.message_id for record in records]
        except Exception as exc:
            for record in records:
                log.error(
                    "dead-letter send failed",
                    extra={
                        "messageId": record.message_id,
                        "queue_url": self._queue_url,
                        **_error_fields(exc),
                    },
                )
            return set(), []
        routed: set[str] = set()
        for ok in response.get("Successful") or []:
            sent = by_id.get(ok.get("Id"))
            if sent is not None:
                routed.add(sent.message_id)
                log.info(
                    "record moved to dead-letter queue",
                    extra={"messageId": sent.message_id, "queue_url": self._queue_url},
                )
        for failed in response.get("Failed") or []:
            lost = by_id.get(failed.get("Id"))
            log.error(
                "dead-letter send failed",
                extra={
                    "messageId": lost.message_id if lost else None,
                    "queue_url": self._queue_url,
                    "error_code": failed.get("Code"),
                    "error": failed.get("Message"),
                    "sender_fault": failed.get("SenderFault"),
                },
            )
        return routed, []


def _entry_size(entry: dict[str, Any]) -> int:
    """Bytes SQS counts towards the payload limit: body plus attribute names, types, values."""
    size = len(entry["MessageBody"].encode("utf-8", "surrogatepass"))
    for name, value in entry["MessageAttributes"].items():
        size += len(name) + len(value["DataType"]) + len(value["StringValue"].encode())
    return size


class VisibilityBackoff:
    """Delays the next delivery of failed records by the visibility timeout decided for each
    (`disposition.Retry.delay`)."""

    def __init__(self, client: Any, *, endpoint_url: str | None) -> None:
        self._client = client
        self._endpoint_url = endpoint_url

    async def apply(
        self, items: Sequence[tuple[SqsRecord, int]], budget: AfterCutoff | None = None
    ) -> int:
        """Set each record's visibility timeout (seconds); return how many SQS confirmed.

        Each ChangeMessageVisibilityBatch call runs within `budget` (by default the fixed
        limits of `AfterCutoff(None)`); a record whose call did not fit keeps the visibility
        timeout it had.
        """
        budget = budget or AfterCutoff(None)
        by_queue: dict[str, list[tuple[SqsRecord, str, int]]] = {}
        for record, seconds in items:
            if not 0 <= seconds <= MAX_VISIBILITY_TIMEOUT:
                raise ValueError(f"a visibility timeout of {seconds} s is outside SQS's range")
            target = self._target(record)
            if target is not None:
                url, handle = target
                by_queue.setdefault(url, []).append((record, handle, seconds))
        calls = [
            self._change_chunk(url, pending[start : start + MAX_BATCH_ENTRIES], budget)
            for url, pending in by_queue.items()
            for start in range(0, len(pending), MAX_BATCH_ENTRIES)
        ]
        changed = 0
        undone: list[str] = []
        for chunk_changed, chunk_undone in await asyncio.gather(*calls):
            changed += chunk_changed
            undone += chunk_undone
        if undone:
            budget.skipped("retry_backoff", undone, "out of time")
        return changed

    def _target(self, record: SqsRecord) -> tuple[str, str] | None:
        arn = record.event_source_arn
        handle = record.raw.get("receiptHandle")
        if arn is None or not isinstance(handle, str) or not handle:
            log.warning(
                "no queue ARN or receipt handle; retry back-off skipped",
                extra={"messageId": record.message_id},
            )
            return None
        try:
            return queue_url_from_arn(arn, self._endpoint_url), handle
        except ValueError as exc:
            log.warning(
                "retry back-off skipped", extra={"messageId": record.message_id, "error": str(exc)}
            )
            return None

    async def _change_chunk(
        self, url: str, pending: list[tuple[SqsRecord, str, int]], budget: AfterCutoff
    ) -> tuple[int, list[str]]:
        """How many SQS confirmed, and the messageIds left undone for lack of time."""
        by_id = {f"m{i}": record for i, (record, _, _) in enumerate(pending)}
        entries = [
            {"Id": f"m{i}", "ReceiptHandle": handle, "VisibilityTimeout": seconds}
            for i, (record, handle, seconds) in enumerate(pending)
        ]
        try:
            response = await budget.call(
                lambda: self._client.change_message_visibility_batch(QueueUrl=url, Entries=entries)
            )
        except OutOfTime:
            return 0, [record.message_id for record, _, _ in pending]
        except Exception as exc:
            for record, _, _ in pending:
                log.warning(
                    "retry back-off failed",
                    extra={"messageId": record.message_id, "queue_url": url, **_error_fields(exc)},
                )
            return 0, []
        for failed in response.get("Failed") or []:
            stuck = by_id.get(failed.get("Id"))
            log.warning(
                "retry back-off failed",
                extra={
                    "messageId": stuck.message_id if stuck else None,
                    "queue_url": url,
                    "error_code": failed.get("Code"),
                    "error": failed.get("Message"),
                },
            )
        return sum(1 for ok in response.get("Successful") or [] if ok.get("Id") in by_id), []


class SqsFeedback:
    """The queue feedback of a batch (`ports.QueueFeedback`) over one SQS client."""

    def __init__(self, client: Any, *, dead_letter_queue_url: str | None, endpoint_url: str | None):
        self._router = (
            DeadLetterRouter(client, dead_letter_queue_url) if dead_letter_queue_url else None
        )
        self._backoff = VisibilityBackoff(client, endpoint_url=endpoint_url)

    async def dead_letter(
        self, items: Sequence[tuple[SqsRecord, NotifierError]], budget: AfterCutoff
    ) -> set[str]:
        if self._router is None:
            return set()
        return await self._router.route(items, budget)

    async def delay(self, items: Sequence[tuple[SqsRecord, int]], budget: AfterCutoff) -> int:
        return await self._backoff.apply(items, budget)
