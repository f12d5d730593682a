"""A settled batch: each failure's fate decided (`disposition`) and carried out."""

from __future__ import annotations

from ..after_cutoff import AfterCutoff
from ..deadline import Deadline
from ..ports import Adapters
from .disposition import Policy, disposition
from .outcome import BatchResult, DeadLetter, Disposition, Retry


async def settle(
    result: BatchResult, adapters: Adapters, policy: Policy, deadline: Deadline | None
) -> list[Disposition]:
    """Each failure's fate, carried out: dead letters copied (one that did not arrive
    stays in the queue as a retry), then retries given their back-off.

    Both run after the records, within what is left until `deadline.end` (see
    `AfterCutoff`); without time left no call is made, not even the client is made.
    """
    fates = [disposition(o, policy) for o in result.errors]
    letters = [
        (i, o, f)
        for i, (o, f) in enumerate(zip(result.errors, fates, strict=True))
        if isinstance(f, DeadLetter)
    ]
    budget = AfterCutoff(deadline)
    feedback = None
    if budget.remaining() > 0 and any(
        isinstance(f, DeadLetter) or (isinstance(f, Retry) and f.delay is not None) for f in fates
    ):
        feedback = await adapters.feedback()
    if letters:
        routed: set[str] = set()
        if feedback is not None:
            # An expired record's dead letter says so, with its last error inside.
            items = [(o.record, f.error or o.error) for _, o, f in letters if o.record and o.error]
            routed = await feedback.dead_letter(items, budget)
        for i, outcome, _ in letters:
            if outcome.message_id not in routed:
                fates[i] = disposition(outcome, policy, dead_letter_failed=True)
    delays = [
        (o.record, f.delay)
        for o, f in zip(result.errors, fates, strict=True)
        if isinstance(f, Retry) and f.delay is not None and o.record is not None
    ]
    if delays and feedback is not None:
        await feedback.delay(delays, budget)
    return fates


def unsettled(result: BatchResult, policy: Policy) -> list[Disposition]:
    """The fates of a batch whose settling was stopped midway: no dead letter counts as sent,
    so every failure stays in the queue (its redrive policy applies)."""
    return [disposition(o, policy, dead_letter_failed=True) for o in result.errors]
