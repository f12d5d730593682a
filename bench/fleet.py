"""The throttled scenario's arithmetic: a fleet's batches, SQS's redelivery, the rounds.

Lambda hands concurrent invocations their own batches, so each instance of the fleet gets
its share of the records; a record an invocation returns in `batchItemFailures` comes back
later, to any instance, with `ApproximateReceiveCount` one higher. The benchmark redelivers
at once (SQS would wait out the visibility timeout), so a round's time is only its calls':
from the first instance's call to the last one's return.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

# Redelivery rounds before the records still failing are reported lost.
MAX_ROUNDS = 10


def split(records: list[dict[str, Any]], instances: int) -> list[list[dict[str, Any]]]:
    """Contiguous, nearly equal shares, one per instance (fewer when records are few)."""
    count = min(instances, len(records))
    share, extra = divmod(len(records), max(count, 1))
    shares, start = [], 0
    for index in range(count):
        end = start + share + (1 if index < extra else 0)
        shares.append(records[start:end])
        start = end
    return shares


def redelivered(record: dict[str, Any]) -> dict[str, Any]:
    """The record as SQS delivers it again: a new receipt handle, one more receive."""
    again = copy.deepcopy(record)
    attributes = again.setdefault("attributes", {})
    count = int(attributes.get("ApproximateReceiveCount", 1))
    attributes["ApproximateReceiveCount"] = str(count + 1)
    again["receiptHandle"] = f"AQEB{uuid.uuid4().hex}{uuid.uuid4().hex}"
    return again


def failed_ids(child: dict[str, Any], records: list[dict[str, Any]]) -> set[str] | None:
    """The messageIds an invocation handed back; None if it gave no partial batch response
    (it crashed or timed out: SQS would then redeliver its whole batch)."""
    failures = (child.get("response") or {}).get("batchItemFailures")
    if not isinstance(failures, list):
        return None
    known = {record["messageId"] for record in records}
    return {str(f.get("itemIdentifier")) for f in failures if isinstance(f, dict)} & known


def delivery_seconds(invocations: list[dict[str, Any]]) -> float | None:
    """The rounds' spans summed: each from its first call to its last return."""
    rounds: dict[int, list[dict[str, Any]]] = {}
    for invocation in invocations:
        if "called_at" not in invocation:
            return None  # an instance that did not report: no honest time
        rounds.setdefault(invocation["round"], []).append(invocation)
    return sum(
        float(max(i["returned_at"] for i in calls)) - float(min(i["called_at"] for i in calls))
        for calls in rounds.values()
    )


def message_id_check(accepted: dict[str, int], expected: int) -> dict[str, Any]:
    """Exactly once by Message-ID: every message's id distinct, one per record."""
    duplicates = sum(count - 1 for count in accepted.values() if count > 1)
    return {
        "accepted_message_ids": len(accepted),
        "message_id_duplicates": duplicates,
        "exactly_once": duplicates == 0 and len(accepted) == expected and "" not in accepted,
    }
