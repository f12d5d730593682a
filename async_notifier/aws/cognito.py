"""Recipients looked up in a Cognito user pool, for records that carry a user id, not an email.

`AdminGetUser` accepts the user's username, an alias attribute (email, phone) where the
pool has aliases, or, for a local user, the `sub`; the upstream's `cognito_user_id` is
passed as is. Lookups are cached per process (with a TTL, so a changed email address is
picked up) and concurrent lookups of one user share a single call: a batch of 10,000
records for a few users costs a few calls. The address found is validated like one in a
message body; a user without a usable address is a permanent failure, an unreachable or
throttling Cognito a transient one.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from ..config import USER_POOL_ID_RE
from ..errors import LookupFailed, NotifierError, RecipientUnknown, RecipientUnverified
from ..logs import get_logger
from ..messages import MAX_TEXT, validate_address
from ..ports import Recipient
from .errors import aws_error, is_aws_failure

log = get_logger()

MAX_USER_ID = 128  # AdminGetUser's Username length limit
_PERMANENT_CODES = frozenset({"UserNotFoundException", "InvalidParameterException"})


class CognitoRecipients:
    """Looks users up with `AdminGetUser` through an aioboto3 cognito-idp client.

    The client (and so this object, whose in-flight lookups are tasks) belongs to the event
    loop that made it, like the worker's other long-lived clients.
    """

    def __init__(
        self,
        client: Any,
        user_pool_id: str,
        *,
        ttl: float | None = 900.0,
        max_entries: int = 10_000,
        require_verified_email: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not USER_POOL_ID_RE.match(user_pool_id):
            raise ValueError(f"invalid Cognito user pool id {user_pool_id!r}")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._client = client
        self._pool_id = user_pool_id
        self._ttl = ttl
        self._max_entries = max_entries
        self._require_verified = require_verified_email
        self._clock = clock
        self._cache: OrderedDict[str, tuple[Recipient, float]] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[Recipient]] = {}
        self.calls = 0  # AdminGetUser calls made

    async def lookup(self, user_id: str) -> Recipient:
        """The user's email and name; RecipientUnknown or LookupFailed otherwise."""
        _check_user_id(user_id)
        cached = self._cache.get(user_id)
        if cached is not None:
            recipient, expires_at = cached
            if self._clock() < expires_at:
                self._cache.move_to_end(user_id)
                return recipient
            del self._cache[user_id]
        task = self._inflight.get(user_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(user_id))
            self._inflight[user_id] = task
            task.add_done_callback(lambda done: self._forget(user_id, done))
        try:
            # Shielded: one caller cancelled (its record hit the deadline) must not cancel
            # the lookup the other records of the same user are waiting for.
            return await asyncio.shield(task)
        except NotifierError as exc:
            # A fresh exception per caller: one instance raised in many tasks would collect
            # all their tracebacks.
            raise type(exc)(exc.reason) from None

    def _forget(self, user_id: str, task: asyncio.Task[Recipient]) -> None:
        if self._inflight.get(user_id) is task:
            del self._inflight[user_id]
        if not task.cancelled():
            task.exception()  # retrieved, even when every caller was cancelled

    async def _fetch(self, user_id: str) -> Recipient:
        self.calls += 1
        try:
            response = await self._client.admin_get_user(UserPoolId=self._pool_id, Username=user_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not is_aws_failure(exc):
                raise  # a bug, not Cognito: the batch reports it as an internal error
            raise _classify(exc, user_id) from None
        recipient = self._recipient(user_id, response)
        self._remember(user_id, recipient)
        return recipient

    def _recipient(self, user_id: str, response: Mapping[str, Any]) -> Recipient:
        attributes = _attributes(response.get("UserAttributes"))
        email = attributes.get("email")
        if not email:
            raise RecipientUnknown(f"Cognito user {user_id!r} has no email address")
        if self._require_verified and attributes.get("email_verified", "").lower() != "true":
            raise RecipientUnverified(
                f"Cognito user {user_id!r} has not verified the email (ALLOW_UNVERIFIED_EMAIL)"
            )
        address = _valid_address(email)
        if address is None:
            raise RecipientUnknown(
                f"Cognito user {user_id!r} has an email that is not one valid address"
            )
        name = _display_name(attributes.get("name")) or _display_name(attributes.get("given_name"))
        return Recipient(email=address, name=name)

    def _remember(self, user_id: str, recipient: Recipient) -> None:
        expires_at = float("inf") if self._ttl is None else self._clock() + self._ttl
        self._cache[user_id] = (recipient, expires_at)
        self._cache.move_to_end(user_id)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)


def _check_user_id(user_id: object) -> None:
    """Cognito's Username: 1-128 characters, no whitespace or control characters."""
    if (
        not isinstance(user_id, str)
        or not user_id
        or len(user_id) > MAX_USER_ID
        or any(ch.isspace() or not ch.isprintable() for ch in user_id)
    ):
        shown = user_id[:40] if isinstance(user_id, str) else type(user_id).__name__
        raise RecipientUnknown(f"{shown!r} is not a valid Cognito user id")


def _attributes(raw: Any) -> dict[str, str]:
    if not isinstance(raw, list):
        return {}
    pairs = (a for a in raw if isinstance(a, dict))
    return {
        a["Name"]: a["Value"]
        for a in pairs
        if isinstance(a.get("Name"), str) and isinstance(a.get("Value"), str)
    }


def _valid_address(value: str) -> str | None:
    """The same rules as a message's `email`."""
    try:
        return validate_address(value)
    except ValueError:
        return None


def _display_name(value: str | None) -> str | None:
    """A name goes into the To header: one printable line, else no name (not a failure)."""
    if value is None or any(ch in value for ch in "\r\n") or not value.isprintable():
        return None
    value = value.strip()
    return value[:MAX_TEXT] or None


def _classify(exc: Exception, user_id: str) -> NotifierError:
    error = aws_error(exc)
    if error.code == "UserNotFoundException":
        return RecipientUnknown(f"no Cognito user {user_id!r}")
    if error.code in _PERMANENT_CODES:
        return RecipientUnknown(f"Cognito refused user id {user_id!r}: {error.code}")
    if error.code:
        log.warning(
            "cognito lookup failed", extra={"code": error.code, "reason": error.message[:200]}
        )
        return LookupFailed(f"Cognito AdminGetUser failed: {error.describe(200)}")
    return LookupFailed(f"Cognito AdminGetUser failed: {type(exc).__name__}: {exc}"[:300])
