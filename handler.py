"""AWS Lambda entry points: `handler.lambda_handler` (the notifications) and
`handler.ses_events_handler` (SES bounces and complaints). Only wiring lives here.

In Lambda (AWS_LAMBDA_FUNCTION_NAME is set), importing this module is the function's init
phase: the settings are parsed, the templates compiled, aioboto3 imported and the AWS
clients made (nothing connects yet), so the first invocation starts sending at once, and
a broken setting fails the init, which Lambda reports as such. Lambda's `_HANDLER` says
which of the two entry points the function runs. Elsewhere nothing happens at import and
the first call does the same work. One event loop serves every invocation of the process.
With SnapStart, the hooks below keep sockets, secrets and random state out of the snapshot.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import random
from typing import Any

from async_notifier.batch.notifier import Notifier
from async_notifier.batch.ses_recorder import SesEventsRecorder
from async_notifier.config import Settings
from async_notifier.logs import request_id
from async_notifier.wiring import build_notifier, build_ses_recorder

SES_EVENTS_HANDLER = "handler.ses_events_handler"

_notifier: Notifier | None = None
_ses_recorder: SesEventsRecorder | None = None
_runner: asyncio.Runner | None = None


def lambda_handler(event: Any, context: Any) -> dict[str, list[dict[str, str]]]:
    """Email each notification; return the failed records as `batchItemFailures`.

    Raises only on broken settings.
    """
    return _handle(event, context, ses_events=False)


def ses_events_handler(event: Any, context: Any) -> dict[str, list[dict[str, str]]]:
    """Record SES bounces and complaints in SUPPRESSION_TABLE; the same partial response."""
    return _handle(event, context, ses_events=True)


def _handle(event: Any, context: Any, *, ses_events: bool) -> dict[str, list[dict[str, str]]]:
    worker, runner = _started(ses_events=ses_events)
    token = request_id.set(getattr(context, "aws_request_id", None))
    try:
        # Runner.run would otherwise use the context captured when the loop was made.
        return runner.run(worker.handle(event, context), context=contextvars.copy_context())
    finally:
        request_id.reset(token)


def _started(*, ses_events: bool) -> tuple[Notifier | SesEventsRecorder, asyncio.Runner]:
    """The entry point's worker and the process's event loop, made (and the clients with
    them) once."""
    global _notifier, _ses_recorder, _runner
    if _runner is None:
        _runner = asyncio.Runner()
    if ses_events:
        if _ses_recorder is None:
            recorder = build_ses_recorder(Settings.from_env(sending=False))
            _runner.run(recorder.prepare())
            _ses_recorder = recorder
        return _ses_recorder, _runner
    if _notifier is None:
        notifier = build_notifier(Settings.from_env())
        _runner.run(notifier.prepare())
        _notifier = notifier
    return _notifier, _runner


def reset() -> None:
    """Close the warm clients, forget the settings and close the loop (tests change the env)."""
    global _notifier, _ses_recorder, _runner
    for worker in _workers():
        assert _runner is not None
        _runner.run(worker.aclose())
    _notifier = _ses_recorder = None
    if _runner is not None:
        _runner.close()
        _runner = None


def _workers() -> list[Notifier | SesEventsRecorder]:
    return [w for w in (_notifier, _ses_recorder) if w is not None]


def before_snapshot() -> None:
    """SnapStart: no socket goes into the snapshot (SMTP connections say QUIT, AWS clients
    close their HTTP connections); every copy restored from it connects afresh."""
    for worker in _workers():
        assert _runner is not None
        _runner.run(worker.aclose())


def after_restore() -> None:
    """SnapStart: the copies of one snapshot must not share what was made before it: the
    random state (MIME boundaries, retry jitter) is seeded anew, secrets that may have
    rotated are read again, and new clients are made (still connecting nothing)."""
    random.seed()
    for worker in _workers():
        assert _runner is not None
        worker.forget_secrets()
        _runner.run(worker.prepare())


try:  # Lambda's Python runtimes ship it; elsewhere there is no snapshot to prepare for.
    from snapshot_restore_py import register_after_restore, register_before_snapshot
except ImportError:
    pass
else:
    register_before_snapshot(before_snapshot)
    register_after_restore(after_restore)

if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
    _started(ses_events=os.environ.get("_HANDLER") == SES_EVENTS_HANDLER)
