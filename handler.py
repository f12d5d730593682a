"""AWS Lambda entry point: `handler.lambda_handler`. Only wiring lives here.

In Lambda (AWS_LAMBDA_FUNCTION_NAME is set), importing this module is the function's init
phase: the settings are parsed, the templates compiled, aioboto3 imported and the AWS
clients made (nothing connects yet), so the first invocation starts sending at once, and
a broken setting fails the init, which Lambda reports as such. Elsewhere nothing happens
at import and the first call does the same work. One event loop serves every invocation
of the process. With SnapStart, the hooks below keep sockets, secrets and random state out
of the snapshot.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import random
from typing import Any

from async_notifier.batch.notifier import Notifier
from async_notifier.config import Settings
from async_notifier.logs import request_id
from async_notifier.wiring import build_notifier

_notifier: Notifier | None = None
_runner: asyncio.Runner | None = None


def lambda_handler(event: Any, context: Any) -> dict[str, list[dict[str, str]]]:
    """Return the failed records as `batchItemFailures`; raise only on broken settings."""
    notifier, runner = _started()
    token = request_id.set(getattr(context, "aws_request_id", None))
    try:
        # Runner.run would otherwise use the context captured when the loop was made.
        return runner.run(notifier.handle(event, context), context=contextvars.copy_context())
    finally:
        request_id.reset(token)


def _started() -> tuple[Notifier, asyncio.Runner]:
    """The process's notifier and event loop, made (and the clients with them) once."""
    global _notifier, _runner
    if _notifier is None or _runner is None:
        notifier = build_notifier(Settings.from_env())
        runner = asyncio.Runner()
        runner.run(notifier.prepare())
        _notifier, _runner = notifier, runner
    return _notifier, _runner


def reset() -> None:
    """Close the warm clients, forget the settings and close the loop (tests change the env)."""
    global _notifier, _runner
    if _notifier is not None and _runner is not None:
        _runner.run(_notifier.aclose())
    _notifier = None
    if _runner is not None:
        _runner.close()
        _runner = None


def before_snapshot() -> None:
    """SnapStart: no socket goes into the snapshot (SMTP connections say QUIT, AWS clients
    close their HTTP connections); every copy restored from it connects afresh."""
    if _notifier is not None and _runner is not None:
        _runner.run(_notifier.aclose())


def after_restore() -> None:
    """SnapStart: the copies of one snapshot must not share what was made before it: the
    random state (MIME boundaries, retry jitter) is seeded anew, secrets that may have
    rotated are read again, and new clients are made (still connecting nothing)."""
    random.seed()
    if _notifier is not None and _runner is not None:
        _notifier.forget_secrets()
        _runner.run(_notifier.prepare())


try:  # Lambda's Python runtimes ship it; elsewhere there is no snapshot to prepare for.
    from snapshot_restore_py import register_after_restore, register_before_snapshot
except ImportError:
    pass
else:
    register_before_snapshot(before_snapshot)
    register_after_restore(after_restore)

if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
    _started()
