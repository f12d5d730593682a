"""SQS's API limits, the runner's time limits on its calls, and batching them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

MAX_MESSAGES_PER_RECEIVE = 10  # SQS's limit for ReceiveMessage
MAX_ENTRIES_PER_CALL = 10  # and for DeleteMessageBatch / ChangeMessageVisibilityBatch
MAX_WAIT_TIME = 20  # SQS's limit for WaitTimeSeconds
# SQS keeps a message hidden at most this long after it was received: no extension goes past.
MAX_VISIBILITY = 12 * 3600
# Time limits on the network: a receive gets its long poll plus RECEIVE_GRACE, any other SQS
# call CALL_TIMEOUT (the first one STARTUP_TIMEOUT: it also resolves the credentials).
RECEIVE_GRACE = 10.0
CALL_TIMEOUT = 5.0
STARTUP_TIMEOUT = 10.0


def chunks(items: Sequence[Any], size: int = MAX_ENTRIES_PER_CALL) -> Iterator[Sequence[Any]]:
    """`items` in slices of `size`: one SQS batch call each."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
