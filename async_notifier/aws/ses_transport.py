"""The SES v2 API as a mail transport (`ports.MailTransport`), beside SMTP.

`SendEmail` with raw content takes the very bytes the SMTP pool would send (the tags
travel beside them as `EmailTags`, which SES takes over the message's X-SES-MESSAGE-TAGS
header), signs with the function's
role instead of an IAM user's SMTP password, answers with SES's MessageId, and says what
went wrong as a typed error. What this module adds around the call:

- **The account's limits** (`account/limits.py`, shared with SMTP): a provider-wide
  condition refuses the message before anything is read; every send waits its paced turn;
  "slow down" halves the pace; a delivered message clears what held.
- **Memory.** The API takes the whole message in one request: the raw bytes and their
  base64 in the JSON body, about 2.4x the message. `ByteBudget` bounds what is held at
  once (`max_inflight_bytes`, 256 MiB for a 1,024 MB Lambda): sends wait their turn,
  first come first served, and a message larger than the whole budget goes alone. The
  bytes are read in a thread: a 40 MB message must not stop the event loop.
- **Sent or not.** `reached()` is called when botocore hands the signed request to its
  HTTP session (its `before-send` event): from then on SES may have it. Failures are read
  by `ses_error`, one table: an answer from SES means nothing was sent unless it says
  otherwise; no answer after the request went out is `DeliveryUnknown`, and botocore is
  not allowed to send the same email again after such an attempt (its retries cover
  answers and connections that never opened, which are safe to repeat).
- **Time.** The whole call, botocore's attempts included, has S3_TIMEOUT (the AWS
  clients' read time limit, 30 s by default): SES answers a 40 MB request in seconds, and
  SMTP_DATA_TIMEOUT's 10 minutes is SMTP's verdict, not an HTTP request's.

The client is the wiring's (an aiobotocore "sesv2" client from `aws/clients.py`): this
module neither opens nor closes it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ..account.limits import SendLimits
from ..config import Settings
from ..errors import (
    AccountPaused,
    AttachmentChanged,
    AttachmentUnreadable,
    DailyQuotaExceeded,
    DeliveryUnknown,
    NotifierError,
    ProviderCondition,
    ProviderMisconfigured,
    SenderRejected,
    SesRejected,
    SesThrottled,
    SesUnavailable,
)
from ..logs import get_logger
from ..mail.mime import StreamedEmail
from ..ports import PoolStats, Receipt
from .errors import aws_error, is_aws_failure

log = get_logger()

#: SES's limit on a message sent through the v2 API or SMTP: 40 MB, headers and base64
#: attachments included (SES quotas). Read as 40,000,000 bytes, the lower reading of "MB".
SES_MAX_MESSAGE_BYTES = 40_000_000
#: Sized for a 1,024 MB Lambda: about a quarter of its memory for messages in flight.
DEFAULT_MAX_INFLIGHT_BYTES = 256 * 1024 * 1024

_SEND_EVENT = "sesv2.SendEmail"


def request_footprint(size: int) -> int:
    """Bytes a message of `size` bytes holds while it is sent: itself, and four copies of its
    base64 that botocore makes to build the JSON request (the base64 as bytes, as text, the
    JSON body as text, then encoded), about 6.3 times the message. Measured by the benchmark's
    `ses-large` scenario: counting the message and one base64 copy only (2.3x), the process
    grew 2.5 times past the budget."""
    return size + 4 * (4 * -(-size // 3))


class ByteBudget:
    """At most `capacity` bytes held at once, handed out first come first served.

    A request larger than the whole budget waits until nothing else is held, then goes
    alone. Cancel-safe: a waiter cancelled before its turn leaves the queue (and may let
    those behind it go); one cancelled just as its turn came gives the bytes back.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the in-flight byte budget must be at least 1, not {capacity}")
        self.capacity = capacity
        self.held = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.capacity

    async def acquire(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"cannot hold {size} bytes")
        if not self._waiting and self._fits(size):
            self.held += size
            return
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self.release(size)  # granted just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
                self._grant()  # the head may have left: those behind it may fit
            raise

    def release(self, size: int) -> None:
        self.held -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            size, future = self._waiting[0]
            if future.done():  # cancelled while waiting
                self._waiting.popleft()
                continue
            if not self._fits(size):
                return
            self._waiting.popleft()
            self.held += size
            future.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        await self.acquire(size)
        try:
            yield
        finally:
            self.release(size)


@dataclass
class _Attempts:
    """What botocore did with one delivery's request, as its events tell it."""

    reached: Callable[[], None] | None
    went_out: bool = False  # a request was handed to the HTTP session
    in_flight: bool = False  # one is out and nothing has come back yet
    unanswered: str | None = None  # one went out and failed without an answer: how


class _SentUnanswered(Exception):
    """Stops botocore from sending an email again after an attempt that may have arrived."""


_current: contextvars.ContextVar[_Attempts | None] = contextvars.ContextVar(
    "ses_send_attempts", default=None
)

