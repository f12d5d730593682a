"""A batch's numbers as CloudWatch metrics (EMF lines, see `metrics.py`)."""

from __future__ import annotations

from collections import Counter

from ..errors import (
    Expired,
    ProviderCondition,
    RecipientSuppressed,
    RecipientUnverified,
    TransportUnavailable,
)
from ..logs import request_id
from ..metrics import InvocationMetrics
from ..ports import PoolStats
from .outcome import BatchResult, DeadLetter, StatusCounts


def metrics_from_batch(
    result: BatchResult,
    *,
    duration_s: float,
    namespace: str,
    function_name: str | None,
    pool: PoolStats | None = None,
) -> InvocationMetrics:
    """The invocation's metrics, from its settled BatchResult.

    Failures are also counted per `NotifierError.kind` as RecordsFailed with an ErrorClass
    dimension: one metric that a dashboard can split or alarm on per class. Kinds come from
    code, never from input, so the number of custom metrics stays bounded.
    """
    metrics = InvocationMetrics(
        namespace, dimensions={"FunctionName": function_name} if function_name else None
    )
    delivered, errors = result.delivered, result.errors
    actions = delivered.actions
    metrics.set("RecordsReceived", result.records, "Count")
    metrics.set("RecordsSent", actions["sent"] + actions["sent_link"], "Count")
    metrics.set("RecordsFailed", len(errors), "Count")
    metrics.set("BatchItemFailures", len(result.failures), "Count")
    metrics.set("RecordsDeadLettered", len(result.dead_lettered), "Count")
    retried = delivered.retried + sum(o.retries > 0 for o in errors)
    metrics.set("RecordsRetried", retried, "Count")
    metrics.set("Retries", delivered.retries + sum(o.retries for o in errors), "Count")
    metrics.set("BytesAttached", delivered.bytes_attached, "Bytes")
    metrics.set("LinksSent", actions["sent_link"], "Count")
    metrics.set("Duplicates", actions["duplicate"], "Count")
    metrics.set("AlreadyDelivered", actions["already_delivered"], "Count")
    pool = pool or PoolStats()
    metrics.set("SmtpConnectionsOpened", pool.connections_opened, "Count")
    metrics.set("SmtpCircuitOpened", pool.circuit_opened, "Count")
    metrics.set("SmtpThrottled", pool.throttled, "Count")
    # Transport-neutral: what each transport accepted, what the fallback carried.
    accepted = delivered.transports
    metrics.set("MessagesAccepted", sum(accepted.values()), "Count")
    for transport, count in sorted(accepted.items()):
        metrics.add("MessagesAccepted", count, dimensions={"Transport": transport})
    metrics.set("FallbackMessages", pool.fallback_messages, "Count")
    metrics.set("TransportThrottled", pool.throttled, "Count")
    unavailable = sum(
        isinstance(o.error, TransportUnavailable) and not isinstance(o.error, ProviderCondition)
        for o in errors
    )
    metrics.set("TransportUnavailable", unavailable, "Count")
    if pool.send_rate is not None:
        metrics.set("SendRate", pool.send_rate, "Count/Second")
    # Records sent back untried because something held for every message, by condition.
    held = Counter(o.error.condition for o in errors if isinstance(o.error, ProviderCondition))
    metrics.set("RecordsHeld", sum(held.values()), "Count")
    for condition, count in sorted(held.items()):
        metrics.add("RecordsHeld", count, dimensions={"Condition": condition})
    expired = sum(
        isinstance(fate, DeadLetter) and isinstance(fate.error, Expired)
        for _, fate in result.settled()
    )
    metrics.set("RecordsExpired", expired, "Count")
    metrics.set("InvocationDuration", duration_s * 1000.0, "Milliseconds")
    unverified = sum(isinstance(o.error, RecipientUnverified) for o in errors)
    metrics.set("RecipientsUnverified", unverified, "Count")
    suppressed = sum(isinstance(o.error, RecipientSuppressed) for o in errors)
    metrics.set("RecordsSuppressed", suppressed, "Count")
    for outcome in errors:
        assert outcome.error is not None
        metrics.add("RecordsFailed", dimensions={"ErrorClass": outcome.error.kind})
    add_status_metrics(metrics, result.status)
    rid = request_id.get()
    if rid:
        metrics.set_property("request_id", rid)
    return metrics


def add_status_metrics(metrics: InvocationMetrics, status: StatusCounts) -> None:
    """The delivery-status writes of a batch, when STATUS_TABLE or STATUS_TOPIC_ARN is set
    (else none: no metric is created for a feature that is off)."""
    if not status.active:
        return
    metrics.set("StatusWritten", status.written, "Count")
    metrics.set("StatusWriteFailed", status.failed, "Count")
    metrics.set("StatusDuplicates", status.duplicates, "Count")
    metrics.set("StatusEventsUnknown", status.unknown, "Count")
    metrics.set("StatusPublished", status.published, "Count")
    metrics.set("StatusPublishFailed", status.publish_failed, "Count")
