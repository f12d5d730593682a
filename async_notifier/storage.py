"""Stream S3 objects into a private scratch directory, chunk by chunk.

Nothing is read whole into memory, the file name on disk is ours (never the
object key), and every failure says whether another attempt could help.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from .errors import BucketNotAllowed, DownloadFailed, ObjectUnavailable

_MISSING_CODES = frozenset(
    {"NoSuchKey", "NoSuchBucket", "404", "NotFound", "AccessDenied", "403", "Forbidden"}
)


class ScratchDir:
    """A private (0700) directory for one invocation's downloads.

    Files get names we choose, so a key like ``../../x.zip`` cannot escape it;
    `close` removes whatever a cancelled or crashed record left behind.
    """

    def __init__(self, parent: Path) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="async-notifier-", dir=parent))

    def new_file(self, suffix: str = ".zip") -> Path:
        return self.path / f"{uuid.uuid4().hex}{suffix}"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> ScratchDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ObjectStore:
    """Downloads through one shared aiobotocore S3 client."""

    def __init__(
        self, client: Any, *, chunk_size: int, allowed_buckets: frozenset[str] = frozenset()
    ) -> None:
        self._client = client
        self._chunk_size = chunk_size
        self._allowed = allowed_buckets

    def check_allowed(self, bucket: str) -> None:
        """Refuse buckets outside ALLOWED_BUCKETS: the role may read more than it should mail."""
        if self._allowed and bucket not in self._allowed:
            raise BucketNotAllowed(f"bucket {bucket!r} is not in ALLOWED_BUCKETS")

    async def download(self, bucket: str, key: str, dest: Path) -> int:
        """Write the object to `dest`; return its size. `dest` is removed on failure."""
        self.check_allowed(bucket)
        try:
            return await self._download(bucket, key, dest)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    async def _download(self, bucket: str, key: str, dest: Path) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = await self._client.get_object(Bucket=bucket, Key=key)
            expected = int(response.get("ContentLength", -1))
            written = 0
            body = response["Body"]
            async with body:  # releases the HTTP connection even on error
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    # A page-cache write of one chunk costs less than a thread hop.
                    async for chunk in body.iter_chunks(self._chunk_size):
                        out.write(chunk)
                        written += len(chunk)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _MISSING_CODES or status in (403, 404):
                raise ObjectUnavailable(f"s3://{bucket}/{key}: {code or status}") from None
            raise DownloadFailed(f"s3://{bucket}/{key}: {code or status}") from None
        except (TimeoutError, BotoCoreError, OSError) as exc:
            raise DownloadFailed(f"s3://{bucket}/{key}: {type(exc).__name__}: {exc}") from None
        except Exception as exc:  # aiohttp payload errors and the like
            if type(exc).__module__.startswith(("aiohttp", "aiobotocore", "botocore")):
                raise DownloadFailed(f"s3://{bucket}/{key}: {type(exc).__name__}: {exc}") from None
            raise
        if expected >= 0 and written != expected:
            raise DownloadFailed(
                f"s3://{bucket}/{key}: stream ended after {written} of {expected} bytes"
            )
        return written