# Failures that prove the request never left: the connection was not made.
_NEVER_CONNECTED = ("EndpointConnectionError", "ConnectTimeoutError")


def _never_connected(exc: BaseException) -> bool:
    return type(exc).__name__ in _NEVER_CONNECTED


def _before_send(**_: Any) -> None:
    attempts = _current.get()
    if attempts is None:  # another caller's request on the same client
        return
    if attempts.unanswered is not None:
        raise _SentUnanswered(attempts.unanswered)
    attempts.in_flight = True
    if not attempts.went_out:
        attempts.went_out = True
        if attempts.reached is not None:
            attempts.reached()


def _after_attempt(
    response: Any = None, caught_exception: BaseException | None = None, **_: Any
) -> None:
    attempts = _current.get()
    if attempts is None or not attempts.in_flight:
        return
    attempts.in_flight = False
    if (
        response is None
        and caught_exception is not None
        and not _never_connected(caught_exception)
        and not isinstance(caught_exception, _SentUnanswered)
    ):
        attempts.unanswered = type(caught_exception).__name__


_THROTTLING = frozenset({"TooManyRequestsException", "Throttling", "ThrottlingException"})
_PAUSED = frozenset({"AccountSuspendedException", "SendingPausedException"})
_REFUSED_CONFIGURATION = frozenset(
    {"NotFoundException", "AccessDeniedException", "AccessDenied", "ConfigurationSetDoesNotExist"}
)
_UNVERIFIED = re.compile(r"not verified|did not have authority to send from", re.IGNORECASE)


def ses_error(exc: BaseException, *, sender: str, maybe_sent: bool) -> NotifierError:
    """The record's error for a failed SendEmail, with what SES said, as one table:

    | SES said (code)                                  | error                          |
    |--------------------------------------------------|--------------------------------|
    | TooManyRequestsException, Throttling(Exception)  | SesThrottled (pace halves)     |
    |   ... whose message is "Daily message quota..."  | DailyQuotaExceeded (held)      |
    | LimitExceededException (the daily quota)         | DailyQuotaExceeded (held)      |
    | AccountSuspendedException, SendingPausedException| AccountPaused (held)           |
    | MailFromDomainNotVerifiedException               | SenderRejected (held)          |
    | MessageRejected: the sender is not verified      | SenderRejected (held)          |
    | MessageRejected (anything else), BadRequest      | SesRejected (permanent)        |
    | NotFoundException (no such configuration set),   | ProviderMisconfigured (held):  |
    |   AccessDenied(Exception) (the role may not send)|   every message would fail     |
    | any other code, 5xx, an answer without a code    | SesUnavailable (transient)     |
    | no answer, the request never went out            | SesUnavailable (transient)     |
    | no answer after it went out (`maybe_sent`)       | DeliveryUnknown                |

    "Not verified" names the sender when SES's message quotes the sender's address or its
    domain; in the sandbox an unverified recipient gets the same wording, and that is the
    recipient's problem (SesRejected), not a reason to hold every message. An unknown code
    is transient: a message is never lost to a refusal nobody has read; MAX_DELIVERY_AGE
    ends the retries of one that keeps failing.
    """
    error = aws_error(exc)
    code = error.code
    if code is None and error.status is not None:  # an answer without an SES error code
        return SesUnavailable(f"SES SendEmail failed: {error.type_name} (HTTP {error.status})")
    if code is None:  # no answer from SES
        # After an unanswered attempt botocore is stopped: say how that attempt ended.
        what = str(exc) if isinstance(exc, _SentUnanswered) else error.type_name
        if maybe_sent:
            return DeliveryUnknown(
                f"SES SendEmail got no answer after the request went out ({what}); "
                "it may have been accepted"
            )
        return SesUnavailable(f"SES could not be reached ({what}); nothing was sent")
    said = f"SES refused SendEmail: {error.describe()}"
    if code in _THROTTLING:
        if "daily message quota" in error.message.lower():
            return DailyQuotaExceeded(said)
        return SesThrottled(said)
    if code == "LimitExceededException":
        return DailyQuotaExceeded(said)
    if code in _PAUSED:
        return AccountPaused(said)
    if code == "MailFromDomainNotVerifiedException":
        return SenderRejected(said)
    if code == "MessageRejected" and _names_sender(error.message, sender):
        return SenderRejected(said)
    if code in ("MessageRejected", "BadRequestException"):
        return SesRejected(said)
    if code in _REFUSED_CONFIGURATION:
        return ProviderMisconfigured(said)
    return SesUnavailable(said)


def _names_sender(message: str, sender: str) -> bool:
    if not _UNVERIFIED.search(message):
        return False
    text = message.lower()
    sender = sender.lower()
    domain = sender.rpartition("@")[2]
    if sender in text:
        return True
    return bool(domain) and re.search(rf"(?<![\w.@-]){re.escape(domain)}\b", text) is not None


