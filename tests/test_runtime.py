"""The deployment zip, run the way Lambda runs it: Lambda's runtime client and the Runtime API.

Lambda's python3.13 runtime starts `python -m awslambdaric handler.lambda_handler` in the
unpacked zip, and awslambdaric polls the Runtime API for events. Here the Runtime API is an
emulator on 127.0.0.1 (tests/support/runtime_api.py) and awslambdaric is installed beside the zip,
not in it, as Lambda provides it (tests/support/lambda_sandbox.py). Real SQS events go through it to
moto and an SMTP sink, on one warm process; a broken setting must come back as an error the
runtime client reports.

Targets:
- `host`: a zip built for this machine's interpreter and architecture, run by it. Quick (the
  dependency installs are cached), needs no root, and runs in `make test`: it proves the
  handler's contract with the real runtime client on every change.
- `chroot-x86_64`, `chroot-arm64` (marked `chroot`, run by `make test-runtime`): the zips Lambda
  gets, built for CPython 3.13, run by CPython 3.13 in Debian trixie root file systems
  (scripts/rootfs.py), natively and under qemu-user: the real interpreter, its ABI and the
  processor the wheels were built for. They need root (chroot, mount, debootstrap).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from emf import validate_emf
from lambda_sandbox import (
    FUNCTION_NAME,
    LambdaProcess,
    Target,
    build_zip,
    is_root,
    rootfs_script,
    runtime_client,
    runtime_client_version,
    unpack,
)
from runtime_api import Invocation, Outcome, RuntimeApi
from servers import LOOPBACK, MotoServer, SmtpSink, make_zip, s3_client, seed_objects, sqs_record

HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(
    platform.machine().lower()
)
HOST_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
# The function timeout each event gets (Lambda-Runtime-Deadline-Ms), and how long the test
# waits for an answer: generous, for the first import under qemu.
FUNCTION_TIMEOUT = 120
ANSWER_WITHIN = 180.0

# Where a bad setting surfaces: handler.py parses the settings at import when
# AWS_LAMBDA_FUNCTION_NAME is set (Lambda's init phase), so it is an init error and the
# runtime client exits.
BAD_SETTING_REPORTED_AS = {"init"}


@dataclass(frozen=True)
class Deployment:
    """An unpacked zip and the runtime client for the same interpreter and architecture."""

    target: Target
    task: Path
    runtime: Path


def _target(kind: str) -> Target:
    if kind == "host":
        if HOST_ARCH is None:
            pytest.fail(f"no Lambda architecture for this machine ({platform.machine()})")
        return Target(HOST_ARCH, HOST_PYTHON)
    if not is_root():
        pytest.fail("the chroot targets need root (chroot, mount, debootstrap)")
    rootfs = rootfs_script()
    arch = kind.removeprefix("chroot-")
    return Target(arch, rootfs.PYTHON_VERSION, rootfs.ensure(arch))


@pytest.fixture(
    scope="module",
    params=[
        "host",
        pytest.param("chroot-x86_64", marks=pytest.mark.chroot),
        pytest.param("chroot-arm64", marks=pytest.mark.chroot),
    ],
)
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Deployment:
    target = _target(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    archive = build_zip(
        arch=target.arch,
        python_version=target.python_version,
        output=directory / "deployment-package.zip",
    )
    return Deployment(
        target=target,
        task=unpack(archive, directory / "task"),
        runtime=runtime_client(arch=target.arch, python_version=target.python_version),
    )


def _settings(aws: MotoServer, smtp_sink: SmtpSink, bucket: str) -> dict[str, str]:
    """The worker's settings, as template.yaml would set them, pointing at the test's peers."""
    return {
        "SMTP_SERVER": LOOPBACK,
        "SMTP_PORT": str(smtp_sink.port),
        "SMTP_TLS": "none",
        "EMAIL_FROM": "Async Notifier <no-reply@example.com>",
        # One connection at most, so that reuse across invocations is one exact count.
        "SMTP_POOL_SIZE": "1",
        "MAX_CONCURRENCY": "8",
        "ALLOWED_BUCKETS": bucket,
        "RETRY_BACKOFF": "false",
        "AWS_ENDPOINT_URL": aws.endpoint_url,
    }


def _process(
    deployment: Deployment, api: RuntimeApi, settings: dict[str, str], workdir: Path
) -> LambdaProcess:
    return LambdaProcess(
        deployment.target,
        task=deployment.task,
        runtime=deployment.runtime,
        workdir=workdir,
        runtime_api=api.address,
        settings=settings,
        timeout=FUNCTION_TIMEOUT,
    )


def _outcome(api: RuntimeApi, process: LambdaProcess, request_id: str) -> Outcome:
    """How the invocation ended; fail at once, with the runtime's output, if the process
    exits without a word, and after ANSWER_WITHIN if it says nothing."""
    deadline = time.monotonic() + ANSWER_WITHIN
    while True:
        try:
            return api.outcome(request_id, 1.0)
        except TimeoutError:
            exited = process.poll()
            if exited is None and time.monotonic() < deadline:
                continue
        try:  # what the process posted just before exiting, if anything
            return api.outcome(request_id, 0.0)
        except TimeoutError:
            pytest.fail(f"nothing from the runtime (exit {exited}):\n{process.output()}")


def _answer(api: RuntimeApi, process: LambdaProcess, event: Any) -> Invocation:
    """Invoke and wait for the response; fail with the runtime's output otherwise."""
    request_id = api.invoke(event, timeout=FUNCTION_TIMEOUT)
    outcome = _outcome(api, process, request_id)
    assert outcome.phase == "response", (outcome, process.output())
    return api.invocation(request_id)


