"""Keep the messages a run holds hidden while their batch runs: the visibility heartbeat.

Lambda's event source mapping lets a message reappear when an invocation outlives the
queue's visibility timeout; the runner does better, because a batch given more time than
that (`--batch-timeout`) must not be delivered to a second consumer meanwhile. Every
message received and not finished with is held here, from the moment its receive returns
(before its batch starts) until it is deleted, left to SQS after its batch, or released.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..aws.errors import aws_error
from ..logs import get_logger
from .limits import CALL_TIMEOUT, MAX_VISIBILITY, chunks
from .stats import RunnerStats

log = get_logger()

# The heartbeat beats every third of the visibility timeout, at most once a second, and each
# beat hides the messages for at least MIN_EXTENSION seconds: on a 1-2 s queue (tests, the
# demo) a beat still has two more behind it before a message could reappear.
MIN_BEAT_PERIOD = 1.0
MIN_EXTENSION = 3
HEARTBEAT_TASK_NAME = "runner-heartbeat"


@dataclass(slots=True)
class _Held:
    """A received message the runner has not finished with."""

    message: dict[str, Any]
    received_at: float  # monotonic; SQS counts its 12 h from here
    extended_at: float  # when its visibility was last reset (the request's start, to be safe)

    @property
    def handle(self) -> str:
        return str(self.message["ReceiptHandle"])

    @property
    def message_id(self) -> str:
        return str(self.message.get("MessageId", ""))


class VisibilityHeartbeat:
    """The held messages, and the task that extends their visibility while a batch runs."""

    def __init__(
        self, sqs: Any, queue_url: str, *, visibility_timeout: int, stats: RunnerStats
    ) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._stats = stats
        self.visibility_timeout = visibility_timeout
        self.period = max(MIN_BEAT_PERIOD, visibility_timeout / 3)
        self._extension = max(visibility_timeout, MIN_EXTENSION)
        # A beat that has not answered by half the period is given up: the next one retries.
        self._timeout = min(CALL_TIMEOUT, self.period / 2)
        self._held: dict[str, _Held] = {}  # by receipt handle
        self._task: asyncio.Task[None] | None = None

    def hold(self, messages: Iterable[dict[str, Any]]) -> None:
        """Messages a receive just returned: SQS hid them as of now."""
        received_at = time.monotonic()
        for message in messages:
            self._held[str(message["ReceiptHandle"])] = _Held(message, received_at, received_at)

    def let_go(self, handles: Iterable[str]) -> None:
        """Messages deleted, or left to come back after their batch: no longer ours."""
        for handle in handles:
            self._held.pop(handle, None)

    def take_all(self) -> list[dict[str, Any]]:
        """Every message still held (to release at the end of a run), held no longer."""
        messages = [held.message for held in self._held.values()]
        self._held.clear()
        return messages

    def oldest_receive(self, handles: Iterable[str]) -> float | None:
        """When the oldest of these messages was received (monotonic), if any is held."""
        return min((self._held[h].received_at for h in handles if h in self._held), default=None)

    def start(self) -> None:
        if self.visibility_timeout > 0:  # a queue with none gives nobody exclusivity anyway
            self._task = asyncio.create_task(self._beat_forever(), name=HEARTBEAT_TASK_NAME)

    async def stop(self) -> None:
        """Cancel the heartbeat and wait until it is gone (a beat in flight is abandoned)."""
        task = self._task
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])
        self._task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("visibility heartbeat crashed", exc_info=task.exception())

    async def _beat_forever(self) -> None:
        """Beat once the oldest held message is a period past its last extension (at once if
        the batch started later than that), then every period."""
        last_beat = -math.inf
        while True:
            now = time.monotonic()
            oldest = min((h.extended_at for h in self._held.values()), default=now)
            due = max(oldest, last_beat) + self.period
            await asyncio.sleep(max(0.0, due - now))
            last_beat = time.monotonic()
            try:
                await self._beat()
            except Exception:  # never into the batch: the next beat tries again
                log.exception("visibility heartbeat failed")

    async def _beat(self) -> None:
        """Hide every held message for the full extension again, 10 per call, concurrently."""
        started = time.monotonic()
        due: list[tuple[_Held, int]] = []
        for held in self._held.values():
            # SQS refuses an extension that reaches past 12 h after the receive.
            left = math.floor(MAX_VISIBILITY - (started - held.received_at)) - 1
            if left > 0:
                due.append((held, min(self._extension, left)))
        await asyncio.gather(*(self._extend(chunk, started) for chunk in chunks(due)))

    async def _extend(self, chunk: Sequence[tuple[_Held, int]], started: float) -> None:
        entries = [
            {"Id": str(index), "ReceiptHandle": held.handle, "VisibilityTimeout": seconds}
            for index, (held, seconds) in enumerate(chunk)
        ]
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._sqs.change_message_visibility_batch(
                    QueueUrl=self._queue_url, Entries=entries
                )
        except Exception as exc:
            self._stats.extend_failed += len(chunk)
            log.warning(
                "visibility extension failed; retrying at the next beat",
                extra={
                    "messageIds": [h.message_id for h, _ in chunk],
                    "error": aws_error(exc).name,
                },
            )
            return
        for success in response.get("Successful", []):
            held, _ = chunk[int(success["Id"])]
            held.extended_at = started
            self._stats.extended += 1
        for failure in response.get("Failed", []):
            self._stats.extend_failed += 1
            held, _ = chunk[int(failure["Id"])]
            # Not failure["Message"]: SQS quotes the receipt handle in it.
            log.warning(
                "visibility extension failed; retrying at the next beat",
                extra={"messageId": held.message_id, "code": failure.get("Code")},
            )
