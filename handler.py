"""AWS Lambda entry points: `handler.lambda_handler` (the notifications),
`handler.ses_events_handler` (SES bounces and complaints) and `handler.canary_handler` (the
scheduled canary). Only wiring lives here.

In Lambda (AWS_LAMBDA_FUNCTION_NAME is set), importing this module is the function's init
phase: the entry point Lambda's `_HANDLER` names is started (settings parsed, templates
compiled, aioboto3 imported, AWS clients made, nothing connected), so the first invocation
starts sending at once and a broken setting fails the init, which Lambda reports as such.
Elsewhere nothing happens at import and the first call does that work. The warm process
itself (one event loop, the workers, SnapStart's hooks) is `LambdaProcess`.
"""

from __future__ import annotations

import os
from typing import Any

from async_notifier.config import Settings
from async_notifier.lambda_process import BatchResponse, LambdaProcess
from async_notifier.wiring import build_notifier, build_ses_recorder, canary_lambda

SES_EVENTS_HANDLER = "handler.ses_events_handler"
CANARY_HANDLER = "handler.canary_handler"

process = LambdaProcess(
    notifier=lambda: build_notifier(Settings.from_env()),
    ses_recorder=lambda: build_ses_recorder(Settings.from_env(sending=False)),
)
reset = process.reset  # tests change the environment between cases


def lambda_handler(event: Any, context: Any) -> BatchResponse:
    """Email each notification; return the failed records as `batchItemFailures`.

    Raises only on broken settings.
    """
    return process.invoke(event, context, ses_events=False)


def ses_events_handler(event: Any, context: Any) -> BatchResponse:
    """Record SES bounces and complaints in SUPPRESSION_TABLE; the same partial response."""
    return process.invoke(event, context, ses_events=True)


def canary_handler(event: Any, context: Any) -> dict[str, Any]:
    """Send the canary's three notifications to `event["queue_url"]` and wait for their
    statuses in STATUS_TABLE (`async_notifier.canary`); the summary, and `CanaryFailed`."""
    return canary_lambda(event, context)


try:  # Lambda's Python runtimes ship it; elsewhere there is no snapshot to prepare for.
    from snapshot_restore_py import register_after_restore, register_before_snapshot
except ImportError:
    pass
else:
    register_before_snapshot(process.before_snapshot)
    register_after_restore(process.after_restore)

# The canary's function runs none of the worker's machinery: nothing to start for it.
if os.environ.get("AWS_LAMBDA_FUNCTION_NAME") and os.environ.get("_HANDLER") != CANARY_HANDLER:
    process.init(ses_events=os.environ.get("_HANDLER") == SES_EVENTS_HANDLER)
