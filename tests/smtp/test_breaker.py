"""An SMTP outage fails fast: the circuit breaker of the pool, against a closed port and a
server that accepts TCP and never greets, for a 1,000-record batch; then the next
invocation probes first, and a healthy server closes the breaker."""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from faults import FaultySmtp, SmtpFaults
from servers import LOOPBACK, FakeLambdaContext, free_port, log_lines, sqs_event, sqs_record

import handler
from async_notifier.smtp import pool as smtp_pool
from async_notifier.smtp.breaker import BreakerState, CircuitBreaker

RECORDS = 1000
MARGIN = 3.0  # DEADLINE_MARGIN_SECONDS: the records stop this long before the end


@pytest.fixture
def env(
    worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, fresh_handler: None
) -> dict[str, str]:
    monkeypatch.setenv("ALLOWED_BUCKETS", "*")
    monkeypatch.setenv("RETRY_BACKOFF", "false")
    monkeypatch.setenv("RETRY_BASE_DELAY", "0.01")
    monkeypatch.setenv("DEADLINE_MARGIN_SECONDS", str(MARGIN))
    monkeypatch.setenv("SMTP_POOL_SIZE", "8")
    monkeypatch.setenv("MAX_CONCURRENCY", "32")
    return worker_env


def batch(tag: str) -> list[dict[str, Any]]:
    return [
        sqs_record(
            {"video_id": f"{tag}{i}", "status": "FAILED", "email": f"u{i}@example.com"}, f"{tag}{i}"
        )
        for i in range(RECORDS)
    ]


def invoke(records: list[dict[str, Any]], seconds: float) -> tuple[list[str], dict[str, str]]:
    """The failed ids, and each failed record's error class; `seconds` is all the time the
    invocation has (its records stop `MARGIN` earlier)."""
    context = FakeLambdaContext(remaining_ms=int(seconds * 1000))
    result = handler.lambda_handler(sqs_event(records), context)
    assert context.get_remaining_time_in_millis() > 0, "Lambda would have killed the batch"
    return [item["itemIdentifier"] for item in result["batchItemFailures"]], {}


def classes(out: str) -> set[str]:
    return {e["error_class"] for e in log_lines(out) if e.get("outcome") == "failed"}


def pool_stats() -> Any:
    return handler.process.notifier.backend.pool  # type: ignore[union-attr]


class SilentServer:
    """Accepts TCP connections and never says a word (counts them; closes them at the end)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(100)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.listener.close()
        self._thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    with SilentServer() as server:
        yield server


def test_a_closed_port_fails_the_batch_at_once_with_few_attempts(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a breaker each of the 1,000 records (and its retries) would try to connect."""
    monkeypatch.setenv("SMTP_PORT", str(free_port()))  # nothing listens there
    failed, _ = invoke(batch("a"), seconds=5 + MARGIN)
    assert len(failed) == RECORDS
    # Every record failed by the breaker (or its own connection), none by the deadline.
    assert classes(capsys.readouterr().out) == {"smtp_unavailable"}
    pool = pool_stats()
    assert pool.breaker.state is BreakerState.OPEN
    assert pool.breaker.openings == 1
    stats = handler.process.run(pool.finish_batch())  # type: ignore[union-attr]
    assert stats.connections_failed <= 10  # every connection attempt the batch made
    assert stats.circuit_opened == 1


def test_a_server_that_never_greets_costs_one_timeout_not_a_thousand(
    env: dict[str, str],
    silent_server: SilentServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    timeout = 2.0
    monkeypatch.setenv("SMTP_PORT", str(silent_server.port))
    monkeypatch.setenv("SMTP_TIMEOUT", str(timeout))
    failed, _ = invoke(batch("b"), seconds=timeout + 5 + MARGIN)
    assert len(failed) == RECORDS
    assert classes(capsys.readouterr().out) == {"smtp_unavailable"}
    assert len(silent_server.accepted) <= 10
    assert pool_stats().breaker.state is BreakerState.OPEN


def test_the_next_invocation_probes_first_and_a_healthy_server_closes_it(
    env: dict[str, str], faulty_smtp: FaultySmtp, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("SMTP_PORT", str(port))
    monkeypatch.setenv("SMTP_BREAKER_COOLDOWN_SECONDS", "60")
    # The pool's breaker reads the test's clock: the cool-down passes when the test says so.
    clock = Clock()
    monkeypatch.setattr(smtp_pool, "CircuitBreaker", functools.partial(CircuitBreaker, clock=clock))
    few = batch("c")[:50]
    failed, _ = invoke(few, seconds=30)
    assert len(failed) == 50
    pool = pool_stats()
    assert pool.breaker.state is BreakerState.OPEN

    # The server comes back, where the pool looks for it (the same port).
    faulty_smtp.stop()
    faulty_smtp.port = port
    faulty_smtp.faults = SmtpFaults()
    faulty_smtp.start()
    clock.now += 59
    assert pool.breaker.state is BreakerState.OPEN
    clock.now += 1  # past the cool-down: the breaker lets one probe through
    assert pool.breaker.state is BreakerState.HALF_OPEN
    failed, _ = invoke(batch("d")[:50], seconds=30)
    assert failed == []
    assert pool.breaker.state is BreakerState.CLOSED
    assert len(faulty_smtp.messages) == 50


# --------------------------------------------------------------------------- the breaker alone


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_the_threshold_and_probes_once_after_the_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, cooldown=10, clock=clock)
    assert breaker.may_connect(connecting=5)
    assert not breaker.failed()
    assert not breaker.failed()
    assert breaker.failed()  # the third in a row opens it
    assert breaker.state is BreakerState.OPEN
    assert not breaker.may_connect(connecting=0)
    clock.now = 10
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.may_connect(connecting=0)
    breaker.attempt_started()
    assert not breaker.may_connect(connecting=1)  # one probe only
    assert not breaker.failed()  # a failed probe: open again, for another cool-down
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_in() == 10
    clock.now = 20
    breaker.attempt_started()
    breaker.succeeded()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.openings == 1


def test_a_success_resets_the_run_of_failures() -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=10, clock=Clock())
    breaker.failed()
    breaker.succeeded()
    assert not breaker.failed()
    assert breaker.state is BreakerState.CLOSED


def test_a_threshold_of_zero_never_opens() -> None:
    breaker = CircuitBreaker(threshold=0, cooldown=10, clock=Clock())
    for _ in range(100):
        assert not breaker.failed()
    assert breaker.state is BreakerState.CLOSED
