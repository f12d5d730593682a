"""Structured JSON logs: one object per line, with the invocation's request id.

CloudWatch Logs Insights can filter on any field; nothing here ever logs a
message body, an attachment or a credential, and every text field (an exception's
traceback included) has its email addresses replaced by a short hash (`errors.redact`),
so a recipient's address never reaches the logs, whatever a library put in a message.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from .errors import redact

LOGGER_NAME = "async_notifier"
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "raw_json", False):
            return record.getMessage()  # already a JSON document (EMF metrics)
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


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
    they go wherever the package's logs are sent.
    """
    logger = logging.getLogger(f"{LOGGER_NAME}.metrics")
    logger.setLevel(logging.INFO)
    logger.info(document, extra={"raw_json": True})


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
