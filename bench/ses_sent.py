"""What moto's SES was sent: the SES rows' "sink", read from moto's `/moto-api/data.json`.

moto delivers nothing but keeps every raw message SendEmail was given (`ses` ->
`RawMessage`, the v2 API's included). The counts are the sink's: messages, bytes, the
smallest and largest, and the `X-Video-Id` of each, taken from its header block. `bench/`
imports nothing of the project, so this reads the JSON itself (as
`async_notifier.local.ses_outbox` does for the demo).

data.json dumps every model moto holds, S3's objects' attributes too, and grows with every
message kept: the harness resets moto before each SES run after the first of a scenario.
"""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

import boto3

from .sinks import SinkStats

_VIDEO_ID = re.compile(r"^x-video-id:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
# A header block larger than this is not ours (the sink looks no further either).
_HEADER_LIMIT = 256 * 1024


def verify_sender(endpoint_url: str, region: str, address: str) -> None:
    """Make `address` a verified identity in moto's SES, as SES requires of a sender."""
    ses = boto3.client(
        "ses",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106 - moto's dummy credentials
    )
    ses.verify_email_identity(EmailAddress=address)


def raw_messages(endpoint_url: str, timeout: float = 300.0) -> list[str]:
    """Every raw message moto's SES kept, oldest first."""
    url = f"{endpoint_url.rstrip('/')}/moto-api/data.json"
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
        data: dict[str, Any] = json.loads(response.read())
    kept = (data.get("ses") or {}).get("RawMessage") or []
    return [str(message.get("raw_data") or "") for message in kept]


def stats(messages: list[str]) -> SinkStats:
    """The sink's counters over `messages` (no connections: the API has none to count)."""
    video_ids = []
    for raw in messages:
        header_end = raw.find("\r\n\r\n", 0, _HEADER_LIMIT)
        match = _VIDEO_ID.search(raw, 0, max(header_end, 0))
        if match:
            video_ids.append(match.group(1).strip())
    # moto keeps the message as text; ours is ASCII (base64 and quoted-printable parts).
    sizes = [
        len(raw) if raw.isascii() else len(raw.encode("utf-8", "surrogateescape"))
        for raw in messages
    ]
    return SinkStats(
        messages=len(messages),
        connections=0,
        data_bytes=sum(sizes),
        max_open=0,
        min_size=min(sizes, default=None),
        max_size=max(sizes, default=None),
        video_ids=video_ids,
    )
