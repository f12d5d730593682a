"""AdaptiveRate (AIMD pacing) on a fake clock: exact, and no real time passes.

There is no peer to talk to here: the pacing only reads a clock and sleeps, so both are
fakes. `FakeTime.sleep` records each sleep and moves the clock by it; `GatedSleep` holds
each sleep until the test releases it, to cancel a waiter in the middle of one.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from async_notifier.account.pacing import AdaptiveRate


class FakeTime:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class GatedSleep:
    """Each sleep waits until `release()`, which moves the clock to its end."""

    def __init__(self, time: FakeTime) -> None:
        self.time = time
        self.pending: list[tuple[float, asyncio.Future[None]]] = []
        self.sleeps: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((seconds, future))
        await future

    def release(self) -> None:
        seconds, future = self.pending.pop(0)
        self.time.now += seconds
        future.set_result(None)


async def settle() -> None:
    """Let every runnable task run until it blocks (no real time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


def pacer(time: FakeTime, ceiling: float = 10.0, **kwargs: float) -> AdaptiveRate:
    return AdaptiveRate(ceiling, clock=time, sleep=time.sleep, **kwargs)


async def test_slots_are_spaced_one_interval_apart() -> None:
    time = FakeTime()
    rate = pacer(time, 4.0)
    granted = []
    for _ in range(5):
        await rate.acquire()
        granted.append(time.now - 1000.0)
    assert granted == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert time.sleeps == [0.25] * 4


async def test_concurrent_waiters_are_spaced_and_served_in_order() -> None:
    time = FakeTime()
    rate = pacer(time, 2.0)
    order: list[tuple[int, float]] = []

    async def send(index: int) -> None:
        await rate.acquire()
        order.append((index, time.now - 1000.0))

    await asyncio.gather(*(send(i) for i in range(4)))
    assert order == [(0, 0.0), (1, 0.5), (2, 1.0), (3, 1.5)]


async def test_no_burst_after_an_idle_gap() -> None:
    time = FakeTime()
    rate = pacer(time, 10.0)
    await rate.acquire()
    time.now += 60.0  # idle for a minute: a bucket would have filled up
    await rate.acquire()  # at once
    assert time.sleeps == []
    await rate.acquire()
    await rate.acquire()
    assert time.sleeps == [pytest.approx(0.1), pytest.approx(0.1)]


async def test_an_idle_gap_shorter_than_the_interval_waits_out_the_rest() -> None:
    time = FakeTime()
    rate = pacer(time, 1.0)
    await rate.acquire()
    time.now += 0.75
    await rate.acquire()
    assert time.sleeps == [pytest.approx(0.25)]


async def test_throttling_halves_the_rate_and_pushes_the_next_slot() -> None:
    time = FakeTime()
    rate = pacer(time, 8.0)
    await rate.acquire()
    assert rate.throttled() is True
    assert rate.rate == 4.0
    assert rate.decreases == 1
    await rate.acquire()  # not 1/8 after the last slot: 1/4 after the throttling reply
    assert time.sleeps == [0.25]
    await rate.acquire()
    assert time.sleeps == [0.25, 0.25]


async def test_a_waiter_asleep_during_a_decrease_waits_for_the_new_slot() -> None:
    time = FakeTime()
    gate = GatedSleep(time)
    rate = AdaptiveRate(10.0, clock=time, sleep=gate)
    await rate.acquire()
    waiter = asyncio.create_task(rate.acquire())
    await settle()
    assert gate.sleeps == [pytest.approx(0.1)]
    time.now += 0.05
    assert rate.throttled() is True  # rate 5: nothing before now + 0.2
    gate.release()  # at 1000.15 the old slot has passed, the new one has not
    await settle()
    assert not waiter.done()
    assert gate.sleeps[1] == pytest.approx(0.1)
    gate.release()
    await settle()
    assert waiter.done()
    assert time.now == pytest.approx(1000.25)


async def test_at_most_one_decrease_per_round() -> None:
    time = FakeTime()
    rate = pacer(time, 8.0)
    assert rate.throttled() is True
    # The other replies of the same overload, up to a second later (1/4 s < 1 s).
    assert [rate.throttled() for _ in range(5)] == [False] * 5
    time.now += 0.99
    assert rate.throttled() is False
    assert rate.rate == 4.0
    time.now += 0.01  # a second after the decrease: a new round
    assert rate.throttled() is True
    assert rate.rate == 2.0
    assert rate.decreases == 2


async def test_a_round_lasts_one_interval_when_that_is_longer_than_a_second() -> None:
    time = FakeTime()
    rate = pacer(time, 1.0, floor=0.01)
    assert rate.throttled() is True  # rate 0.5: a round of 2 s
    time.now += 1.5
    assert rate.throttled() is False
    time.now += 0.5
    assert rate.throttled() is True
    assert rate.rate == 0.25


async def test_the_rate_never_falls_below_the_floor() -> None:
    time = FakeTime()
    rate = pacer(time, 8.0, floor=3.0)
    assert rate.throttled() is True
    time.now += 10
    assert rate.throttled() is True
    assert rate.rate == 3.0  # not 2
    time.now += 10
    assert rate.throttled() is False  # at the floor: not lowered, not counted
    assert rate.rate == 3.0
    assert rate.decreases == 2
    await rate.acquire()  # the throttling reply still pushed the next slot
    assert time.sleeps == [pytest.approx(1 / 3)]


def test_defaults_are_a_twentieth_of_the_ceiling_and_a_tenth_of_a_send() -> None:
    rate = AdaptiveRate(14.0)
    assert rate.rate == 14.0
    assert rate.ceiling == 14.0
    assert rate.floor == 0.1
    assert rate.increase == pytest.approx(0.7)
    assert AdaptiveRate(0.05).floor == 0.05  # a ceiling under the default floor is the floor


async def test_additive_growth_back_to_the_ceiling_and_never_above() -> None:
    time = FakeTime()
    rate = pacer(time, 10.0)  # increase: 0.5 sends/s per second of sending
    rate.throttled()
    assert rate.rate == 5.0
    rate.succeeded()
    assert rate.rate == pytest.approx(5.1)  # += increase / rate
    successes = 1
    while rate.rate < 10.0:
        rate.succeeded()
        successes += 1
        assert successes < 1000
    assert rate.rate == 10.0
    # sum of 1/rate over the successes is the time spent sending: about 10 s from half.
    assert 70 <= successes <= 80
    for _ in range(100):
        rate.succeeded()
    assert rate.rate == 10.0


async def test_growth_spans_the_intervals_of_the_sends_not_their_count() -> None:
    time = FakeTime()
    rate = pacer(time, 10.0, increase=1.0)
    rate.throttled()  # 5/s
    elapsed = 0.0
    while rate.rate < 9.0:
        elapsed += 1 / rate.rate
        rate.succeeded()
    # d(rate)/dt = increase: 4 sends/s more in about 4 s of sending.
    assert 3.5 <= elapsed <= 4.5


def test_set_ceiling_down_lowers_the_rate_and_up_keeps_a_throttled_rate() -> None:
    time = FakeTime()
    rate = pacer(time, 10.0)
    rate.set_ceiling(4.0)
    assert (rate.ceiling, rate.rate) == (4.0, 4.0)
    rate.set_ceiling(12.0)  # was at the ceiling: follows it up
    assert (rate.ceiling, rate.rate) == (12.0, 12.0)
    rate.throttled()
    assert rate.rate == 6.0
    rate.set_ceiling(20.0)  # throttled: stays, grows back by AIMD
    assert (rate.ceiling, rate.rate) == (20.0, 6.0)
    assert rate.increase == 1.0  # the default increase follows the ceiling
    rate.set_ceiling(5.0)
    assert rate.rate == 5.0
    for _ in range(10):
        rate.succeeded()
    assert rate.rate == 5.0


def test_set_ceiling_below_the_floor_bounds_the_floor() -> None:
    rate = AdaptiveRate(1.0, floor=0.5)
    rate.set_ceiling(0.2)
    assert (rate.rate, rate.floor) == (0.2, 0.2)
    assert rate.throttled() is False  # nothing lower to go to
    rate.set_ceiling(1.0)
    assert rate.floor == 0.5


async def test_set_ceiling_changes_the_spacing_of_the_next_slot() -> None:
    time = FakeTime()
    rate = pacer(time, 2.0)
    await rate.acquire()
    rate.set_ceiling(1.0)
    await rate.acquire()
    assert time.sleeps == [1.0]


@pytest.mark.parametrize(
    ("ceiling", "kwargs", "named"),
    [
        (0.0, {}, "ceiling"),
        (-1.0, {}, "ceiling"),
        (math.inf, {}, "ceiling"),
        (math.nan, {}, "ceiling"),
        (True, {}, "ceiling"),
        ("10", {}, "ceiling"),
        (10.0, {"floor": 0.0}, "floor"),
        (10.0, {"floor": 11.0}, "floor"),
        (10.0, {"floor": math.nan}, "floor"),
        (10.0, {"increase": 0.0}, "increase"),
        (10.0, {"increase": -0.5}, "increase"),
        (10.0, {"increase": math.inf}, "increase"),
    ],
)
def test_bad_arguments_are_refused(ceiling: object, kwargs: dict[str, float], named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named} "):
        AdaptiveRate(ceiling, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("ceiling", [0.0, -2.0, math.inf, math.nan])
def test_set_ceiling_refuses_bad_values_and_keeps_the_old_one(ceiling: float) -> None:
    rate = AdaptiveRate(3.0)
    with pytest.raises(ValueError, match="ceiling"):
        rate.set_ceiling(ceiling)
    assert (rate.ceiling, rate.rate) == (3.0, 3.0)


async def test_a_cancelled_waiter_takes_no_slot_and_blocks_no_one() -> None:
    time = FakeTime()
    gate = GatedSleep(time)
    rate = AdaptiveRate(1.0, clock=time, sleep=gate)
    served: list[str] = []

    async def send(name: str) -> None:
        await rate.acquire()
        served.append(name)

    await send("first")
    sleeping = asyncio.create_task(send("sleeping"))  # holds the lock, asleep for its slot
    await settle()
    queued = asyncio.create_task(send("queued"))  # waits for the lock
    later = [asyncio.create_task(send(name)) for name in ("a", "b")]
    await settle()
    assert gate.sleeps == [1.0]

    sleeping.cancel()  # cancelled in its sleep
    queued.cancel()  # cancelled while waiting for the lock
    await settle()
    assert sleeping.cancelled()
    assert queued.cancelled()

    # "a" now waits for the slot "sleeping" never took: a full interval after "first".
    assert len(gate.pending) == 2  # the cancelled sleep's future, and a's
    assert gate.sleeps == [1.0, 1.0]
    gate.pending.pop(0)  # the cancelled waiter's sleep: nothing resumes it
    gate.release()
    await settle()
    assert served == ["first", "a"]
    assert time.now == 1001.0
    assert gate.sleeps == [1.0, 1.0, 1.0]  # "b" a full interval after "a"
    gate.release()
    await settle()
    assert served == ["first", "a", "b"]
    assert all(task.done() for task in later)
