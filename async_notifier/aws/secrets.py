"""Secrets from AWS Secrets Manager, cached with a TTL and refreshed on demand: the SMTP
credentials (`SecretSource`) and the access key pair that signs download links
(`KeyPairSource`).

A password should not sit in the function's environment (readable by anyone who may
view the configuration) and must follow a rotation without a redeploy. So it is read from
Secrets Manager when first needed, kept for `ttl` seconds, and dropped early when the SMTP
server refuses it (`invalidate`), which is how a rotation shows up in practice.

The secret's value never reaches a log line or an error text: errors name the secret and
what is wrong with it, never its content, and are raised without a chained cause (a
parser's exception may hold the document it failed on).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..errors import SecretUnavailable, SecretWithoutUsername
from ..logs import get_logger
from ..ports import SmtpCredentials
from .errors import aws_error

log = get_logger()

ClientFactory = Callable[[], AbstractAsyncContextManager[Any]]
# After a failed refresh, stale (not invalidated) credentials are served this long at most
# before the next attempt, so an outage does not turn every SMTP connect into an AWS call.
STALE_RETRY_SECONDS = 30.0
_INVALID = object()
T = TypeVar("T")


class CachedSecret(Generic[T]):
    """Reads one secret, caches it for `ttl` seconds, and shares a fetch between callers.

    Subclasses say how to read the text (`_parse`) and what to call it in logs (`label`).

    `client_factory` returns an async context manager yielding a Secrets Manager client,
    e.g. ``lambda: aws_client("secretsmanager", settings)``. A client is opened per fetch
    (once per TTL) rather than held: nothing is kept open for a call made every few
    minutes, and the source is not tied to the event loop that made a client, so its cache
    survives the Notifier rebuilding its clients. To reuse a client you already hold, pass
    ``lambda: contextlib.nullcontext(client)``.
    """

    label = "secret"

    def __init__(
        self,
        client_factory: ClientFactory,
        secret_id: str,
        *,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not secret_id:
            raise ValueError("secret_id is empty")
        if ttl < 0:
            raise ValueError("ttl must not be negative")
        self._client_factory = client_factory
        self._secret_id = secret_id
        self._ttl = ttl
        self._clock = clock
        self._cached: T | None = None
        self._expires_at = 0.0
        # Completed fetches, and the last one's outcome (credentials, or the error's reason):
        # callers that queued behind a fetch take its result instead of repeating it (one
        # failing call, not one per caller). Only the reason is kept, not the exception,
        # whose traceback would keep the parser's frames (and the secret text) alive.
        self._generation = 0
        self._last: T | str | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self.fetches = 0  # GetSecretValue calls made, successful or not

    @property
    def secret_id(self) -> str:
        return self._secret_id

    async def get(self) -> T:
        """The value, from the cache while fresh, else from Secrets Manager."""
        if self._cached is not None and self._clock() < self._expires_at:
            return self._cached
        seen = self._generation
        async with self._loop_lock():
            if self._generation != seen:  # a fetch finished while we queued: share it
                last = self._last
                if isinstance(last, str):
                    raise SecretUnavailable(last)
                if last is not None and last is self._cached:  # (not invalidated since)
                    return last
            if self._cached is not None and self._clock() < self._expires_at:
                return self._cached
            return await self._refresh()

    def invalidate(self, failed: T | None = None) -> bool:
        """Drop the cached value so the next `get` reads the secret again.

        Pass the credentials the server refused: when several connections fail with the
        same credentials at once, only the first call drops them, and the others find the
        already refreshed ones (no stampede of fetches). Returns whether anything was dropped.
        """
        if self._cached is None or (failed is not None and failed is not self._cached):
            return False
        self._cached = None
        self._expires_at = 0.0
        log.info(f"{self.label} invalidated", extra={"secret_id": self._secret_id})
        return True

    def _loop_lock(self) -> asyncio.Lock:
        """A lock of the running loop (an asyncio.Lock must not cross loops)."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def _refresh(self) -> T:
        stale = self._cached
        try:
            credentials = await self._fetch()
        except SecretUnavailable as exc:
            self._generation += 1
            if stale is None:
                self._last = exc.reason
                log.warning(
                    f"{self.label} unavailable",
                    extra={"secret_id": self._secret_id, "reason": exc.reason},
                )
                raise
            # Expired but never refused by the server: it most likely still works.
            self._last = stale
            self._expires_at = self._clock() + min(self._ttl, STALE_RETRY_SECONDS)
            log.warning(
                f"{self.label} refresh failed; using the cached credentials",
                extra={"secret_id": self._secret_id, "reason": exc.reason},
            )
            return stale
        self._generation += 1
        self._last = self._cached = credentials
        self._expires_at = self._clock() + self._ttl
        return credentials

    async def _fetch(self) -> T:
        self.fetches += 1
        where = f"secret {self._secret_id!r}"
        failure: str | None = None
        try:
            async with self._client_factory() as client:
                response = await client.get_secret_value(SecretId=self._secret_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = aws_error(exc).describe()
        if failure is not None:  # raised outside the handler: no __context__ to leak through
            raise SecretUnavailable(f"cannot read {where}: {failure}")
        text = response.get("SecretString") if isinstance(response, dict) else None
        if not isinstance(text, str):
            raise SecretUnavailable(f"{where} has no SecretString (binary secrets are not used)")
        value = self._parse(text, where)
        log.info(
            f"{self.label} loaded",
            extra={"secret_id": self._secret_id, "version_id": response.get("VersionId")},
        )
        return value

    def _parse(self, text: str, where: str) -> T:
        raise NotImplementedError


class SecretSource(CachedSecret[SmtpCredentials]):
    """The SMTP login: a plain password, or JSON with a password and a username."""

    label = "smtp secret"

    def __init__(
        self,
        client_factory: ClientFactory,
        secret_id: str,
        *,
        ttl: float,
        default_username: str | None = None,
        username_required: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(client_factory, secret_id, ttl=ttl, clock=clock)
        self._default_username = default_username
        self._username_required = username_required

    def _parse(self, text: str, where: str) -> SmtpCredentials:
        return parse_secret(
            text,
            where,
            default_username=self._default_username,
            username_required=self._username_required,
        )


@dataclass(frozen=True)
class KeyPair:
    """An IAM user's access key: links it signs last as long as asked (up to 7 days)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)


class KeyPairSource(CachedSecret[KeyPair]):
    """The key pair that signs download links (LINK_SIGNING_SECRET_ID): JSON with
    `access_key_id` and `secret_access_key` (AWS's own `AccessKeyId`/`SecretAccessKey`
    are accepted too)."""

    label = "link signing secret"

    def _parse(self, text: str, where: str) -> KeyPair:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            data = _INVALID
        if not isinstance(data, dict):
            raise SecretUnavailable(
                f"{where} must be JSON with 'access_key_id' and 'secret_access_key'"
            )
        key_id = data.get("access_key_id") or data.get("AccessKeyId")
        secret = data.get("secret_access_key") or data.get("SecretAccessKey")
        if not isinstance(key_id, str) or not key_id or not isinstance(secret, str) or not secret:
            raise SecretUnavailable(
                f"{where} must be JSON with 'access_key_id' and 'secret_access_key'"
            )
        return KeyPair(key_id, secret)


def parse_secret(
    text: str,
    where: str = "the SMTP secret",
    *,
    default_username: str | None = None,
    username_required: bool = False,
) -> SmtpCredentials:
    """A plain string is the password; text starting with '{' must be JSON with a password.

    The username is the secret's own, else `default_username` (SMTP_USER); with
    `username_required`, having neither is an error rather than a session that silently
    skips AUTH. The '{' rule (rather than "JSON if it parses") makes a mistyped JSON secret
    an error instead of a password that is the whole document; a plain password must
    therefore not start with '{' (store it as JSON instead).
    """
    if not text.lstrip().startswith("{"):
        if not text:
            raise SecretUnavailable(f"{where} is empty")
        return _with_username(None, text, where, default_username, username_required)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = _INVALID
    if data is _INVALID:
        # Raised outside the handler, so no __context__ holds the JSONDecodeError (whose
        # `doc` is the secret); and not even the parser's message is quoted.
        raise SecretUnavailable(
            f"{where} starts with '{{' but is not valid JSON; expected "
            '{"username": "...", "password": "..."} or a plain password'
        )
    if not isinstance(data, dict):
        raise SecretUnavailable(f"{where} is JSON but not an object")
    password = data.get("password")
    if not isinstance(password, str) or not password:
        raise SecretUnavailable(f"{where} has no non-empty string 'password'")
    username = data.get("username")
    if username is not None and not isinstance(username, str):
        raise SecretUnavailable(f"{where} has a 'username' that is not a string")
    return _with_username(username, password, where, default_username, username_required)


def _with_username(
    username: str | None,
    password: str,
    where: str,
    default_username: str | None,
    required: bool,
) -> SmtpCredentials:
    username = username or default_username or None
    if username is None and required:
        raise SecretWithoutUsername(f"{where} has no username and no default (SMTP_USER) is set")
    return SmtpCredentials(username=username, password=password)
