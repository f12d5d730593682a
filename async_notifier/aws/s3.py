"""Stream S3 objects into the private scratch directory, chunk by chunk.

Nothing is read whole into memory, the file name on disk is ours (never the
object key), and every failure says whether another attempt could help.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BucketNotAllowed, DownloadFailed, ObjectUnavailable, TooLarge
from ..logs import get_logger
from .errors import aws_error, is_aws_failure

log = get_logger()

_MISSING_CODES = frozenset(
    {"NoSuchKey", "NoSuchBucket", "404", "NotFound", "AccessDenied", "403", "Forbidden"}
)


@dataclass
class S3Object:
    """An open GET: its size (-1 when the response has no Content-Length) is known before
    any byte is written to disk."""

    bucket: str
    key: str
    size: int
    body: Any

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def close(self) -> None:
        self.body.close()


class ObjectStore:
    """Downloads through one shared aiobotocore S3 client."""

    def __init__(
        self, client: Any, *, chunk_size: int, allowed_buckets: frozenset[str] = frozenset()
    ) -> None:
        self._client = client
        _cache_endpoints(client)
        self._chunk_size = chunk_size
        self._allowed = allowed_buckets

    def check_allowed(self, bucket: str) -> None:
        """Refuse buckets outside ALLOWED_BUCKETS: the role may read more than it should mail."""
        if self._allowed and bucket not in self._allowed:
            raise BucketNotAllowed(f"bucket {bucket!r} is not in ALLOWED_BUCKETS")

    async def download(self, bucket: str, key: str, dest: Path) -> int:
        """Write the object to `dest`; return its size. `dest` is removed on failure."""
        return await self.save(await self.open(bucket, key), dest)

    async def open(self, bucket: str, key: str) -> S3Object:
        self.check_allowed(bucket)
        with _s3_errors(f"s3://{bucket}/{key}"):
            response = await self._client.get_object(Bucket=bucket, Key=key)
        return S3Object(bucket, key, int(response.get("ContentLength", -1)), response["Body"])

    async def save(self, obj: S3Object, dest: Path, limit: int | None = None) -> int:
        """Stream an open object to `dest` and check it arrived whole; close the body.

        With `limit`, raise `TooLarge` as soon as more than `limit` bytes arrived (for an
        object whose size was not announced). `dest` is removed on any failure.
        """
        try:
            written = 0
            with _s3_errors(obj.url):
                async with obj.body:  # releases the HTTP connection even on error
                    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as out:
                        # A page-cache write of one chunk costs less than a thread hop.
                        async for chunk in obj.body.iter_chunks(self._chunk_size):
                            written += len(chunk)
                            if limit is not None and written > limit:
                                raise TooLarge(obj.url, limit, written)
                            out.write(chunk)
            if obj.size >= 0 and written != obj.size:
                raise DownloadFailed(f"{obj.url}: stream ended after {written} of {obj.size} bytes")
            return written
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    async def presign(self, bucket: str, key: str, expires: int) -> str:
        """A GET link; note it dies with the temporary credentials that signed it."""
        with _s3_errors(f"s3://{bucket}/{key}"):
            url: str = await self._client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
            )
        return url


class _UnusedParamsDropped:
    """An endpoint provider that drops the parameters no rule of its ruleset reads.

    botocore caches endpoint resolution by its input, but S3's input includes the
    object `Key` (declared by the ruleset, read by none of its rules), so every record
    missed the cache and paid the full rule evaluation (~0.14 ms). Without the unread
    parameters the input repeats, the cache hits, and the result is the same.
    """

    def __init__(self, provider: Any, unused: frozenset[str]) -> None:
        self._provider = provider
        self._unused = unused

    def resolve_endpoint(self, **params: Any) -> Any:
        for name in self._unused:
            params.pop(name, None)
        return self._provider.resolve_endpoint(**params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._provider, name)


def _cache_endpoints(client: Any) -> None:
    """Wrap the client's endpoint provider in `_UnusedParamsDropped`; skip if anything differs.

    Uses botocore internals (checked against botocore 1.40 / aiobotocore 2.25); when
    they move, this does nothing and requests resolve their endpoint uncached.
    """
    try:
        resolver = client._ruleset_resolver
        provider = resolver._provider
        if isinstance(provider, _UnusedParamsDropped):
            return
        model = client.meta.service_model
        ruleset = client._loader.load_service_model(
            model.service_name, "endpoint-rule-set-1", model.api_version
        )
        rules = json.dumps(ruleset["rules"])
        used = set(re.findall(r'"ref": "([^"]+)"', rules))
        used |= set(re.findall(r"\{([A-Za-z0-9_]+)[}#]", rules))  # "{Bucket}" in templates
        unused = frozenset(
            name
            for name, spec in ruleset["parameters"].items()
            if name not in used and not spec.get("required") and "default" not in spec
        )
    except Exception:  # an optimisation only: never fail the client over it
        return
    if unused:
        resolver._provider = _UnusedParamsDropped(provider, unused)


@contextlib.contextmanager
def _s3_errors(where: str) -> Iterator[None]:
    """Translate botocore/aiohttp failures into permanent or transient record errors."""
    try:
        yield
    except Exception as exc:
        if not is_aws_failure(exc):
            raise
        error = aws_error(exc)
        if error.code in _MISSING_CODES or error.status in (403, 404):
            raise ObjectUnavailable(f"{where}: {error.code or error.status}") from None
        if error.code or error.status:
            raise DownloadFailed(f"{where}: {error.code or error.status}") from None
        raise DownloadFailed(f"{where}: {error.type_name}: {exc}") from None
