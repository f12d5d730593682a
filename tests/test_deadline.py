"""The two points of a deadline: where records stop, and where the work after them stops."""

from __future__ import annotations

import time

import pytest

from async_notifier.deadline import MIN_MARGIN, RETURN_RESERVE, Deadline


class Context:
    def __init__(self, remaining_ms: int) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def test_default_margin_is_a_tenth_of_the_time_and_at_least_three_seconds() -> None:
    now = time.monotonic()
    long = Deadline.within(300.0)
    assert long.cutoff - now == pytest.approx(270.0, abs=0.05)
    short = Deadline.within(10.0)
    assert short.cutoff - now == pytest.approx(10.0 - MIN_MARGIN, abs=0.05)


def test_the_end_keeps_a_reserve_for_returning_the_response() -> None:
    now = time.monotonic()
    deadline = Deadline.within(10.0)
    assert deadline.end - now == pytest.approx(10.0 - RETURN_RESERVE, abs=0.05)
    assert deadline.cutoff < deadline.end
    # A small margin keeps half of itself for the work after the cutoff.
    tight = Deadline.within(10.0, margin=0.4)
    assert tight.end - tight.cutoff == pytest.approx(0.2, abs=0.01)


def test_no_time_left_is_expired_at_once_and_never_inverted() -> None:
    deadline = Deadline.within(0.0)
    assert deadline.expired()
    assert deadline.cutoff <= deadline.end
    assert deadline.remaining_to_end() <= 0


def test_from_context_reads_the_remaining_time() -> None:
    assert Deadline.from_context(object()) is None
    now = time.monotonic()
    deadline = Deadline.from_context(Context(60_000), margin=5.0)
    assert deadline is not None
    assert deadline.cutoff - now == pytest.approx(55.0, abs=0.05)
    assert deadline.end - now == pytest.approx(60.0 - RETURN_RESERVE, abs=0.05)


def test_after_gives_the_work_after_the_cutoff_its_grace() -> None:
    deadline = Deadline.after(1.0, grace=2.0)
    assert deadline.end - deadline.cutoff == pytest.approx(2.0)
    assert not deadline.expired()
    with pytest.raises(ValueError, match="before its cutoff"):
        Deadline(cutoff=2.0, end=1.0)
