"""Status changes told back over SNS (STATUS_TOPIC_ARN): `PublishBatch`, ten at a time.

Each event (`delivery_status.status_event`, the shape of docs/status-event.schema.json) is
one SNS message whose body is the event's JSON, with the message attributes `status`,
`current_status` and, when known, `video_id`, so a subscription's filter policy can take
only what its subscriber wants (`{"status": ["bounced", "complained"]}`). A subscriber
that must lose nothing subscribes its own SQS queue: SNS keeps retrying an HTTP endpoint
for a while only, a queue holds the events through the subscriber's outage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

from ..delivery_status import event_json
from ..errors import StatusUnavailable
from ..logs import get_logger
from .errors import aws_error

log = get_logger()

#: SNS's limit of entries per PublishBatch.
MAX_BATCH = 10
_ATTRIBUTES = ("status", "current_status", "video_id")


class SnsStatusTopic:
    """`ports.StatusTopic` over one SNS topic."""

    max_batch = MAX_BATCH

    def __init__(self, client: Any, topic_arn: str) -> None:
        self._client = client
        self._topic_arn = topic_arn
        self.calls = 0

    async def publish(self, events: Sequence[dict[str, Any]]) -> int:
        if not events:
            return 0
        if len(events) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} events per call")
        entries = [
            {
                "Id": str(index),
                "Message": event_json(event),
                "MessageAttributes": {
                    name: {"DataType": "String", "StringValue": str(event[name])}
                    for name in _ATTRIBUTES
                    if event.get(name)
                },
            }
            for index, event in enumerate(events)
        ]
        self.calls += 1
        try:
            response = cast(
                dict[str, Any],
                await self._client.publish_batch(
                    TopicArn=self._topic_arn, PublishBatchRequestEntries=entries
                ),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise StatusUnavailable(
                f"SNS PublishBatch failed: {aws_error(exc).describe()}"
            ) from None
        failed = response.get("Failed") or []
        if failed:
            log.warning(
                "status events refused by SNS",
                extra={
                    "events": len(failed),
                    "codes": sorted({str(f.get("Code")) for f in failed if isinstance(f, dict)}),
                },
            )
        return len(failed)
