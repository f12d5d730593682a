"""Structured JSON logs: one object per line, with the invocation's request id and, inside
Lambda, the keys Powertools for AWS Lambda's logger gives every line.

CloudWatch Logs Insights can filter on any field; nothing here ever logs a
message body, an attachment or a credential, and every text field (an exception's
traceback included) has its email addresses replaced by a short hash (`errors.redact`),
so a recipient's address never reaches the logs, whatever a library put in a message.

The lines are written for Lambda's JSON log format: there Lambda reads each line's `level`
and `timestamp` and drops the lines below the function's application log level. So `level`
is one of Lambda's names (TRACE, DEBUG, INFO, WARN, ERROR, FATAL: Python's WARNING and
CRITICAL would read as INFO), `timestamp` is RFC 3339, and the metric lines (EMF) carry both
too, at a level no filter that lets the logs through can drop.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from .errors import redact

LOGGER_NAME = "async_notifier"
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# Inside Lambda: cold_start, function_name, function_memory_size, xray_trace_id (`bound`).
lambda_keys: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "lambda_keys", default=MappingProxyType({})
)
_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Lambda's log levels (its JSON log format's `level`), from Python's.
_LAMBDA_LEVELS = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARN",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "FATAL",
}


def lambda_level(levelno: int) -> str:
    """Lambda's name for a Python level (a custom level counts as the one below it)."""
    if levelno < logging.DEBUG:
        return "TRACE"
    return _LAMBDA_LEVELS[min(levelno, logging.CRITICAL) // 10 * 10]


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339 in UTC, to the millisecond: what Lambda's JSON log format reads."""
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "raw_json", False):
            return _with_level(record.getMessage(), record)
        entry: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "level": lambda_level(record.levelno),
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        entry.update(lambda_keys.get())
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


def _with_level(document: str, record: logging.LogRecord) -> str:
    """An EMF document with `level` and `timestamp` in front, so that Lambda's JSON log
    format neither reads it as INFO (dropped under an application level of WARN or more)
    nor rewrites it. The metrics reserve both names (`metrics.py`)."""
    if not document.startswith('{"'):
        return document
    head = json.dumps(
        {"level": lambda_level(record.levelno), "timestamp": _timestamp(record)},
        separators=(",", ":"),
    )
    return f"{head[:-1]},{document[1:]}"


@contextlib.contextmanager
def bound(*, request: str | None = None, keys: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Lines logged inside carry this request id and these keys (Lambda's), and no others."""
    rid_token = request_id.set(request)
    keys_token = lambda_keys.set(MappingProxyType(dict(keys or {})))
    try:
        yield
    finally:
        lambda_keys.reset(keys_token)
        request_id.reset(rid_token)


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stdout` is now (test runners swap it), not at creation."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def emit_raw(document: str) -> None:
    """Write a ready JSON line (an EMF document) through the package's handlers.

    A child logger pinned at INFO: metrics are written whatever LOG_LEVEL says, and
    they go wherever the package's logs are sent. The line's level is the package's level
    (INFO at least), so a filter that lets the logs through lets the metrics through.
    """
    logger = logging.getLogger(f"{LOGGER_NAME}.metrics")
    logger.setLevel(logging.INFO)
    logger.log(max(logging.INFO, get_logger().level), document, extra={"raw_json": True})


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def configure(level: str = "INFO") -> logging.Logger:
    """Give the package logger its own JSON handler (idempotent; Lambda keeps processes warm)."""
    logger = get_logger()
    logger.setLevel(level)
    if not any(getattr(h, "_async_notifier", False) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(JsonFormatter())
        handler._async_notifier = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    return logger
