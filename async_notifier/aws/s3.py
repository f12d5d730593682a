"""Stream S3 objects into the private scratch directory, chunk by chunk.

Nothing is read whole into memory, the file name on disk is ours (never the
object key), and every failure says whether another attempt could help.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..errors import DownloadFailed, ObjectUnavailable, TooLarge
from ..logs import get_logger
from ..ports import PresignedLink
from .errors import aws_error, is_aws_failure
from .secrets import KeyPair, KeyPairSource

log = get_logger()

# SigV4: a presigned URL is valid for at most 7 days.
MAX_LINK_LIFETIME = 7 * 24 * 3600
# Temporary credentials that do not say when they expire are counted for this long.
UNKNOWN_SESSION_LIFETIME = 3600
# Credentials about to expire are refreshed by botocore; a link keeps this much clear of it.
EXPIRY_MARGIN = 60
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
    """Downloads through one shared aiobotocore S3 client; links signed by it too, or by
    `signer` (a client holding an access key pair, for links that last days)."""

    def __init__(self, client: Any, *, chunk_size: int, signer: LinkSigner | None = None) -> None:
        self._client = client
        _cache_endpoints(client)
        self._chunk_size = chunk_size
        self._signer = signer

    async def download(self, bucket: str, key: str, dest: Path) -> int:
        """Write the object to `dest`; return its size. `dest` is removed on failure."""
        return await self.save(await self.open(bucket, key), dest)

    async def open(self, bucket: str, key: str) -> S3Object:
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

    async def presign(self, bucket: str, key: str, expires: int) -> PresignedLink:
        """A GET link for at most `expires` seconds, and when it really stops working.

        A link is only as good as the credentials that signed it: with the function role's
        temporary credentials it dies when they expire, whatever `ExpiresIn` says. So the
        lifetime is the smaller of `expires` and what the signing credentials have left.
        """
        client = await self._signer.client() if self._signer is not None else self._client
        lifetime = min(expires, await signing_lifetime(client))
        with _s3_errors(f"s3://{bucket}/{key}"):
            url: str = await client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=lifetime
            )
        return PresignedLink(url, datetime.now(UTC) + timedelta(seconds=lifetime))


async def signing_lifetime(client: Any) -> int:
    """Seconds the client's credentials stay good for signing (a week for long-term keys).

    botocore keeps the expiry of temporary credentials that say when they expire (assumed
    roles, container and instance credentials) on the credentials object; credentials that
    carry a session token but no expiry (Lambda's environment) are counted for an hour, the
    shortest session an assumed role gets, so a link never promises more than it can hold.
    """
    credentials = getattr(getattr(client, "_request_signer", None), "_credentials", None)
    if credentials is None:
        return UNKNOWN_SESSION_LIFETIME
    frozen = await credentials.get_frozen_credentials()  # refreshes them when due
    expiry = getattr(credentials, "_expiry_time", None)
    if isinstance(expiry, datetime):
        left = (expiry - datetime.now(UTC)).total_seconds() - EXPIRY_MARGIN
        return max(1, int(left))
    if getattr(frozen, "token", None):
        return UNKNOWN_SESSION_LIFETIME
    return MAX_LINK_LIFETIME


class LinkSigner:
    """An S3 client with the access key pair read from LINK_SIGNING_SECRET_ID, made anew
    when the secret changes; closed with `aclose`."""

    def __init__(self, keys: KeyPairSource, make_client: Callable[[KeyPair], Any]) -> None:
        self._keys = keys
        self._make_client = make_client
        self._current: tuple[KeyPair, Any, contextlib.AsyncExitStack] | None = None

    async def client(self) -> Any:
        keys = await self._keys.get()
        if self._current is not None and self._current[0] == keys:
            return self._current[1]
        await self.aclose()
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(self._make_client(keys))
        self._current = (keys, client, stack)
        return client

    async def aclose(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            await current[2].aclose()


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


# Worth 7% of records/s in `make bench`'s `small` scenario (A/B, medians of 10 runs, 2026-12).
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
