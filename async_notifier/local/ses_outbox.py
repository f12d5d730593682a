"""What a local SES endpoint was sent: moto's model data, or LocalStack's SES messages.

`make run-local TRANSPORT=ses` sends through the SES v2 API of moto (or LocalStack); neither
delivers anything, but both keep what they were sent. This reads it back, so the demo can
file each message under the outbox exactly as the mail catcher files what SMTP delivers.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

TIMEOUT = 10.0


@dataclass(frozen=True)
class SentMessage:
    source: str
    destinations: tuple[str, ...]
    raw: bytes
    message_id: str = ""  # SES's MessageId for it


def sent_messages(endpoint_url: str) -> list[SentMessage]:
    """Every raw message the endpoint's SES kept, oldest first (moto, else LocalStack)."""
    base = endpoint_url.rstrip("/")
    moto = _get_json(f"{base}/moto-api/data.json")
    if moto is not None:
        return [
            SentMessage(
                str(m.get("source", "")),
                tuple(dict.fromkeys(m.get("destinations") or [])),  # moto lists them twice
                _raw(m.get("raw_data")),
                str(m.get("id", "")),
            )
            for m in (moto.get("ses") or {}).get("RawMessage") or []
        ]
    localstack = _get_json(f"{base}/_aws/ses")
    if localstack is not None:
        return [
            SentMessage(
                str(m.get("Source", "")),
                tuple((m.get("Destination") or {}).get("ToAddresses") or []),
                _raw(m.get("RawData")),
                str(m.get("Id", "")),
            )
            for m in localstack.get("messages") or []
            if m.get("RawData")
        ]
    raise RuntimeError(f"{base} shows no SES messages (neither moto nor LocalStack)")


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:  # noqa: S310 - local
            return json.loads(response.read())
    except (urllib.error.URLError, ValueError):
        return None


def _raw(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    # moto keeps the message as text: our messages are ASCII (base64 and quoted-printable
    # parts), and UTF-8 round-trips anything else.
    return str(value or "").encode("utf-8", "surrogateescape")
