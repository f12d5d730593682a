"""SQS set-up and inspection for the runner tests, against any real endpoint (moto, LocalStack);
and the DynamoDB tables the idempotency tests claim in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import boto3
from connections import Connections

from async_notifier.aws.tables import create_table
from async_notifier.batch.notifier import Notifier
from async_notifier.config import Settings
from async_notifier.local.service import Service
from async_notifier.runner import RunnerStats, run
from async_notifier.wiring import build_notifier

REGION = "us-east-1"
# What the runner must give the batch code for every record: Lambda's SQS record keys.
LAMBDA_RECORD_KEYS = {
    "messageId",
    "receiptHandle",
    "body",
    "attributes",
    "messageAttributes",
    "md5OfBody",
    "eventSource",
    "eventSourceARN",
    "awsRegion",
}
COUNT_ATTRIBUTES = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
)


def client(service: str, endpoint_url: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def make_table(endpoint_url: str, name: str) -> None:
    """A table as the worker's stores expect it (`aws.tables.create_table`), made through
    the async client the worker uses."""

    async def make() -> None:
        import aioboto3

        async with aioboto3.Session().client(
            "dynamodb", region_name=REGION, endpoint_url=endpoint_url
        ) as dynamodb:
            await create_table(dynamodb, name)

    asyncio.run(make())


@dataclass(frozen=True)
class Queues:
    url: str
    arn: str
    dlq_url: str
    dlq_arn: str


def create_queues(
    sqs: Any, *, visibility_timeout: int = 1, max_receive_count: int = 2, prefix: str = "runner"
) -> Queues:
    """A queue whose redrive policy moves a message to its DLQ after `max_receive_count`."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = arn_of(sqs, dlq_url)
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "VisibilityTimeout": str(visibility_timeout),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
            ),
        },
    )["QueueUrl"]
    return Queues(url, arn_of(sqs, url), dlq_url, dlq_arn)


def delete_queues(sqs: Any, queues: Queues) -> None:
    sqs.delete_queue(QueueUrl=queues.url)
    sqs.delete_queue(QueueUrl=queues.dlq_url)


def arn_of(sqs: Any, url: str) -> str:
    arn: str = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return arn


def send(sqs: Any, url: str, body: dict[str, Any] | str, **attributes: str | bytes) -> str:
    """Send one message (String/Binary attributes from keyword arguments); return its id."""
    message_attributes = {
        name: (
            {"DataType": "Binary", "BinaryValue": value}
            if isinstance(value, bytes)
            else {"DataType": "String", "StringValue": value}
        )
        for name, value in attributes.items()
    }
    response = sqs.send_message(
        QueueUrl=url,
        MessageBody=body if isinstance(body, str) else json.dumps(body),
        MessageAttributes=message_attributes,
    )
    message_id: str = response["MessageId"]
    return message_id


def counts(sqs: Any, url: str) -> dict[str, int]:
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(COUNT_ATTRIBUTES))[
        "Attributes"
    ]
    return {name: int(attributes.get(name, 0)) for name in COUNT_ATTRIBUTES}


def receive_all(sqs: Any, url: str) -> list[dict[str, Any]]:
    """Every message currently visible in `url`, hidden for a minute after this call."""
    found: list[dict[str, Any]] = []
    while True:
        messages = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            VisibilityTimeout=60,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            return found
        found.extend(messages)


def notification(
    video_id: str,
    *,
    status: str = "COMPLETED",
    bucket: str | None = None,
    key: str | None = None,
    email: str | None = "user@example.com",
    locale: str = "en",
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "video_id": video_id,
        "status": status,
        "name": "Test User",
        "locale": locale,
    }
    if email is not None:
        body["email"] = email
    if status == "FAILED":
        body["message"] = "decoder error"
    if bucket is not None:
        body.update(bucket=bucket, key=key)
    return body


# Settings that make the redrive policy, not the worker, decide when a record gives up (the
# worker's environments in conftest.py leave DEAD_LETTER_QUEUE_URL and IDEMPOTENCY_TABLE unset).
REDRIVE_ENV = {"RETRY_BACKOFF": "false"}


# --------------------------------------------------------------------------- the wire


@dataclass(frozen=True)
class SqsCall:
    """One SQS request the recorder forwarded, and when (monotonic clock, this process)."""

    action: str  # "ReceiveMessage", "ChangeMessageVisibilityBatch"...
    request: dict[str, Any]  # the JSON body (botocore speaks SQS's JSON protocol)
    started: float  # the request reached the recorder
    answered: float  # the endpoint's answer came back (the call had taken effect)


