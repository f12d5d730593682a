"""What the benchmark feeds the targets: real ZIP objects in S3 and a real SQS event.

`bench/` stands alone (it imports nothing of the project): the tests use its `make_zip`, and
`sqs_record` follows `tests/support/servers.py`.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

REGION = "us-east-1"
QUEUE_ARN = f"arn:aws:sqs:{REGION}:123456789012:video-notifications"
BUCKET = "bench-videos"

_FRAME_BYTES = 64 * 1024
_ZIP_EOCD = 22
_ZIP_DATE = (2024, 1, 1, 0, 0, 0)
_NAMES = ("Maria", "João", "Ana Luísa", "Pedro", "Chen", "Zoë")


def make_zip(size: int, seed: int) -> bytes:
    """A real ZIP_STORED archive of fake JPEG frames, exactly `size` bytes when size allows.

    Random bytes do not compress, so what crosses the wire is what was asked for; the same
    seed always yields the same archive, and every seed a different one.
    """
    rng = random.Random(seed)
    count = max(1, -(-size // _FRAME_BYTES))
    names = [f"frame_{i:04d}.jpg" for i in range(1, count + 1)]
    # Per stored entry: a 30-byte local header and a 46-byte central record, each plus the name.
    overhead = _ZIP_EOCD + sum(76 + 2 * len(name.encode()) for name in names)
    payload = max(count, size - overhead)
    share, extra = divmod(payload, count)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, name in enumerate(names):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            archive.writestr(info, rng.randbytes(share + (1 if index < extra else 0)))
    return buffer.getvalue()


@dataclass(frozen=True)
class Item:
    """One record of the batch and the object it points to."""

    index: int
    video_id: str
    key: str


def items(prefix: str, count: int) -> list[Item]:
    rng = random.Random(f"{prefix}/{count}")
    result = []
    for index in range(count):
        video_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        result.append(Item(index, video_id, f"{prefix}/{video_id}/{video_id}.zip"))
    return result


def sqs_record(body: dict[str, Any], message_id: str) -> dict[str, Any]:
    """One record shaped exactly like those Lambda's SQS event source delivers."""
    text = json.dumps(body, ensure_ascii=False)
    now_ms = int(time.time() * 1000)
    return {
        "messageId": message_id,
        "receiptHandle": f"AQEB{uuid.uuid4().hex}{uuid.uuid4().hex}{uuid.uuid4().hex}",
        "body": text,
        "attributes": {
            "ApproximateReceiveCount": "1",
            "AWSTraceHeader": f"Root=1-{now_ms // 1000:08x}-{uuid.uuid4().hex[:24]}",
            "SentTimestamp": str(now_ms - 120),
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": str(now_ms - 100),
        },
        "messageAttributes": {},
        "md5OfBody": hashlib.md5(text.encode(), usedforsecurity=False).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": QUEUE_ARN,
        "awsRegion": REGION,
    }


def build_event(batch: list[Item], bucket: str = BUCKET) -> dict[str, Any]:
    """The Lambda event for the batch: one COMPLETED notification per item."""
    records = []
    for item in batch:
        name = _NAMES[item.index % len(_NAMES)]
        body = {
            "video_id": item.video_id,
            "status": "COMPLETED",
            "bucket": bucket,
            "key": item.key,
            "email": f"user{item.index:05d}@example.com",
            "name": name,
            "file_name": f"video {item.index:05d}.mp4",
            "message": "",
            "locale": "pt-BR" if item.index % 2 == 0 else "en",
            "timestamp": "2025-06-19T19:46:37+00:00",
        }
        records.append(sqs_record(body, str(uuid.uuid4())))
    return {"Records": records}


def seed(s3: Any, batch: list[Item], size: int, bucket: str = BUCKET, threads: int = 8) -> int:
    """Upload one distinct ZIP of `size` bytes per item; return the bytes uploaded.

    Archives are made and uploaded a few at a time, so the benchmark process never holds
    the whole data set (its memory would otherwise be inherited by what it measures).
    """
    s3.create_bucket(Bucket=bucket)

    def upload(item: Item) -> int:
        body = make_zip(size, seed=item.index * 1_000_003 + size)
        s3.put_object(Bucket=bucket, Key=item.key, Body=body)
        return len(body)

    # Each thread holds one archive at a time: keep that under about 64 MiB.
    workers = max(1, min(threads, (64 * 1024 * 1024) // max(size, 1)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(upload, batch))
