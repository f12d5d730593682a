"""Issue 4 under injected faults: `handler.lambda_handler` against a misbehaving SMTP server
(`FaultySmtp`) and a damaging S3 proxy (`S3FaultProxy`), both real peers on loopback.

Every test checks the README's invariant for its scenario through `reconcile`: for every
record exactly one of (its email was accepted once by the server, it is in
`batchItemFailures`, it is in the dead-letter queue), except that a record whose email the
server accepted without ever answering (`FaultySmtp.ambiguous`) is accepted once AND reported
failed; no email is accepted twice and every accepted attachment is the object's exact bytes.
On top, each test asserts what its scenario promises (the error class, whether the record was
retried inside the invocation, how the pool behaved).

No timing assertions, except that the deadline test returns before the context's time is up.
"""

from __future__ import annotations

import email
import email.policy
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import boto3
import pytest
from faults import (
    FaultySmtp,
    S3Action,
    S3FaultProxy,
    S3Faults,
    S3Rule,
    SmtpFault,
    SmtpFaultEvent,
    SmtpFaults,
)
from queues import make_table
from servers import (
    REGION,
    FakeLambdaContext,
    MotoServer,
    make_zip,
    s3_client,
    seed_objects,
    sqs_record,
)

import handler
from async_notifier.account.pause import PoolBackoff
from async_notifier.errors import BadMessage
from async_notifier.mail.mime import message_id
from async_notifier.messages import parse_body

BUCKET = "videos-zip"
VIDEOS = f"/{BUCKET}/"  # proxy rules touch the ZIP bucket only, never SQS
DOMAIN = "example.com"  # EMAIL_FROM's domain: the worker's Message-IDs end with it
# aiobotocore with retries={"max_attempts": 3} (aws/clients.py): 3 retries, 4 requests in all.
SDK_ATTEMPTS = 4
TRANSIENT = {"download_failed", "smtp_unavailable", "smtp_throttled", "delivery_unknown"}
Record = dict[str, Any]
pytestmark = pytest.mark.usefixtures("bucket")  # every scenario reads its ZIPs from it


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=[False, True], ids=["lockstep", "pipelining"])
def pipelining(request: pytest.FixtureRequest, faulty_smtp: FaultySmtp) -> bool:
    """Run an SMTP scenario twice: as aiosmtpd is (no PIPELINING: one command, one reply),
    and advertising PIPELINING (as SES and most providers do), where the worker sends
    MAIL, RCPT and DATA in one write and the next envelope right behind the end of data.
    aiosmtpd reads commands one at a time either way, so pipelined commands are simply
    answered in order, and a hang-up drops the rest."""
    faulty_smtp.pipelining = bool(request.param)
    return faulty_smtp.pipelining


@pytest.fixture
def pool_pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pause each throttling reply imposed on the whole pool (observed, not changed)."""
    pauses: list[float] = []
    original = PoolBackoff.throttled

    def throttled(self: PoolBackoff) -> float:
        pause = original(self)
        pauses.append(pause)
        return pause

    monkeypatch.setattr(PoolBackoff, "throttled", throttled)
    return pauses


# --------------------------------------------------------------------------- records


def completed(video_id: str, key: str, to: str) -> Record:
    return {
        "video_id": video_id,
        "status": "COMPLETED",
        "bucket": BUCKET,
        "key": key,
        "email": to,
        "name": "Test User",
        "locale": "en",
    }


def failed(video_id: str, to: str) -> Record:
    return {"video_id": video_id, "status": "FAILED", "email": to, "message": "decoder error"}


def expected_message_id(body: str) -> str | None:
    """The Message-ID the worker gives this record's email (None: not a valid notification)."""
    try:
        return message_id(parse_body(body), DOMAIN)
    except BadMessage:
        return None


def seed(aws: MotoServer, objects: dict[str, bytes]) -> None:
    """Straight into moto, not through the proxy: seeding is not under test."""
    seed_objects(s3_client(aws.endpoint_url), BUCKET, objects)


# --------------------------------------------------------------------------- outcomes


def invoke(records: Sequence[dict[str, Any]], context: Any = None) -> set[str]:
    """Run the handler; return the ids in batchItemFailures after checking their shape."""
    result = handler.lambda_handler({"Records": list(records)}, context or FakeLambdaContext())
    assert isinstance(result, dict)
    assert list(result) == ["batchItemFailures"]
    ids = [item["itemIdentifier"] for item in result["batchItemFailures"]]
    assert all(list(item) == ["itemIdentifier"] for item in result["batchItemFailures"])
    assert len(ids) == len(set(ids)), "a record reported failed twice"
    assert set(ids) <= {r["messageId"] for r in records}
    return set(ids)