class SesTransport:
    """Emails through SES's v2 API (see the module's docstring)."""

    name = "ses"

    def __init__(
        self,
        client: Any,
        settings: Settings,
        *,
        limits: SendLimits,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        timeout: float | None = None,
    ) -> None:
        """`client`: an aiobotocore "sesv2" client, owned by the caller. `timeout`: the
        call's time limit, S3_TIMEOUT unless given."""
        self._client = client
        self._configuration_set = settings.ses_configuration_set
        self._timeout = settings.s3_timeout if timeout is None else timeout
        if not self._timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, not {self._timeout!r}")
        self.limits = limits
        self.budget = ByteBudget(max_inflight_bytes)
        self._stats = PoolStats()
        # Inert for any request but this transport's sends (they read `_current`); their
        # ids keep a second transport on the same client from adding them twice.
        events = client.meta.events
        events.register_first(
            f"before-send.{_SEND_EVENT}", _before_send, unique_id="async-notifier-ses-send"
        )
        events.register_first(
            f"needs-retry.{_SEND_EVENT}", _after_attempt, unique_id="async-notifier-ses-answer"
        )

    async def deliver(
        self, email: StreamedEmail, *, reached: Callable[[], None] | None = None
    ) -> Receipt:
        """`ports.MailTransport.deliver`: `reached()` once the request is handed to HTTP."""
        self._raise_if_held()
        await self.limits.wait_turn()
        self._raise_if_held()
        async with self.budget.hold(request_footprint(email.size)):
            try:
                data = await asyncio.to_thread(email.as_bytes)
            except (AttachmentChanged, OSError) as exc:
                raise AttachmentUnreadable(f"the attachment could not be read: {exc}") from None
            response = await self._send(email, data, reached)
        self.limits.accepted()
        message_id = response.get("MessageId") if isinstance(response, dict) else None
        return Receipt(self.name, message_id if isinstance(message_id, str) else None)

    async def _send(
        self, email: StreamedEmail, data: bytes, reached: Callable[[], None] | None
    ) -> Any:
        request: dict[str, Any] = {
            "FromEmailAddress": email.sender,
            "Destination": {"ToAddresses": [email.recipient]},
            "Content": {"Raw": {"Data": data}},
        }
        if email.tags:
            request["EmailTags"] = [{"Name": name, "Value": value} for name, value in email.tags]
        if self._configuration_set:
            request["ConfigurationSetName"] = self._configuration_set
        attempts = _Attempts(reached)
        token = _current.set(attempts)
        timer = asyncio.timeout(self._timeout)
        try:
            async with timer:
                return await self._client.send_email(**request)
        except asyncio.CancelledError:
            if attempts.went_out:
                log.warning(
                    "cancelled after the request went to SES: delivery unknown",
                    extra={"message_id": email.message_id},
                )
            raise
        except Exception as exc:
            if not (is_aws_failure(exc) or isinstance(exc, _SentUnanswered)):
                raise  # a bug, not SES's answer
            if timer.expired():  # this call's limit, not botocore's
                raise self._judge(email, out=attempts.in_flight) from None
            maybe_sent = attempts.in_flight or attempts.unanswered is not None
            error = ses_error(exc, sender=email.sender, maybe_sent=maybe_sent)
            raise self._judge(email, error) from None
        finally:
            _current.reset(token)

    def _judge(
        self,
        email: StreamedEmail,
        error: NotifierError | None = None,
        *,
        out: bool = False,
    ) -> NotifierError:
        """The record's error (`ses_error`; without one, the call's time limit ran out, `out`
        saying whether a request was out then), and what it tells the account's limits."""
        if error is None:
            what = f"no answer within {self._timeout:g} s"
            if out:
                error = DeliveryUnknown(
                    f"SES SendEmail: {what} after the request went out; it may have been accepted"
                )
            else:
                error = SesUnavailable(f"SES SendEmail: {what}; nothing was sent")
        if isinstance(error, SesThrottled):
            self._stats.throttled += 1
            self.limits.throttled(error)
        elif isinstance(error, ProviderCondition):
            error = self.limits.trip(error)
        elif isinstance(error, DeliveryUnknown):
            log.warning(
                "no answer from SES: delivery unknown", extra={"message_id": email.message_id}
            )
        return error

    def held(self) -> ProviderCondition | None:
        return self.limits.held()

    def _raise_if_held(self) -> None:
        held = self.limits.held()
        if held is not None:
            raise held

    async def refresh_limits(self) -> None:
        await self.limits.refresh()

    async def server_size_limit(self) -> int | None:
        """SES's 40 MB: a larger message would be refused, so its ZIP goes as a link."""
        return SES_MAX_MESSAGE_BYTES

    def start_batch(self, connections: int) -> None:
        """Begin counting a batch's statistics (there are no connections to warm up: the
        client's HTTP pool opens them as requests need)."""
        self._stats = PoolStats()

    async def finish_batch(self, *, until: float | None = None) -> PoolStats:
        self._stats.send_rate = self.limits.send_rate
        return self._stats

    async def aclose(self) -> None:
        """Nothing to close: the client is the caller's (its event handlers stay, inert)."""