def _written(output: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(log lines, EMF documents) of the package in the runtime's output."""
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    documents = [validate_emf(json.dumps(line)) for line in lines if "_aws" in line]
    return [line for line in lines if "_aws" not in line], documents


def _trace_root(invocation: Invocation) -> str:
    root, *_ = invocation.trace_id.split(";")
    return root.removeprefix("Root=")


def _failed(invocation: Invocation) -> list[str]:
    assert invocation.response is not None
    body = invocation.response.body
    assert isinstance(body, dict)
    assert list(body) == ["batchItemFailures"], body
    return sorted(item["itemIdentifier"] for item in body["batchItemFailures"])


def test_warm_process_serves_batches(
    deployment: Deployment,
    runtime_api: RuntimeApi,
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    attachment = make_zip(48 * 1024, seed=11)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v1/frames.zip": attachment})
    first = [
        sqs_record(
            {
                "video_id": "v1",
                "status": "COMPLETED",
                "bucket": bucket,
                "key": "v1/frames.zip",
                "email": "maria@example.com",
                "name": "Maria",
                "file_name": "ferias.mp4",
            },
            "m-completed",
        ),
        sqs_record(
            {"video_id": "v2", "status": "FAILED", "email": "john@example.com", "locale": "en"},
            "m-failed",
        ),
        sqs_record("not json", "m-bad"),
    ]
    second = [
        sqs_record(
            {"video_id": "v3", "status": "FAILED", "email": "ana@example.com", "locale": "en"},
            "m-second",
        )
    ]
    settings = _settings(aws, smtp_sink, bucket)
    with _process(deployment, runtime_api, settings, tmp_path) as process:
        invocations = [_answer(runtime_api, process, {"Records": first})]
        assert _failed(invocations[0]) == ["m-bad"]
        smtp_sink.wait_for(2)
        assert smtp_sink.connections_opened == 1

        invocations.append(_answer(runtime_api, process, {"Records": second}))
        assert _failed(invocations[1]) == []
        smtp_sink.wait_for(3)
        # The warm process sent through the connection the first invocation opened.
        assert smtp_sink.connections_opened == 1

        invocations.append(_answer(runtime_api, process, {"Records": []}))
        assert _failed(invocations[2]) == []

        # One process fetched every event and answered it, and is still polling for more.
        for invocation in invocations:
            assert invocation.fetched_by == process.pid
            assert invocation.response is not None
            assert invocation.response.pid == process.pid
        assert process.poll() is None
        # Every binary wheel in the zip was loaded for real: none fell back to pure Python.
        extensions = {path.name for path in deployment.task.rglob("*.so")}
        assert extensions
        loaded = {Path(path).name for path in process.mapped_files()}
        assert extensions - loaded == set()
        output = process.output()

    # The runtime client says which interpreter it runs on: the one the zip was built for.
    version = runtime_client_version()
    assert runtime_api.user_agents
    for agent in runtime_api.user_agents:
        assert agent.startswith(f"aws-lambda-python/{deployment.target.python_version}."), agent
        assert agent.endswith(f"-{version}"), agent

    by_recipient = {str(message["To"]): message for message in smtp_sink.parsed()}
    assert set(by_recipient) == {
        "Maria <maria@example.com>",
        "john@example.com",
        "ana@example.com",
    }
    zips = [
        part.get_content()
        for part in by_recipient["Maria <maria@example.com>"].iter_attachments()
        if part.get_content_type() == "application/zip"
    ]
    assert zips == [attachment]
    # Lambda's log stream (the process's output) names no recipient.
    for address in ("maria@example.com", "john@example.com", "ana@example.com"):
        assert address not in output

    # Each invocation's lines carry Lambda's keys: from its context, and the trace the
    # runtime client put in _X_AMZN_TRACE_ID for it; the first is the cold start. (The
    # third, with no records, logs nothing.)
    logs, documents = _written(output)
    for invocation in invocations[:2]:
        mine = [line for line in logs if line.get("request_id") == invocation.request_id]
        assert mine, invocation.request_id
        assert {line["cold_start"] for line in mine} == {invocation is invocations[0]}
        assert {line["xray_trace_id"] for line in mine} == {_trace_root(invocation)}
        assert {(line["function_name"], line["function_memory_size"]) for line in mine} == {
            (FUNCTION_NAME, 1024)
        }
    cold = [d["request_id"] for d in documents if "ColdStart" in d]
    assert cold == [invocations[0].request_id]


def test_json_log_format_keeps_our_lines_and_their_metrics(
    deployment: Deployment,
    runtime_api: RuntimeApi,
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    """LoggingConfig with LogFormat JSON and ApplicationLogLevel WARN: Lambda starts the
    runtime with AWS_LAMBDA_LOG_FORMAT=JSON and AWS_LAMBDA_LOG_LEVEL=WARN. The runtime
    client formats the root logger's records; the package's lines reach stdout unwrapped,
    only from WARN up (LOG_LEVEL says INFO: Lambda's level wins), in Lambda's level names,
    and the metric lines at WARN, which Lambda's filter keeps, still EMF documents."""
    settings = {
        **_settings(aws, smtp_sink, bucket),
        "AWS_LAMBDA_LOG_FORMAT": "JSON",
        "AWS_LAMBDA_LOG_LEVEL": "WARN",
        "LOG_LEVEL": "INFO",
    }
    record = sqs_record({"video_id": "v1", "status": "FAILED", "email": "ana@example.com"})
    with _process(deployment, runtime_api, settings, tmp_path) as process:
        first = _answer(runtime_api, process, {"Records": [record]})
        assert _failed(first) == []
        second = _answer(runtime_api, process, {"Records": "none"})
        assert _failed(second) == []
        output = process.output()
    smtp_sink.wait_for(1)

    logs, documents = _written(output)
    [warning] = logs
    assert warning["message"] == "event has no Records list; nothing to do"
    assert warning["level"] == "WARN"
    assert (warning["request_id"], warning["cold_start"]) == (second.request_id, False)
    assert warning["xray_trace_id"] == _trace_root(second)
    assert {d["level"] for d in documents} == {"WARN"}
    cold = [d["request_id"] for d in documents if "ColdStart" in d]
    assert cold == [first.request_id]
    assert [d["request_id"] for d in documents if "RecordsReceived" in d] == [first.request_id]


def test_bad_setting_is_reported_by_the_runtime_client(
    deployment: Deployment,
    runtime_api: RuntimeApi,
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    settings = _settings(aws, smtp_sink, bucket)
    del settings["EMAIL_FROM"]
    event = {"Records": [sqs_record({"video_id": "v1", "status": "FAILED", "email": "a@b.co"})]}
    with _process(deployment, runtime_api, settings, tmp_path) as process:
        request_id = runtime_api.invoke(event, timeout=FUNCTION_TIMEOUT)
        outcome = _outcome(runtime_api, process, request_id)
        assert outcome.phase in BAD_SETTING_REPORTED_AS, (outcome, process.output())
        error = outcome.posted
        assert error.pid == process.pid
        assert isinstance(error.body, dict), error.body
        assert "EMAIL_FROM" in error.body["errorMessage"]
        if outcome.phase == "init":
            # awslambdaric names the error type in a header, then exits; Lambda would start a
            # new environment for the event, which no process fetched.
            assert error.headers["lambda-runtime-function-error-type"] == error.body["errorType"]
            assert process.wait(timeout=30) == 1
            assert not runtime_api.invocation(request_id).fetched
        else:
            # An invocation error carries the request id and the X-Ray cause (no error-type
            # header from the C client), and the process keeps polling for the next event.
            assert error.body["requestId"] == request_id
            cause = json.loads(error.headers["lambda-runtime-function-xray-error-cause"])
            assert cause["exceptions"][0]["message"] == error.body["errorMessage"]
            assert process.poll() is None
    assert smtp_sink.messages == []
