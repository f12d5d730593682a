"""The invocation's budgets end to end: its time after the cutoff, and its temp dir's space.

`handler.lambda_handler` against real peers: moto (through a delay proxy or the S3 fault
proxy), aiosmtpd, and a worker process that is really killed. Each test reads the outcome
back from the peers, the response, the temp dir and the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from faults import FaultySmtp, S3Action, S3FaultProxy, S3Rule, SmtpFaults
from queues import make_table
from scripted_relay import Rule, ScriptedRelay
from servers import (
    LOOPBACK,
    REGION,
    FakeLambdaContext,
    MotoServer,
    SmtpSink,
    failed_ids,
    log_lines,
    make_zip,
    s3_client,
    seed_objects,
    sqs_record,
)

import handler
from async_notifier.aws.idempotency import idempotency_key
from async_notifier.batch import notifier
from async_notifier.batch.scratch import ByteBudget, stale_at
from async_notifier.messages import parse_body
from bench.proxy import Route, start_route, stop_route

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "videos-zip"
MIB = 1024 * 1024
UNDONE = "work after the cutoff left undone"


def failed(video_id: str, to: str) -> dict[str, Any]:
    return {"video_id": video_id, "status": "FAILED", "email": to, "message": "decoder error"}


def completed(video_id: str, key: str, to: str) -> dict[str, Any]:
    return {"video_id": video_id, "status": "COMPLETED", "bucket": BUCKET, "key": key, "email": to}


def invoke(records: list[dict[str, Any]], context: Any = None) -> list[str]:
    return failed_ids(handler.lambda_handler({"Records": records}, context or FakeLambdaContext()))


def undone(out: str) -> dict[str, list[str]]:
    """step → messageIds of every "left undone" warning; each step warns at most once."""
    lines = [line for line in log_lines(out) if line.get("message") == UNDONE]
    steps = [line["step"] for line in lines]
    assert len(steps) == len(set(steps)), steps
    return {line["step"]: line["messageIds"] for line in lines}


def use(monkeypatch: pytest.MonkeyPatch, *, smtp: SmtpSink | None = None, aws: str = "") -> None:
    if smtp is not None:
        monkeypatch.setenv("SMTP_SERVER", smtp.host)
        monkeypatch.setenv("SMTP_PORT", str(smtp.port))
    if aws:
        monkeypatch.setenv("AWS_ENDPOINT_URL", aws)


# --------------------------------------------------------------------------- time after the cutoff


@contextlib.contextmanager
def delay_proxy(upstream: MotoServer, delay: float) -> Iterator[str]:
    """The benchmark's delay proxy in front of moto, on its own loop in its own thread (the
    handler blocks the test's thread); yields its endpoint URL. Requests it still holds when
    the block ends are dropped, never delivered."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="delay-proxy", daemon=True)
    thread.start()
    route = Route(name="aws", host=upstream.host, port=upstream.port, delay=delay)
    try:
        relay = asyncio.run_coroutine_threadsafe(start_route(route), loop).result(10)
        try:
            yield f"http://{LOOPBACK}:{relay.sockets[0].getsockname()[1]}"
        finally:
            asyncio.run_coroutine_threadsafe(stop_route(route, relay), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_slow_sqs_after_the_cutoff_does_not_make_the_handler_overrun(
    lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Dead letters and back-off with 5 s left and an SQS that answers after 10 s.

    Every AWS client uses AWS_ENDPOINT_URL, so the whole endpoint sits behind the delay, and
    the records never touch S3 (FAILED notices and a broken body): SQS is the only AWS
    service this invocation calls.
    """
    sqs = boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name=REGION)
    dlq_url = sqs.create_queue(QueueName="notifications-dlq")["QueueUrl"]
    monkeypatch.setenv("DEAD_LETTER_QUEUE_URL", dlq_url)
    monkeypatch.setenv("RETRY_BACKOFF", "true")
    monkeypatch.setenv("RETRY_ATTEMPTS", "1")
    # Permanent: refused at RCPT (and a body that is not JSON). Transient: 451 after DATA.
    faulty_smtp.faults = SmtpFaults(reject={"bounce@example.com"}, tempfail_every=1)
    use(monkeypatch, smtp=faulty_smtp)
    records = [
        sqs_record("{not json", "bad-json"),
        sqs_record(failed("v-bounce", "bounce@example.com"), "bounce"),
        sqs_record(failed("v-1", "later1@example.com"), "later-1"),
        sqs_record(failed("v-2", "later2@example.com"), "later-2"),
    ]
    context = FakeLambdaContext(remaining_ms=5_000)

    with delay_proxy(aws, delay=10.0) as endpoint:
        use(monkeypatch, aws=endpoint)
        failures = invoke(records, context)
        assert context.get_remaining_time_in_millis() > 0, "Lambda would have killed the batch"

    # Not dead-lettered, so not acknowledged: SQS keeps them (its redrive policy applies).
    assert failures == ["bad-json", "bounce", "later-1", "later-2"]
    assert sqs.receive_message(QueueUrl=dlq_url, WaitTimeSeconds=0).get("Messages", []) == []
    out = capsys.readouterr().out
    assert undone(out) == {
        "dead_letter": ["bad-json", "bounce"],
        "retry_backoff": ["bad-json", "bounce", "later-1", "later-2"],
    }
    classes = {
        line["messageId"]: line["error_class"]
        for line in log_lines(out)
        if line.get("outcome") == "failed"
    }
    assert classes == {
        "bad-json": "bad_message",
        "bounce": "smtp_rejected",
        "later-1": "smtp_unavailable",
        "later-2": "smtp_unavailable",
    }
    assert "later1@example.com" not in out
    assert "bounce@example.com" not in out


def test_closing_connections_does_not_use_up_the_time_for_the_dead_letters(
    lambda_env: dict[str, str],
    aws: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A relay that never answers QUIT: the dead letters are sent first, with the time left.

    One connection per message (SMTP_MAX_MESSAGES_PER_CONNECTION=1), so the delivered one
    retires and says QUIT during the batch; a QUIT may wait min(5 s, SMTP_TIMEOUT), longer
    than the 2.5 s left after the records of a 4 s invocation.
    """
    sqs = boto3.client("sqs", endpoint_url=aws.endpoint_url, region_name=REGION)
    dlq_url = sqs.create_queue(QueueName="notifications-dlq-quit")["QueueUrl"]
    monkeypatch.setenv("DEAD_LETTER_QUEUE_URL", dlq_url)
    monkeypatch.setenv("SMTP_MAX_MESSAGES_PER_CONNECTION", "1")
    monkeypatch.setenv("SMTP_TIMEOUT", "10")
    rules = [
        Rule("RCPT", "550 5.1.1 User unknown", contains="bounce@"),
        Rule("QUIT", delay=math.inf),
    ]
    records = [
        sqs_record(failed("v-ok", "ok@example.com"), "ok"),
        sqs_record(failed("v-bounce", "bounce@example.com"), "bounce"),
    ]
    context = FakeLambdaContext(remaining_ms=4_000)
    with ScriptedRelay(rules) as relay:
        monkeypatch.setenv("SMTP_SERVER", relay.host)
        monkeypatch.setenv("SMTP_PORT", str(relay.port))
        failures = invoke(records, context)
        assert context.get_remaining_time_in_millis() > 0, "Lambda would have killed the batch"
        assert len(relay.accepted) == 1
        assert relay.count("QUIT") >= 1  # the QUIT that never got an answer was sent

    assert failures == []  # the bounce went to the dead-letter queue, so it is acknowledged
    letters = sqs.receive_message(QueueUrl=dlq_url, WaitTimeSeconds=0).get("Messages", [])
    assert len(letters) == 1
    assert "dead_letter" not in undone(capsys.readouterr().out)


def test_a_release_that_cannot_complete_does_not_make_the_handler_overrun(
    lambda_env: dict[str, str],
    aws: MotoServer,
    faulty_smtp: FaultySmtp,
    s3_proxy: S3FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Records cut off at the cutoff with their claims taken; DynamoDB never answers the
    release (the proxy stalls DeleteItem only: the claims are taken through it at once)."""

    make_table(aws.endpoint_url, "claims")
    monkeypatch.setenv("IDEMPOTENCY_TABLE", "claims")
    monkeypatch.setenv("RETRY_BACKOFF", "false")
    # Without a bound of its own a release would wait out 4 SDK attempts of 10 s each.
    monkeypatch.setenv("S3_TIMEOUT", "10")
    monkeypatch.setenv("SMTP_TIMEOUT", "30")
    faulty_smtp.faults = SmtpFaults(stall_seconds=math.inf, stall_on="greeting")  # nothing sent
    s3_proxy.set_rules(S3Rule(S3Action.STALL, target="DynamoDB_20120810.DeleteItem"))
    use(monkeypatch, smtp=faulty_smtp, aws=s3_proxy.endpoint_url)
    bodies = {"cut-1": failed("v-1", "one@example.com"), "cut-2": failed("v-2", "two@example.com")}
    context = FakeLambdaContext(remaining_ms=5_000)

    failures = invoke([sqs_record(body, mid) for mid, body in bodies.items()], context)

    assert context.get_remaining_time_in_millis() > 0, "Lambda would have killed the batch"
    assert failures == ["cut-1", "cut-2"]
    out = capsys.readouterr().out
    releases = [line for line in log_lines(out) if line.get("message") == UNDONE]
    assert sorted((line["step"], *line["messageIds"]) for line in releases) == [
        ("idempotency_release", "cut-1"),
        ("idempotency_release", "cut-2"),
    ]
    # One DeleteItem per record: the SDK's retries did not run past the call's time.
    deletes = [r for r in s3_proxy.requests if r.target == "DynamoDB_20120810.DeleteItem"]
    assert [r.action for r in deletes] == [S3Action.STALL] * 2
    # Left to expire with the invocation: the claims are still there.
    table = boto3.client("dynamodb", endpoint_url=aws.endpoint_url, region_name=REGION)
    for body in bodies.values():
        key = idempotency_key(parse_body(json.dumps(body)).identity)
        item = table.get_item(TableName="claims", Key={"id": {"S": key}})["Item"]
        assert item["status"]["S"] == "IN_PROGRESS"
    assert "one@example.com" not in out


# --------------------------------------------------------------------------- stale scratch dirs

# A worker process: the real handler, with a Lambda context whose time left is argv[2] ms.
WORKER = """
import json, sys
sys.path.insert(0, sys.argv[3])
from servers import FakeLambdaContext
import handler
handler.lambda_handler(json.loads(sys.argv[1]), FakeLambdaContext(remaining_ms=int(sys.argv[2])))
"""


def scratch_dirs(tmp_dir: Path) -> set[Path]:
    return {p for p in tmp_dir.iterdir() if p.name.startswith("async-notifier-")}


def wait_for_download(tmp_dir: Path, known: set[Path], worker: subprocess.Popen[bytes]) -> Path:
    """The scratch dir, not among `known`, in which the worker has started writing a file."""
    due = time.monotonic() + 30
    while time.monotonic() < due:
        assert worker.poll() is None, "the worker ended before its download started"
        for path in scratch_dirs(tmp_dir) - known:
            if any(path.iterdir()):
                return path
        time.sleep(0.05)
    raise AssertionError("no download started within 30 s")


def test_the_scratch_dir_of_a_killed_invocation_is_swept_by_the_next(
    lambda_env: dict[str, str],
    aws: MotoServer,
    smtp_sink: SmtpSink,
    s3_proxy: S3FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tmp_dir = Path(lambda_env["TMP_DIR"])
    # 1 MiB trickled at 40 KiB/s: each worker is still downloading when it is looked at.
    seed_objects(s3_client(aws.endpoint_url), BUCKET, {"slow.zip": make_zip(MIB, seed=5)})
    s3_proxy.set_rules(S3Rule(S3Action.SLOW, match=f"/{BUCKET}/", slow_chunk=4096, slow_delay=0.1))
    use(monkeypatch, aws=s3_proxy.endpoint_url)
    monkeypatch.setenv("DEADLINE_MARGIN_SECONDS", "0.5")
    event = json.dumps({"Records": [sqs_record(completed("v", "slow.zip", "k@example.com"))]})
    workers: list[subprocess.Popen[bytes]] = []

    def start(remaining_ms: int, name: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"{name}.log", "wb") as output:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    event,
                    str(remaining_ms),
                    str(ROOT / "tests" / "support"),
                ],
                cwd=ROOT,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        workers.append(worker)
        return worker

    try:
        # Killed mid-download (as Lambda kills at the timeout, or on running out of memory):
        # it never gets to remove its directory.
        killed = start(remaining_ms=10_000, name="killed")
        killed_dir = wait_for_download(tmp_dir, set(), killed)
        seen = time.time()  # its Lambda context, made before it downloaded, had 10 s at most
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        until = stale_at(killed_dir.name)
        assert until is not None
        assert until <= math.ceil(seen + 10)  # its deadline's end, not the 900 s default

        # Another process, still at work with most of its time left.
        live = start(remaining_ms=120_000, name="live")
        live_dir = wait_for_download(tmp_dir, {killed_dir}, live)

        time.sleep(max(0.0, until + 0.5 - time.time()))
        use(monkeypatch, smtp=smtp_sink)
        assert invoke([sqs_record(failed("v-next", "next@example.com"), "next")]) == []

        assert not killed_dir.exists()
        assert live.poll() is None
        assert any(live_dir.iterdir()), "the live worker's download was removed"
        assert scratch_dirs(tmp_dir) == {live_dir}  # and the invocation's own dir is gone
        swept = [
            line["dir"]
            for line in log_lines(capsys.readouterr().out)
            if line.get("message") == "stale scratch dir removed"
        ]
        assert swept == [killed_dir.name]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait(10)


# --------------------------------------------------------------------------- unknown sizes


@pytest.fixture
def budgets(monkeypatch: pytest.MonkeyPatch) -> list[ByteBudget]:
    """Every temp-dir budget the worker makes (one per batch), to read back its counters."""
    made: list[ByteBudget] = []

    class SpyBudget(ByteBudget):
        def __init__(self, total: int) -> None:
            super().__init__(total)
            made.append(self)

    monkeypatch.setattr(notifier, "ByteBudget", SpyBudget)
    return made


def fetch(url: str) -> bytes:
    assert url.startswith(f"http://{LOOPBACK}:")  # the proxy, never the network
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
        data: bytes = response.read()
    return data


def zip_attachments(sink: SmtpSink) -> dict[str, list[bytes]]:
    found: dict[str, list[bytes]] = {}
    for message in sink.parsed():
        parts = [p.get_content() for p in message.iter_attachments()]
        found[str(message["X-Video-Id"])] = parts
    return found


def link_in(sink: SmtpSink, video_id: str) -> str:
    [message] = [m for m in sink.parsed() if str(m["X-Video-Id"]) == video_id]
    text = message.get_body(preferencelist=("plain",))
    assert text is not None
    [url] = [word for word in text.get_content().split() if word.startswith("http://")]
    return url


@pytest.fixture
def unannounced(
    lambda_env: dict[str, str],
    aws: MotoServer,
    s3_proxy: S3FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> S3FaultProxy:
    """S3 through the proxy, every GET of the bucket answered without a Content-Length."""
    s3_proxy.set_rules(
        S3Rule(S3Action.CHUNKED, match=f"/{BUCKET}/", methods={"GET"}, slow_chunk=64 * 1024)
    )
    use(monkeypatch, aws=s3_proxy.endpoint_url)
    return s3_proxy


@pytest.mark.parametrize(
    ("setting", "value", "big_size"),
    [("MAX_ATTACHMENT_BYTES", 300_000, 400_000), ("MAX_TMP_BYTES", MIB, 3 * MIB // 2)],
    ids=["over-max-attachment", "over-the-whole-tmp-budget"],
)
def test_objects_of_unknown_size_are_counted_against_the_budget(
    setting: str,
    value: int,
    big_size: int,
    unannounced: S3FaultProxy,
    aws: MotoServer,
    smtp_sink: SmtpSink,
    budgets: list[ByteBudget],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(setting, str(value))
    objects = {"small.zip": make_zip(100_000, seed=61), "big.zip": make_zip(big_size, seed=62)}
    seed_objects(s3_client(aws.endpoint_url), BUCKET, objects)
    records = [
        sqs_record(completed("v-small", "small.zip", "small@example.com"), "small"),
        sqs_record(completed("v-big", "big.zip", "big@example.com"), "big"),
    ]

    assert invoke(records) == []

    sent = zip_attachments(smtp_sink)
    assert sent["v-small"] == [objects["small.zip"]]
    assert sent["v-big"] == []  # past the reservation: stopped, and sent as a link
    assert fetch(link_in(smtp_sink, "v-big")) == objects["big.zip"]
    [budget] = budgets
    # Each download reserved the most it could attach (not -1 bytes), within the budget.
    assert value <= budget.peak <= budget.total
    assert budget.in_use == 0
    assert list(Path(os.environ["TMP_DIR"]).rglob("*")) == []
    # Every GET came without a length (one more when a record waited for the budget).
    assert {r.action for r in unannounced.requests if r.method == "GET"} == {S3Action.CHUNKED}


def test_an_object_of_unknown_size_over_the_servers_size_is_sent_as_a_link(
    unannounced: S3FaultProxy,
    aws: MotoServer,
    budgets: list[ByteBudget],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = {"small.zip": make_zip(20_000, seed=63), "big.zip": make_zip(350_000, seed=64)}
    seed_objects(s3_client(aws.endpoint_url), BUCKET, objects)
    # aiosmtpd advertises `SIZE 400000`: the big one fits the reservation, not the message.
    with SmtpSink(data_size_limit=400_000) as sink:
        use(monkeypatch, smtp=sink)
        records = [
            sqs_record(completed("v-small", "small.zip", "small@example.com"), "small"),
            sqs_record(completed("v-big", "big.zip", "big@example.com"), "big"),
        ]
        assert invoke(records) == []
        sent = zip_attachments(sink)
        url = link_in(sink, "v-big")
    assert sent == {"v-small": [objects["small.zip"]], "v-big": []}
    assert fetch(url) == objects["big.zip"]
    [budget] = budgets
    assert budget.in_use == 0
    assert list(Path(os.environ["TMP_DIR"]).rglob("*")) == []
