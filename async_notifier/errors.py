"""Error hierarchy: every record-level failure says whether retrying can help.

`transient` errors are worth another delivery (SQS retry); `permanent` ones are
not and belong in the dead-letter queue. A broken setting is not a record's failure
at all: `config.ConfigError` stops the function before it touches any record.

A reason goes to logs, metrics and dead-letter attributes, so it never carries an
email address: servers repeat the recipient in their refusals (`550 5.1.1 <ana@...>`),
and every address in a reason is replaced by a short stable hash (`redact`), which still
lets support match two lines about the same recipient.
"""

from __future__ import annotations

import hashlib
import re

# Anything shaped like an address: a local part, an @, a domain (a dot is not required:
# a refusal may quote a mailbox at a bare host name).
_ADDRESS = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)*")


def address_hash(address: str) -> str:
    """A short stable name for an address (case-insensitive): `addr-3f2a9c1b7e`."""
    digest = hashlib.sha256(address.strip().lower().encode("utf-8", "surrogatepass"))
    return f"addr-{digest.hexdigest()[:10]}"


def redact(text: str) -> str:
    """`text` with every email address replaced by its `address_hash`."""
    if "@" not in text:  # most log lines: 0.1 us instead of the regex's 15 us
        return text
    return _ADDRESS.sub(lambda match: address_hash(match.group(0)), text)


class NotifierError(Exception):
    """A failure of one record. Subclasses fix `transient` and `kind`."""

    transient: bool = True
    kind: str = "error"

    def __init__(self, reason: str) -> None:
        reason = redact(reason)
        super().__init__(reason)
        self.reason = reason


class PermanentError(NotifierError):
    """Retrying the same record cannot succeed."""

    transient = False
    kind = "permanent"


class TransientError(NotifierError):
    """The same record may succeed on a later attempt."""

    transient = True
    kind = "transient"


class BadMessage(PermanentError):
    """The record body is not a valid notification."""

    kind = "bad_message"


class BucketNotAllowed(PermanentError):
    """The record names a bucket outside ALLOWED_BUCKETS."""

    kind = "bucket_not_allowed"


class KeyNotAllowed(PermanentError):
    """The record names a key outside ALLOWED_KEY_PREFIX for its owner."""

    kind = "key_not_allowed"


class ObjectUnavailable(PermanentError):
    """The object does not exist or the role may not read it."""

    kind = "object_unavailable"


class DownloadFailed(TransientError):
    """S3 failed or the stream broke; a later attempt may succeed."""

    kind = "download_failed"


class RecipientRejected(PermanentError):
    """The SMTP server refused the recipient or the message (5xx)."""

    kind = "smtp_rejected"


class MessageTooLarge(PermanentError):
    """The SMTP server refused the message for its size (552, 5.3.4), before or after its
    end, or in the middle of it. A ZIP is then sent as a download link instead."""

    kind = "message_too_large"


class TransportUnavailable(TransientError):
    """The mail transport could not take the message now (any transport: SMTP, the SES API)."""

    kind = "transport_unavailable"


class TransportThrottled(TransportUnavailable):
    """The provider asked us to slow down: the instance's pace halves (`account/limits.py`)."""

    kind = "transport_throttled"


class SmtpUnavailable(TransportUnavailable):
    """The SMTP server could not be reached, dropped us, or answered 4xx."""

    kind = "smtp_unavailable"