def outcome_lines(out: str) -> dict[str, dict[str, Any]]:
    """messageId → its outcome log line ("record done" or "record failed"), exactly one each."""
    lines: dict[str, dict[str, Any]] = {}
    for text in out.splitlines():
        if not text.startswith("{"):
            continue
        line = json.loads(text)
        if "outcome" in line and "messageId" in line:
            assert line["messageId"] not in lines, f"two outcomes for {line['messageId']}"
            lines[line["messageId"]] = line
    return lines


def error_classes(lines: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {mid: line["error_class"] for mid, line in lines.items() if line["outcome"] == "failed"}


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, _class=EmailMessage, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def zip_attachments(message: EmailMessage) -> list[bytes]:
    found = []
    for part in message.iter_attachments():
        assert part.get_content_type() == "application/zip"
        payload = part.get_content()
        assert isinstance(payload, bytes)
        found.append(payload)
    return found


def fault_events(server: FaultySmtp, kind: SmtpFault) -> list[SmtpFaultEvent]:
    return [e for e in server.events if e.kind is kind]


def tmp_files(env: dict[str, str]) -> list[Path]:
    return list(Path(env["TMP_DIR"]).rglob("*"))


def dlq_client(aws: MotoServer) -> Any:
    """SQS straight on moto (not through the proxy), for creating and reading the DLQ."""
    return boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name=REGION)


def drain(sqs: Any, url: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while True:
        batch = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            VisibilityTimeout=300,
        ).get("Messages", [])
        if not batch:
            return messages
        messages.extend(batch)


@dataclass
class Ledger:
    """Where every record ended up (by SQS messageId)."""

    delivered: set[str] = field(default_factory=set)  # its email was accepted by the server
    failed: set[str] = field(default_factory=set)  # in batchItemFailures
    dead: set[str] = field(default_factory=set)  # in the dead-letter queue
    ambiguous: set[str] = field(default_factory=set)  # accepted, but the 250 never sent
    by_message_id: dict[str, str] = field(default_factory=dict)  # email Message-ID → messageId


def reconcile(
    records: Sequence[dict[str, Any]],
    failures: set[str],
    server: FaultySmtp,
    objects: dict[str, bytes],
    dead: Sequence[dict[str, Any]] = (),
) -> Ledger:
    """Check the invariant for one invocation; return where each record went.

    Shuts the worker down first (`handler.reset()`: the warm S3 client and SMTP pool are
    closed), so the server has seen every connection end and recorded all it will record.
    """
    handler.reset()
    server.wait_idle(timeout=10.0)
    ledger = Ledger(failed=set(failures))
    bodies = {r["messageId"]: r["body"] for r in records}
    assert len(bodies) == len(records)
    for mid, body in bodies.items():
        expected = expected_message_id(body)
        if expected is not None:
            assert expected not in ledger.by_message_id, "test data: one email per record"
            ledger.by_message_id[expected] = mid

    # The dead-letter queue: original bodies, the reason, each record at most once.
    for message in dead:
        attributes = message["MessageAttributes"]
        assert attributes["error_class"]["StringValue"], "a dead letter without its reason"
        original = attributes["original_message_id"]["StringValue"]
        assert original in bodies, f"dead letter for an unknown record {original}"
        assert original not in ledger.dead, f"{original} dead-lettered twice"
        assert message["Body"] == bodies[original]
        ledger.dead.add(original)

    # What the server accepted: each email once, each a record's, attachments intact.
    accepted: Counter[str] = Counter()
    for received in server.accepted:
        parsed = parse(received.data)
        mid_header = str(parsed["Message-ID"]).strip()
        assert mid_header in ledger.by_message_id, f"an email nobody asked for: {mid_header}"
        accepted[mid_header] += 1
        record_id = ledger.by_message_id[mid_header]
        notification = parse_body(bodies[record_id])
        assert received.rcpt_tos == [notification.email]
        attachments = zip_attachments(parsed)
        if notification.status == "COMPLETED":
            assert notification.key is not None
            assert attachments == [objects[notification.key]], (
                f"{record_id}: attachment differs from s3://{BUCKET}/{notification.key}"
            )
        else:
            assert attachments == []
    twice = {mid for mid, n in accepted.items() if n > 1}
    assert not twice, f"emails delivered more than once: {sorted(twice)}"
    ledger.delivered = {ledger.by_message_id[mid] for mid in accepted}
    ledger.ambiguous = {
        ledger.by_message_id[str(parse(m.data)["Message-ID"]).strip()] for m in server.ambiguous
    }

    assert not ledger.failed & ledger.dead, "both dead-lettered and retried"
    assert not ledger.delivered & ledger.dead, "delivered and dead-lettered"
    # Delivered and reported failed: exactly the emails accepted without an answer.
    assert ledger.delivered & ledger.failed == ledger.ambiguous
    lost = set(bodies) - ledger.delivered - ledger.failed - ledger.dead
    assert not lost, f"records neither delivered, retried nor dead-lettered: {sorted(lost)}"
    return ledger


