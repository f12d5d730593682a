"""AWS Lambda entry point: `handler.lambda_handler`.

Only wiring lives here. Settings are parsed and templates compiled on the first
invocation and kept while Lambda keeps the process warm; one event loop serves
every invocation of the process.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from async_notifier.batch.notifier import Notifier
from async_notifier.config import Settings
from async_notifier.logs import request_id
from async_notifier.wiring import build_notifier

_notifier: Notifier | None = None
_runner: asyncio.Runner | None = None


def lambda_handler(event: Any, context: Any) -> dict[str, list[dict[str, str]]]:
    """Return the failed records as `batchItemFailures`; raise only on broken settings."""
    global _notifier, _runner
    if _notifier is None:
        _notifier = build_notifier(Settings.from_env())
    if _runner is None:
        _runner = asyncio.Runner()
    token = request_id.set(getattr(context, "aws_request_id", None))
    try:
        # Runner.run would otherwise use the context captured when the loop was made.
        return _runner.run(_notifier.handle(event, context), context=contextvars.copy_context())
    finally:
        request_id.reset(token)


def reset() -> None:
    """Close the warm clients, forget the settings and close the loop (tests change the env)."""
    global _notifier, _runner
    if _notifier is not None and _runner is not None:
        _runner.run(_notifier.aclose())
    _notifier = None
    if _runner is not None:
        _runner.close()
        _runner = None