class ProviderCondition(TransportUnavailable):
    """Something that holds for every message, not this one: the relay is down, the daily
    quota is spent, the login or the sender is refused. While it holds, records go back to
    the queue at once without an attempt (no retry within the invocation, no connection
    storm) and come back after `retry_after` seconds, when the pool tries again.

    `condition` names it in metrics (RecordsHeld by Condition) and alarms.
    """

    condition = "provider"

    def __init__(self, reason: str, *, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        self.retry_after = max(0.0, retry_after)


class CircuitOpen(ProviderCondition, SmtpUnavailable):
    """Connections to the SMTP server keep failing: the pool tries none until its cool-down
    is over (reported as smtp_unavailable; retrying within the invocation cannot help)."""

    condition = "circuit_open"


class DailyQuotaExceeded(ProviderCondition):
    """The provider's daily sending quota is spent (SES: "Daily message quota exceeded"):
    it frees as the last 24 hours' sends age out, hours rather than seconds."""

    kind = "smtp_daily_quota"
    condition = "daily_quota"


class LoginRefused(ProviderCondition, SmtpUnavailable):
    """The relay refused our login: a configuration fault (expired password) until fixed."""

    kind = "smtp_login_refused"
    condition = "login_failed"


class SenderRejected(ProviderCondition):
    """The relay refused the sender (EMAIL_FROM): a configuration fault, not the recipient's."""

    kind = "smtp_sender_rejected"
    condition = "sender_rejected"


class SmtpThrottled(SmtpUnavailable, TransportThrottled):
    """The provider asked us to slow down (454, or 421 with a rate message)."""

    kind = "smtp_throttled"


class SesUnavailable(TransportUnavailable):
    """The SES API could not be reached, timed out before the request went out, or failed on
    its side (5xx): nothing was sent, so another attempt is safe."""

    kind = "ses_unavailable"


class SesThrottled(TransportThrottled):
    """SES said "slow down" (TooManyRequestsException, Throttling): the pace halves, as for
    SMTP's 454; the message was not taken and goes back to the queue."""

    kind = "ses_throttled"


class SesRejected(PermanentError):
    """SES refused this message (MessageRejected for its content, BadRequestException): the
    same request would be refused again, so it goes to the dead-letter queue."""

    kind = "ses_rejected"


class AccountPaused(ProviderCondition):
    """The SES account's sending is paused or suspended (AccountSuspendedException,
    SendingPausedException): nothing can be sent until someone acts on the account, so every
    message is held, not failed one by one."""

    kind = "ses_account_paused"
    condition = "account_paused"


class ProviderMisconfigured(ProviderCondition):
    """The provider refuses what every request names, not this message: SES's
    NotFoundException for SES_CONFIGURATION_SET that does not exist. A configuration fault,
    held for every message until it is fixed (no record is lost to the dead-letter queue)."""

    kind = "ses_misconfigured"
    condition = "misconfigured"


class AttachmentUnreadable(TransientError):
    """The downloaded ZIP could not be read back from the temp dir (a local failure).

    Not the SMTP server's fault: no connection is blamed or retried for it; a later
    delivery downloads the file again.
    """

    kind = "attachment_unreadable"


class DeadlineExceeded(TransientError):
    """The invocation ran out of time before this record finished (or started)."""

    kind = "deadline"


class InProgressElsewhere(TransientError):
    """Another delivery of the same email is under way (or did not finish)."""

    kind = "in_progress_elsewhere"


class DeliveryUnknown(TransientError):
    """The connection was lost after the message data was sent.

    The server may have accepted it, so it is not resent within the invocation;
    a later delivery carries the same Message-ID.
    """

    kind = "delivery_unknown"


class SecretUnavailable(TransientError):
    """The SMTP secret could not be read or is malformed; retry once it is fixed."""

    kind = "secret_unavailable"


class SecretWithoutUsername(SecretUnavailable):
    """The SMTP secret is a password alone and SMTP_USER is not set: no login can work.
    Read at start, it is a broken setting (the start fails); met later (a rotation that
    dropped the username), it fails the records like any malformed secret."""


class SuppressionUnavailable(TransientError):
    """The suppression list could not be read: sending now could mail a suppressed address."""

    kind = "suppression_unavailable"


class IdempotencyUnavailable(TransientError):
    """The idempotency store could not be read or written; sending now could send twice."""

    kind = "idempotency_unavailable"


class OriginalCancelled(TransientError):
    """The first record for this notification was cancelled (e.g. at the deadline)."""

    kind = "cancelled"


class RecipientUnknown(PermanentError):
    """No such user, or the user has no valid email address: retrying cannot help."""

    kind = "recipient_unknown"


class RecipientUnverified(PermanentError):
    """The Cognito user has not verified the email address (ALLOW_UNVERIFIED_EMAIL is off)."""

    kind = "recipient_unverified"


class RecipientSuppressed(PermanentError):
    """The address hard-bounced or complained before: it is never mailed again."""

    kind = "suppressed"


class LookupFailed(TransientError):
    """Cognito could not answer (throttled, 5xx, network, permissions): retry later."""

    kind = "lookup_failed"


class GroupBlocked(TransientError):
    """An earlier record of the same FIFO group failed; order forbids going on."""

    kind = "fifo_group_blocked"


class Expired(PermanentError):
    """The notification is older than MAX_DELIVERY_AGE and still not delivered: it goes to
    the dead-letter queue with its last error, where `async-notifier redrive` can bring it
    back."""

    kind = "expired"


class InternalError(NotifierError):
    """A bug, not the record's fault: retried, and logged with its traceback."""

    transient = True
    kind = "internal"


# --------------------------------------------------------------------------- not a record's fate
# Signals that cross a module boundary before becoming a record's error (or none at all).


class AttachmentChanged(RuntimeError):
    """The file no longer has the size the message was built for; its `size` would be wrong."""


class StatusUnavailable(Exception):
    """A delivery-status write or publish failed (STATUS_TABLE, STATUS_TOPIC_ARN): never a
    record's error, only counted and logged. Its text is safe to log (a code, a type)."""


class TooLarge(Exception):
    """A download of unknown size passed the most it was allowed (not a record's error)."""

    def __init__(self, url: str, limit: int, written: int) -> None:
        super().__init__(f"{url}: more than {limit} bytes")
        self.limit = limit
        self.written = written
