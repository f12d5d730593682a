"""Turn one SQS record into a validated `Notification`, or say exactly why not.

Everything that reaches an email header or the S3 request is checked here, so
later stages can trust their input: a record is either fully valid or rejected
with a `BadMessage` that names the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from email_validator import EmailNotValidError, validate_email

from .config import SUPPORTED_LOCALES
from .delivery_status import TRACKING_ID_LENGTH
from .errors import BadMessage

Status = Literal["COMPLETED", "FAILED"]

_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")
# "pt-BR", "pt_br", "pt" → pt-BR; "en-US" → en: every supported tag, and its language alone.
_LOCALE_ALIASES = {
    **{tag.split("-")[0].lower(): tag for tag in reversed(SUPPORTED_LOCALES)},
    **{tag.lower(): tag for tag in SUPPORTED_LOCALES},
}
MAX_KEY_BYTES = 1024
# Header-bound values (names, file names, ids): a file name's usual limit, and short enough
# that an unfoldable value (no spaces) keeps its header line under RFC 5322's 998 octets.
MAX_TEXT = 255
MAX_ERROR_TEXT = 10_000


@dataclass(frozen=True, slots=True)
class SqsRecord:
    """The parts of an SQS record the worker needs, typed."""

    message_id: str
    body: str
    receive_count: int
    attributes: Mapping[str, Any]
    raw: Mapping[str, Any]

    @property
    def event_source_arn(self) -> str | None:
        arn = self.raw.get("eventSourceARN")
        return arn if isinstance(arn, str) and arn else None

    @property
    def sent_at(self) -> float | None:
        """When the message was first sent to the queue (SQS's SentTimestamp, epoch seconds):
        the clock of MAX_DELIVERY_AGE. None when the record does not say."""
        raw = self.attributes.get("SentTimestamp")
        if not isinstance(raw, str | int) or isinstance(raw, bool):
            return None
        try:
            millis = int(raw)
        except ValueError:
            return None
        return millis / 1000.0 if millis > 0 else None

    def age(self, now: float) -> float | None:
        """Seconds since the message was sent (`now` is epoch time), None if unknown."""
        sent = self.sent_at
        return None if sent is None else max(0.0, now - sent)

    @property
    def message_group_id(self) -> str | None:
        """Set on FIFO queues, where records of one group must stay in order."""
        group = self.attributes.get("MessageGroupId")
        return group if isinstance(group, str) and group else None

    @classmethod
    def from_event(cls, record: Any) -> SqsRecord:
        if not isinstance(record, Mapping):
            raise BadMessage("record is not an object")
        message_id = message_id_of(record)
        if not message_id:
            raise BadMessage("record has no messageId")
        body = record.get("body")
        if not isinstance(body, str):
            raise BadMessage("record has no body")
        attributes = record.get("attributes")
        if not isinstance(attributes, Mapping):
            attributes = {}
        try:
            receive_count = int(attributes.get("ApproximateReceiveCount", 1))
        except (TypeError, ValueError):
            receive_count = 1
        return cls(message_id, body, receive_count, attributes, record)


def message_id_of(record: Any) -> str:
    """A raw SQS record's messageId, or "" when it has none: the one place that reads it,
    so that a record that cannot be parsed is still reported under its id."""
    message_id = record.get("messageId") if isinstance(record, Mapping) else None
    return message_id if isinstance(message_id, str) else ""


@dataclass(frozen=True, slots=True)
class Notification:
    video_id: str
    status: Status
    email: str | None  # None until looked up, when the record names a Cognito user instead
    name: str | None
    file_name: str | None
    message: str
    locale: str | None
    timestamp: datetime | None
    bucket: str | None
    key: str | None
    cognito_user_id: str | None = None
    notification_id: str | None = None

    @property
    def delivery(self) -> str | None:
        """Which notification of the video this is, as its producer tells it: the
        `notification_id`, else the `timestamp`; None when the message says neither."""
        if self.notification_id is not None:
            return f"id:{self.notification_id}"
        if self.timestamp is not None:
            return f"at:{self.timestamp.isoformat()}"
        return None

    @property
    def identity(self) -> str:
        """What makes two records the same email: the video, its status, the recipient,
        and the producer's delivery (`delivery`) when the message carries one.

        Stable across redeliveries of one message, so SQS's duplicates are sent once; a new
        notification for the same video (a new id or time) is a new email and goes out.
        """
        recipient = self.email.lower() if self.email else f"cognito:{self.cognito_user_id}"
        parts: list[str] = [self.video_id, self.status, recipient]
        if self.delivery is not None:
            parts.append(self.delivery)
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    @property
    def tracking_id(self) -> str:
        """The notification's id outside the worker: the key of its delivery status
        (STATUS_TABLE) and the SES message tag its email carries, so SES's events find it.

        The first 40 hex digits of `identity` (a hash: it holds no address), and so the
        local part of the email's Message-ID when the message names its recipient's address.
        Taken before a Cognito lookup, which changes `identity`, so it stays the same from
        the record to the status."""
        return self.identity[:TRACKING_ID_LENGTH]

    @property
    def display_name(self) -> str:
        return self.file_name or self.video_id


def parse_body(body: str) -> Notification:
    """Parse a record body (plain JSON, or an SNS envelope around it)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BadMessage(f"body is not valid JSON: {exc}") from None
    if isinstance(data, dict) and data.get("Type") == "Notification" and "Message" in data:
        inner = data["Message"]
        if not isinstance(inner, str):
            raise BadMessage("SNS envelope Message is not a string")
        try:
            data = json.loads(inner)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise BadMessage(f"SNS Message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadMessage("body is not a JSON object")
    return _notification(data)


def _notification(data: dict[str, Any]) -> Notification:
    status = _status(data.get("status"))
    video_id = _header_text(data, "video_id", required=True)
    assert video_id is not None
    cognito_user_id = _header_text(data, "cognito_user_id")
    notification_id = _header_text(data, "notification_id")
    raw_email = _first(data, "email", "recipient_email")
    email = None if raw_email is None and cognito_user_id else _email(raw_email)
    name = _header_text(_aliased(data, "name", "recipient_name"), "name")
    file_name = _header_text(data, "file_name")
    locale = _locale(data.get("locale"))
    timestamp = _timestamp(data.get("timestamp"))
    message = data.get("message")
    if message is None:
        message = ""
    if not isinstance(message, str):
        raise BadMessage("field 'message' must be a string")
    if len(message) > MAX_ERROR_TEXT:
        message = message[:MAX_ERROR_TEXT] + "…"

    bucket, key = _location(data)
    if status == "COMPLETED" and (bucket is None or key is None):
        raise BadMessage("a COMPLETED notification needs 'bucket' and 'key'")
    return Notification(
        video_id=video_id,
        status=status,
        email=email,
        name=name,
        file_name=file_name,
        message=message,
        locale=locale,
        timestamp=timestamp,
        bucket=bucket,
        key=key,
        cognito_user_id=cognito_user_id,
        notification_id=notification_id,
    )


def _first(data: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if data.get(name) not in (None, ""):
            return data[name]
    return None


def _aliased(data: Mapping[str, Any], name: str, alias: str) -> dict[str, Any]:
    return {name: _first(data, name, alias)}


def _status(value: Any) -> Status:
    if value is None or value == "":
        return "COMPLETED"
    if not isinstance(value, str):
        raise BadMessage("field 'status' must be a string")
    upper = value.strip().upper()
    if upper == "COMPLETED":
        return "COMPLETED"
    if upper == "FAILED":
        return "FAILED"
    raise BadMessage(f"unknown status {value[:40]!r} (expected COMPLETED or FAILED)")


def _header_text(data: Mapping[str, Any], field: str, *, required: bool = False) -> str | None:
    """A value that ends up in a header or a file name: one printable line."""
    value = data.get(field)
    if value is None or value == "":
        if required:
            raise BadMessage(f"field {field!r} is required")
        return None
    if not isinstance(value, str):
        raise BadMessage(f"field {field!r} must be a string")
    if any(ch in value for ch in "\r\n") or not value.isprintable():
        raise BadMessage(f"field {field!r} contains line breaks or control characters")
    value = value.strip()
    if not value:
        if required:
            raise BadMessage(f"field {field!r} is required")
        return None
    if len(value) > MAX_TEXT:
        raise BadMessage(f"field {field!r} is longer than {MAX_TEXT} characters")
    return value


def _email(value: Any) -> str:
    if value is None:
        raise BadMessage("field 'email' is required (or 'cognito_user_id')")
    if not isinstance(value, str):
        raise BadMessage("field 'email' must be a string")
    try:
        return validate_address(value)
    except ValueError as exc:
        raise BadMessage(f"field 'email' {exc}") from None


def validate_address(value: str) -> str:
    """One bare mailbox, in the form it is sent (ASCII domain); ValueError says why not.

    No display names, no lists, no SMTPUTF8 local parts (not every relay supports
    them), no line breaks or control characters.
    """
    if any(ch in value for ch in "\r\n") or not value.isprintable():
        raise ValueError("contains line breaks or control characters")
    try:
        result = validate_email(value.strip(), check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ValueError(f"is not a valid single address: {exc}") from None
    return result.ascii_email or result.normalized


def _locale(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadMessage("field 'locale' must be a string")
    tag = value.strip().replace("_", "-").lower()
    # Unknown locales fall back to the default rather than lose the email.
    return _LOCALE_ALIASES.get(tag) or _LOCALE_ALIASES.get(tag.split("-")[0])


def _timestamp(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadMessage("field 'timestamp' must be an ISO 8601 string")
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadMessage(f"field 'timestamp' is not ISO 8601: {value[:40]!r}") from None


def _location(data: Mapping[str, Any]) -> tuple[str | None, str | None]:
    zip_ref = data.get("zip")
    if zip_ref is not None and not isinstance(zip_ref, Mapping):
        raise BadMessage("field 'zip' must be an object with 'bucket' and 'key'")
    nested = zip_ref or {}
    bucket = _first(data, "bucket", "s3_bucket") or _first(nested, "bucket")
    key = _first(data, "key", "s3_key") or _first(nested, "key")
    if bucket is not None and (not isinstance(bucket, str) or not _BUCKET_RE.match(bucket)):
        raise BadMessage("field 'bucket' is not a valid bucket name")
    if key is not None:
        if not isinstance(key, str):
            raise BadMessage("field 'key' must be a string")
        if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            raise BadMessage(f"field 'key' is longer than {MAX_KEY_BYTES} bytes")
        if not key.isprintable():
            raise BadMessage("field 'key' contains control characters")
    return bucket, key