# --------------------------------------------------------------------------- 1. SMTP faults

SMALL = {f"z/{i}.zip": make_zip(2_048 + 512 * i, seed=40 + i) for i in range(4)}


def small_batch(count: int, prefix: str = "m") -> list[dict[str, Any]]:
    """COMPLETED records over SMALL's objects, with a FAILED notice every fourth record."""
    keys = sorted(SMALL)
    records = []
    for n in range(count):
        to = f"{prefix}{n}@example.com"
        body = failed(f"v-{n}", to) if n % 4 == 3 else completed(f"v-{n}", keys[n % len(keys)], to)
        records.append(sqs_record(body, f"{prefix}{n}"))
    return records


def test_421_after_n_messages_replaces_connections_and_delivers_all(
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    pipelining: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each connection carries 3 emails, then answers its next command with 421 and closes.
    # An email can meet several such connections in a row (the pool hands out the most
    # recently used one), so allow more attempts than the default: the point is replacement.
    monkeypatch.setenv("RETRY_ATTEMPTS", "10")
    seed(aws, SMALL)
    faulty_smtp.faults = SmtpFaults(close_after=3)
    records = small_batch(20)

    failures = invoke(records)

    ledger = reconcile(records, failures, faulty_smtp, SMALL)
    assert failures == set()
    assert ledger.delivered == {r["messageId"] for r in records}
    assert faulty_smtp.counts[SmtpFault.CLOSE_AFTER] >= 1
    # 20 emails at 3 per connection: the closed connections were replaced, not given up on.
    assert faulty_smtp.connections_opened >= 20 // 3
    assert tmp_files(faulty_lambda_env) == []


def test_451_on_every_kth_message_is_retried_within_the_invocation(
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    pipelining: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Message ordinals are server-wide, so a retried email can land on a k-th ordinal again;
    # enough attempts make "all delivered" certain for all practical purposes.
    monkeypatch.setenv("RETRY_ATTEMPTS", "20")
    monkeypatch.setenv("MAX_CONCURRENCY", "4")
    seed(aws, SMALL)
    faulty_smtp.faults = SmtpFaults(tempfail_every=3)
    records = small_batch(12)

    failures = invoke(records)

    ledger = reconcile(records, failures, faulty_smtp, SMALL)
    assert failures == set()
    assert ledger.delivered == {r["messageId"] for r in records}
    tempfails = faulty_smtp.counts[SmtpFault.TEMPFAIL]
    assert tempfails >= 4  # 12 messages, every 3rd refused at least once
    lines = outcome_lines(capsys.readouterr().out)
    assert {mid for mid, line in lines.items() if line["outcome"] == "sent"} == {
        r["messageId"] for r in records
    }
    # Every 451 cost exactly one in-invocation retry of the email it hit, and the log says so.
    assert sum(line["retries"] for line in lines.values()) == tempfails
    assert any(line["retries"] >= 1 for line in lines.values())


def test_550_for_one_recipient_fails_that_record_permanently_without_retry(
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    pipelining: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(aws, SMALL)
    gone = "gone@example.com"
    faulty_smtp.faults = SmtpFaults(reject={gone})
    records = [
        *small_batch(6),
        sqs_record(completed("v-gone", sorted(SMALL)[0], gone), "gone"),
    ]

    failures = invoke(records)

    ledger = reconcile(records, failures, faulty_smtp, SMALL)
    assert failures == {"gone"}  # no DEAD_LETTER_QUEUE_URL: permanent failures are reported
    assert ledger.delivered == {r["messageId"] for r in records} - {"gone"}
    line = outcome_lines(capsys.readouterr().out)["gone"]
    assert (line["error_class"], line["transient"], line["retries"]) == ("smtp_rejected", False, 0)
    # Refused once at RCPT, never offered again within the invocation.
    assert [e.rcpt_tos for e in fault_events(faulty_smtp, SmtpFault.REJECT)] == [(gone,)]
    assert tmp_files(faulty_lambda_env) == []


@pytest.mark.parametrize("close", [False, True], ids=["454", "421-rate-close"])
def test_throttling_pauses_the_pool_and_everything_is_delivered(
    close: bool,
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    pipelining: bool,
    pool_pauses: list[float],
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(aws, SMALL)
    # 8 MAILs pass, the next 2 are throttled, the next 8 pass...: 12 emails plus the 2 that
    # were throttled and retried make 14 MAILs, so exactly one burst is ever met.
    faulty_smtp.faults = SmtpFaults(throttle_burst=(8, 2), throttle_close=close)
    records = small_batch(12)

    failures = invoke(records)

    ledger = reconcile(records, failures, faulty_smtp, SMALL)
    assert failures == set()
    assert ledger.delivered == {r["messageId"] for r in records}
    throttled = faulty_smtp.counts[SmtpFault.THROTTLE]
    assert throttled == 2
    assert len(faulty_smtp.accepted) == len(records)  # deliveries resumed after the burst
    # Each throttling reply paused the whole pool (at least the initial 1 s), rather than
    # the email alone being retried at once into the same limit.
    assert len(pool_pauses) == throttled, "a throttling reply did not pause the pool"
    assert all(pause >= 1.0 for pause in pool_pauses)
    lines = outcome_lines(capsys.readouterr().out)
    assert sum(line["retries"] for line in lines.values()) == throttled


def test_drop_in_the_middle_of_data_is_resent_and_delivered_once(
    faulty_lambda_env: dict[str, str], aws: MotoServer, faulty_smtp: FaultySmtp, pipelining: bool
) -> None:
    # Big enough that the worker is still writing the body when the server hangs up, so it
    # knows the end-of-data mark never went out: nothing can have been delivered. (Loopback
    # socket buffers can hold a few MiB: with 3 MiB the whole message sometimes fit, and the
    # hang-up then looked like the ambiguous case.)
    objects = {"big/a.zip": make_zip(12 * 1024 * 1024, seed=5)}
    objects["big/b.zip"] = objects["big/a.zip"][::-1]  # not a ZIP, but bytes are bytes
    seed(aws, objects)
    faulty_smtp.faults = SmtpFaults(drop_in_data_every=2)
    records = [
        sqs_record(completed("v-a", "big/a.zip", "a@example.com"), "a"),
        sqs_record(completed("v-b", "big/b.zip", "b@example.com"), "b"),
    ]

    failures = invoke(records)

    ledger = reconcile(records, failures, faulty_smtp, objects)
    assert failures == set()
    assert ledger.delivered == {"a", "b"}
    assert faulty_smtp.ambiguous == []
    [drop] = fault_events(faulty_smtp, SmtpFault.DROP_IN_DATA)
    assert drop.data is not None
    dropped = parse(drop.data)["Message-ID"]
    assert str(dropped).strip() in ledger.by_message_id  # one of ours, and accepted once later
    assert len(faulty_smtp.accepted) == 2
    assert tmp_files(faulty_lambda_env) == []


def test_drop_after_data_is_reported_failed_and_never_resent(
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    pipelining: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(aws, SMALL)
    faulty_smtp.faults = SmtpFaults(drop_after_data_every=3)
    records = small_batch(6)

    failures = invoke(records)

    ledger = reconcile(records, failures, faulty_smtp, SMALL)
    # The 3rd and 6th emails were accepted but never answered: those records, and only
    # those, are reported failed (SQS retries them with the same Message-ID)...
    assert len(ledger.ambiguous) == 2
    assert failures == ledger.ambiguous
    assert ledger.delivered == {r["messageId"] for r in records}
    # ...and were not resent within the invocation: six messages, six DATA transactions.
    assert len(faulty_smtp.accepted) == 6
    classes = error_classes(outcome_lines(capsys.readouterr().out))
    assert classes == dict.fromkeys(ledger.ambiguous, "delivery_unknown")
    assert tmp_files(faulty_lambda_env) == []


@pytest.mark.parametrize(
    ("stall_on", "error_class"),
    [("greeting", "smtp_unavailable"), ("data", "delivery_unknown")],
)
def test_a_stalled_server_fails_records_transiently_and_the_handler_returns(
    stall_on: str,
    error_class: str,
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SMTP_TIMEOUT", "0.5")
    monkeypatch.setenv("SMTP_DATA_TIMEOUT", "0.5")  # the wait for the end-of-data verdict
    monkeypatch.setenv("RETRY_ATTEMPTS", "2")
    seed(aws, SMALL)
    faulty_smtp.faults = SmtpFaults(stall_seconds=math.inf, stall_on=stall_on)  # type: ignore[arg-type]
    records = small_batch(4)

    failures = invoke(records)

    # The timed-out connections were closed, not kept warm for the next invocation.
    faulty_smtp.wait_idle(timeout=5.0)
    ledger = reconcile(records, failures, faulty_smtp, SMALL)
    assert failures == {r["messageId"] for r in records}
    assert ledger.delivered == set()  # a stalled server records nothing
    lines = outcome_lines(capsys.readouterr().out)
    assert {mid: line["error_class"] for mid, line in lines.items()} == dict.fromkeys(
        failures, error_class
    )
    assert all(line["transient"] for line in lines.values())
    assert tmp_files(faulty_lambda_env) == []


# --------------------------------------------------------------------------- 2. deadline


@pytest.mark.parametrize("stall_on", ["data", "greeting"])
def test_the_deadline_cancels_stalled_sends_and_returns_in_time(
    stall_on: str,
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # SMTP_TIMEOUT would wait 30 s; the invocation has 5 s and keeps a 3 s margin, so only
    # the deadline (about 2 s in) can end the stalled sends.
    monkeypatch.setenv("SMTP_TIMEOUT", "30")
    monkeypatch.setenv("DEADLINE_MARGIN_SECONDS", "3")
    seed(aws, SMALL)
    faulty_smtp.faults = SmtpFaults(stall_seconds=math.inf, stall_on=stall_on)  # type: ignore[arg-type]
    records = small_batch(8)  # more than SMTP_POOL_SIZE (4): some wait for a connection
    context = FakeLambdaContext(remaining_ms=5_000)

    failures = invoke(records, context)

    assert context.get_remaining_time_in_millis() > 0, "Lambda would have killed the batch"
    # Every connection was cancelled mid-transaction (or mid-handshake): closed at once, not
    # parked in the warm pool, so none is left open at the server once the handler returned.
    faulty_smtp.wait_idle(timeout=5.0)
    ledger = reconcile(records, failures, faulty_smtp, SMALL)
    assert failures == {r["messageId"] for r in records}
    assert ledger.delivered == set()
    lines = outcome_lines(capsys.readouterr().out)
    assert error_classes(lines) == dict.fromkeys(failures, "deadline")
    # Cancelled after the end of DATA went out (the server stalls before its reply): those
    # are logged as ambiguous, like delivery_unknown; stalled at the greeting, none are.
    ambiguous = {mid for mid, line in lines.items() if line.get("maybe_delivered")}
    if stall_on == "data":
        assert 1 <= len(ambiguous) <= int(faulty_lambda_env["SMTP_POOL_SIZE"])
    else:
        assert ambiguous == set()
    # The downloads of cancelled records are removed, and the scratch dir too.
    assert tmp_files(faulty_lambda_env) == []


# --------------------------------------------------------------------------- 3. S3 faults

OBJECT_KEY = "s3/frames.zip"
OBJECT = make_zip(64 * 1024, seed=9)


def s3_batch() -> list[dict[str, Any]]:
    """One record that needs the object, one that does not (it must not suffer)."""
    return [
        sqs_record(completed("v-zip", OBJECT_KEY, "zip@example.com"), "zip"),
        sqs_record(failed("v-failed", "notice@example.com"), "notice"),
    ]


def gets(proxy: S3FaultProxy, key: str = OBJECT_KEY) -> list[S3Action | None]:
    return [r.action for r in proxy.requests if r.method == "GET" and r.path.endswith(key)]


@pytest.mark.parametrize("action", [S3Action.INTERNAL_ERROR, S3Action.SLOW_DOWN, S3Action.DROP])
def test_s3_errors_beyond_the_sdk_retries_fail_the_record_transiently(
    action: S3Action,
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    s3_proxy: S3FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RETRY_ATTEMPTS", "2")  # the SDK's attempts, twice
    seed(aws, {OBJECT_KEY: OBJECT})
    s3_proxy.set_rules(S3Rule(action, match=VIDEOS, methods={"GET"}))
    records = s3_batch()

    failures = invoke(records)

    ledger = reconcile(records, failures, faulty_smtp, {OBJECT_KEY: OBJECT})
    assert failures == {"zip"}
    assert ledger.delivered == {"notice"}
    line = outcome_lines(capsys.readouterr().out)["zip"]
    assert (line["error_class"], line["transient"]) == ("download_failed", True)
    # The SDK's attempts, retried once by the worker, then given up. (aiohttp itself sends
    # an idempotent GET again, once, when the connection drops without a response.)
    per_attempt = 2 if action is S3Action.DROP else 1
    assert gets(s3_proxy) == [action] * (2 * SDK_ATTEMPTS * per_attempt)
    assert tmp_files(faulty_lambda_env) == []


def test_s3_errors_fewer_than_the_attempts_are_ridden_out(
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    s3_proxy: S3FaultProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(aws, {OBJECT_KEY: OBJECT})
    # More errors than the SDK's attempts absorb, so the worker's own retry is needed.
    s3_proxy.set_rules(
        S3Rule(S3Action.INTERNAL_ERROR, match=VIDEOS, methods={"GET"}, times=SDK_ATTEMPTS)
    )
    records = s3_batch()

    failures = invoke(records)

    ledger = reconcile(records, failures, faulty_smtp, {OBJECT_KEY: OBJECT})
    assert failures == set()
    assert ledger.delivered == {"zip", "notice"}
    assert gets(s3_proxy) == [S3Action.INTERNAL_ERROR] * SDK_ATTEMPTS + [None]
    # The worker retried the record once: its outcome line must say so.
    assert outcome_lines(capsys.readouterr().out)["zip"]["retries"] == 1


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("times", [1, None], ids=["once", "always"])
def test_a_cut_body_is_never_mailed_truncated(
    times: int | None,
    fraction: float,
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    s3_proxy: S3FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DOWNLOAD_CHUNK_BYTES", "4096")  # the body streams in many chunks
    seed(aws, {OBJECT_KEY: OBJECT})
    s3_proxy.set_rules(
        S3Rule(S3Action.CUT, match=VIDEOS, methods={"GET"}, times=times, cut_fraction=fraction)
    )
    records = s3_batch()

    failures = invoke(records)

    # reconcile: every accepted attachment is byte-identical to the object, never a prefix.
    ledger = reconcile(records, failures, faulty_smtp, {OBJECT_KEY: OBJECT})
    lines = outcome_lines(capsys.readouterr().out)
    if times == 1:  # retried within the invocation and delivered whole
        assert failures == set()
        assert ledger.delivered == {"zip", "notice"}
        assert lines["zip"]["retries"] == 1
        assert gets(s3_proxy) == [S3Action.CUT, None]
    else:  # cut on every attempt: reported failed, nothing mailed for it
        assert failures == {"zip"}
        assert ledger.delivered == {"notice"}
        assert (lines["zip"]["error_class"], lines["zip"]["transient"]) == (
            "download_failed",
            True,
        )
        assert gets(s3_proxy) == [S3Action.CUT] * 3  # RETRY_ATTEMPTS
    assert tmp_files(faulty_lambda_env) == []


def test_a_slow_body_is_delivered_intact(
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    s3_proxy: S3FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOWNLOAD_CHUNK_BYTES", "4096")
    seed(aws, {OBJECT_KEY: OBJECT})
    s3_proxy.set_rules(
        S3Rule(S3Action.SLOW, match=VIDEOS, methods={"GET"}, slow_chunk=2048, slow_delay=0.005)
    )
    records = s3_batch()

    failures = invoke(records)

    ledger = reconcile(records, failures, faulty_smtp, {OBJECT_KEY: OBJECT})
    assert failures == set()
    assert ledger.delivered == {"zip", "notice"}
    assert gets(s3_proxy) == [S3Action.SLOW]


def test_a_missing_object_is_a_permanent_failure_without_retry(
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    s3_proxy: S3FaultProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed(aws, {OBJECT_KEY: OBJECT})
    records = [
        *s3_batch(),
        sqs_record(completed("v-missing", "s3/missing.zip", "missing@example.com"), "missing"),
    ]

    failures = invoke(records)

    ledger = reconcile(records, failures, faulty_smtp, {OBJECT_KEY: OBJECT})
    assert failures == {"missing"}
    assert ledger.delivered == {"zip", "notice"}
    line = outcome_lines(capsys.readouterr().out)["missing"]
    assert (line["error_class"], line["transient"], line["retries"]) == (
        "object_unavailable",
        False,
        0,
    )
    assert gets(s3_proxy, "s3/missing.zip") == [None]  # asked once: neither SDK nor worker retry


def test_a_stalled_s3_with_a_short_timeout_fails_the_record_transiently(
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    s3_proxy: S3FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("S3_TIMEOUT", "0.5")
    monkeypatch.setenv("RETRY_ATTEMPTS", "1")  # the SDK's own attempts are enough here
    seed(aws, {OBJECT_KEY: OBJECT})
    s3_proxy.set_rules(S3Rule(S3Action.STALL, match=VIDEOS, methods={"GET"}))
    records = s3_batch()

    failures = invoke(records)

    ledger = reconcile(records, failures, faulty_smtp, {OBJECT_KEY: OBJECT})
    assert failures == {"zip"}
    assert ledger.delivered == {"notice"}
    line = outcome_lines(capsys.readouterr().out)["zip"]
    assert (line["error_class"], line["transient"]) == ("download_failed", True)
    assert gets(s3_proxy) == [S3Action.STALL] * SDK_ATTEMPTS
    assert tmp_files(faulty_lambda_env) == []


# --------------------------------------------------------------------------- 4. the invariant

# Enough for every fault kind to fire: the server draws its fault for each DATA in turn, and
# the proxy for each GET, from seeded generators, so the first 250 draws (fewer than the
# messages and downloads of 300 records) already hold at least 3 of each kind.
BULK_RECORDS = 300
BULK_OBJECTS = {
    f"bulk/{i:02d}.zip": make_zip(2_048 + (6 * 1_024 * i) // 19, seed=200 + i) for i in range(20)
}


def bulk_batch() -> tuple[list[dict[str, Any]], dict[str, str]]:
    """BULK_RECORDS good records (each its own video) plus a few bad ones; the bad ones'
    expected dead-letter class by messageId."""
    keys = sorted(BULK_OBJECTS)
    records = []
    for n in range(BULK_RECORDS):
        to = f"user{n:05d}@example.com"
        video = f"video-{n:05d}"
        body = failed(video, to) if n % 20 == 7 else completed(video, keys[n % len(keys)], to)
        records.append(sqs_record(body, f"msg-{n:05d}"))
    bad: dict[str, str] = {}
    for i in range(5):
        mid = f"bad-json-{i}"
        records.append(sqs_record('{"video_id": "x", "email": ', mid))
        bad[mid] = "bad_message"
        mid = f"bad-key-{i}"
        records.append(
            sqs_record(completed(f"nokey-{i}", f"bulk/missing-{i}.zip", f"nk{i}@example.com"), mid)
        )
        bad[mid] = "object_unavailable"
        mid = f"bad-rcpt-{i}"
        records.append(sqs_record(completed(f"rej-{i}", keys[i], f"rejected{i}@example.com"), mid))
        bad[mid] = "smtp_rejected"
    # Spread the bad ones through the batch rather than at its end.
    records = [records[i] for i in sorted(range(len(records)), key=lambda i: (i * 7919) % 1_021)]
    return records, bad


def test_every_record_is_accounted_for_exactly_once_under_random_faults(
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    s3_proxy: S3FaultProxy,
    pipelining: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sqs = dlq_client(aws)
    dlq_url = sqs.create_queue(QueueName="notifications-dlq")["QueueUrl"]
    monkeypatch.setenv("DEAD_LETTER_QUEUE_URL", dlq_url)
    monkeypatch.setenv("SMTP_POOL_SIZE", "8")
    monkeypatch.setenv("MAX_CONCURRENCY", "32")
    seed(aws, BULK_OBJECTS)
    records, bad = bulk_batch()
    rejected = {f"rejected{i}@example.com" for i in range(5)}
    faulty_smtp.faults = SmtpFaults(
        reject=rejected,
        rng_seed=20240601,
        p_tempfail=0.05,
        p_drop_in_data=0.02,
        p_drop_after_data=0.02,
        p_reject_5xx=0.01,
    )
    s3_proxy.faults = S3Faults(
        rules=(
            S3Rule(S3Action.INTERNAL_ERROR, match=VIDEOS, methods={"GET"}, probability=0.03),
            S3Rule(S3Action.CUT, match=VIDEOS, methods={"GET"}, probability=0.03),
        ),
        rng_seed=20240602,
    )

    failures = invoke(records, FakeLambdaContext(remaining_ms=900_000))

    dead = drain(sqs, dlq_url)
    ledger = reconcile(records, failures, faulty_smtp, BULK_OBJECTS, dead)
    lines = outcome_lines(capsys.readouterr().out)
    assert set(lines) == {r["messageId"] for r in records}, "one outcome line per record"
    classes = {
        m["MessageAttributes"]["original_message_id"]["StringValue"]: m["MessageAttributes"][
            "error_class"
        ]["StringValue"]
        for m in dead
    }

    # The faults really happened, on both sides.
    smtp_counts = faulty_smtp.counts
    for kind in (
        SmtpFault.TEMPFAIL,
        SmtpFault.DROP_IN_DATA,
        SmtpFault.DROP_AFTER_DATA,
        SmtpFault.REJECT_5XX,
    ):
        assert smtp_counts[kind] > 0, kind
    assert s3_proxy.counts[S3Action.INTERNAL_ERROR] > 0
    assert s3_proxy.counts[S3Action.CUT] > 0

    # The bad records went to the dead-letter queue with their reason, and only once.
    for mid, expected in bad.items():
        assert classes.get(mid) == expected, (mid, classes.get(mid), lines[mid])
    rcpt = Counter(e.rcpt_tos for e in fault_events(faulty_smtp, SmtpFault.REJECT))
    assert rcpt == Counter({(address,): 1 for address in rejected})
    # The rest of the dead letters are the server's 554s; dead means permanent.
    assert set(classes.values()) <= {"bad_message", "object_unavailable", "smtp_rejected"}
    assert ledger.dead == set(classes)
    assert (
        sum(c == "smtp_rejected" for c in classes.values()) == 5 + smtp_counts[SmtpFault.REJECT_5XX]
    )

    # Reported failed: transient reasons only; delivered-and-failed is the ambiguous set.
    failed_classes = {mid: lines[mid]["error_class"] for mid in ledger.failed}
    assert set(failed_classes.values()) <= TRANSIENT, Counter(failed_classes.values())
    assert (
        ledger.ambiguous
        == {mid for mid, c in failed_classes.items() if c == "delivery_unknown"} & ledger.delivered
    )
    assert len(ledger.ambiguous) == smtp_counts[SmtpFault.DROP_AFTER_DATA]
    # Retried in the invocation and delivered: most of the faults were ridden out.
    assert sum(line["retries"] for line in lines.values()) > 0
    assert len(ledger.delivered) > 0.9 * BULK_RECORDS
    assert tmp_files(faulty_lambda_env) == []


def test_a_send_cancelled_after_its_data_keeps_its_idempotency_claim(
    faulty_lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Cancelled by the deadline while the server decides: maybe delivered, so the claim stays
    IN_PROGRESS (a retry waits for it to expire); claims of records that sent nothing go."""
    from async_notifier.aws.idempotency import idempotency_key
    from async_notifier.messages import parse_body

    make_table(aws.endpoint_url, "claims")
    monkeypatch.setenv("IDEMPOTENCY_TABLE", "claims")
    monkeypatch.setenv("SMTP_TIMEOUT", "30")
    monkeypatch.setenv("DEADLINE_MARGIN_SECONDS", "3")
    seed(aws, SMALL)
    faulty_smtp.faults = SmtpFaults(stall_seconds=math.inf, stall_on="data")
    records = small_batch(8)

    failures = invoke(records, FakeLambdaContext(remaining_ms=5_000))

    assert failures == {r["messageId"] for r in records}
    lines = outcome_lines(capsys.readouterr().out)
    ambiguous = {mid for mid, line in lines.items() if line.get("maybe_delivered")}
    assert ambiguous
    table = boto3.client("dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION)
    for record in records:
        key = idempotency_key(parse_body(record["body"]).identity)
        item = table.get_item(TableName="claims", Key={"id": {"S": key}}).get("Item")
        if record["messageId"] in ambiguous:
            assert item is not None
            assert item["status"]["S"] == "IN_PROGRESS"
        else:
            assert item is None, record["messageId"]