class SqsRecorder(Service):
    """A plain HTTP forwarder on 127.0.0.1 in front of `upstream` that records SQS calls.

    The worker under test points AWS_ENDPOINT_URL here, so a test sees which calls it made
    and when, on the wire: that nothing was received while a batch ran, or that the
    visibility heartbeat made no call after its batch. Other requests (S3) pass through
    unrecorded. One request per connection, like `faults.S3FaultProxy`; its own event loop
    in its own thread.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream needs a host and a port: {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.host = "127.0.0.1"
        self.port = 0
        self._lock = threading.Condition()
        self._calls: list[SqsCall] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections = Connections()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def calls(self, action: str | None = None) -> list[SqsCall]:
        with self._lock:
            return [c for c in self._calls if action is None or c.action == action]

    def wait_for(self, action: str, timeout: float = 30.0) -> SqsCall:
        """Block until a call of `action` has been answered; return the first."""
        with self._lock:
            if not self._lock.wait_for(lambda: self.calls(action), timeout):
                raise TimeoutError(f"no {action} call within {timeout}s")
            return self.calls(action)[0]

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("SQS recorder already running")
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(
                asyncio.start_server(self._connections.track(self._serve), self.host, 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="sqs-recorder", daemon=True)
        self._thread.start()
        if not started.wait(10.0):
            self.stop()
            raise RuntimeError("SQS recorder did not start")

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            await self._connections.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            started = time.monotonic()
            request_line, *lines = head.decode("latin-1").split("\r\n")
            headers = [line.split(":", 1) for line in lines if ":" in line]
            fields = {name.strip().lower(): value.strip() for name, value in headers}
            length = int(fields.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            try:
                up_writer.write(_close_after(request_line, headers) + body)
                await up_writer.drain()
                response = await up_reader.read()  # the upstream closes after its answer
            finally:
                up_writer.close()
            target = fields.get("x-amz-target", "")
            if target:
                call = SqsCall(
                    target.rpartition(".")[2], json.loads(body or b"{}"), started, time.monotonic()
                )
                with self._lock:
                    self._calls.append(call)
                    self._lock.notify_all()
            response_head, _, response_body = response.partition(b"\r\n\r\n")
            status_line, *response_lines = response_head.decode("latin-1").split("\r\n")
            response_headers = [line.split(":", 1) for line in response_lines if ":" in line]
            writer.write(_close_after(status_line, response_headers) + response_body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client gave up on the call (its time limit): nothing to answer
        except asyncio.CancelledError:
            pass  # stop()
        finally:
            writer.close()


def _close_after(start_line: str, headers: list[list[str]]) -> bytes:
    """The same message head, with `Connection: close`: one exchange per connection."""
    kept = [
        f"{name}:{value}"
        for name, value in headers
        if name.strip().lower() not in ("connection", "keep-alive")
    ]
    return ("\r\n".join([start_line, *kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1")


class Competitor:
    """Another consumer of the queue, in a thread with its own client: receives (and keeps)
    whatever becomes visible.

    While a worker holds a batch it must get nothing: a message it gets is one the worker let
    become visible again, which in production is a second email.
    """

    def __init__(self, endpoint_url: str, url: str) -> None:
        self._sqs = client("sqs", endpoint_url)
        self._url = url
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.received: list[dict[str, Any]] = []
        self.polls = 0  # receives answered: it did look, all along

    def __enter__(self) -> Competitor:
        self._thread = threading.Thread(target=self._run, name="competitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop polling; a competitor that crashed (or hangs) fails the test: an empty
        `received` would otherwise pass for one that never looked."""
        self._stop.set()
        try:
            if self._thread is not None:
                self._thread.join(30.0)
                if self._thread.is_alive():
                    raise AssertionError("the competing consumer did not stop")
            if self._error is not None:
                raise AssertionError("the competing consumer crashed") from self._error
        finally:
            self._sqs.close()

    def _run(self) -> None:
        try:
            while True:  # at least one receive, however soon it is stopped
                response = self._sqs.receive_message(
                    QueueUrl=self._url, MaxNumberOfMessages=10, WaitTimeSeconds=1
                )
                self.received.extend(response.get("Messages", []))
                self.polls += 1
                if self._stop.is_set():
                    return
        except BaseException as exc:  # handed to the test's thread by __exit__
            self._error = exc


async def run_with_own_notifier(
    settings: Settings, queue_url: str, *, notifier: Notifier | None = None, **options: Any
) -> RunnerStats:
    """`runner.run` with the notifier `wiring` builds for the settings (closed afterwards),
    as `async-notifier run` does, unless the test brings its own."""
    if notifier is not None:
        return await run(settings, queue_url, notifier=notifier, **options)
    async with build_notifier(settings) as own:
        return await run(settings, queue_url, notifier=own, **options)
