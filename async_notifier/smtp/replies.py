"""What an SMTP reply means, judged by the command it answers: the one classification table.

A reply alone does not say whose fault it is. A 5xx to MAIL FROM refuses the sender (our
configuration, for every message), to RCPT TO the recipient (this message only); a 421 to
the first command on a connection that already carried a message is the server closing an
idle connection (nothing was delivered: send again on a fresh one), on a fresh connection
it is the server being unwell. `judge` is the only place that decides; the failure-handling
docs carry the same table.

    command       reply                                        outcome
    any           454, or 421 about rate                       SmtpThrottled (pace halves)
    any           a 4xx/5xx about a daily quota                DailyQuotaExceeded (held)
    MAIL/RCPT/DATA  530 534 535 538                            LoginRefused (held)
    MAIL/RCPT/DATA  421 on a reused connection                 STALE: resend on a fresh one
    MAIL/RCPT/DATA  421 on a fresh connection                  SmtpUnavailable
    any           5.3.4 or 5.2.3; 552 without enhanced code    MessageTooLarge (permanent)
                  (not at RCPT, where 552 is a full mailbox)
    MAIL          other 5xx                                    SenderRejected (held)
    RCPT          5xx "Sender address rejected"                SenderRejected (held)
    RCPT, DATA, MESSAGE  other 5xx                             RecipientRejected (permanent)
    any           other 4xx                                    SmtpUnavailable

A connection that closes, or a reply later than its time limit, before the end of the
message is STALE on a reused connection and SmtpUnavailable on a fresh one (the pool); after
the end of the message it is DeliveryUnknown (the pool).
"""

from __future__ import annotations

import re
from typing import Final, Literal

from ..errors import (
    DailyQuotaExceeded,
    LoginRefused,
    MessageTooLarge,
    NotifierError,
    RecipientRejected,
    SenderRejected,
    SmtpThrottled,
    SmtpUnavailable,
)
from .channel import Reply

Command = Literal["MAIL", "RCPT", "DATA", "MESSAGE"]
#: Nothing was delivered and the connection cannot be trusted: send again on a fresh one.
STALE: Final = "stale"
# Authentication problems are the sender's configuration, not the message's.
_AUTH_CODES = frozenset({530, 534, 535, 538})
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


def enhanced_status(text: str) -> str | None:
    """The enhanced status code a reply's text starts with (RFC 3463), e.g. "5.3.4"."""
    match = _ENHANCED.match(text)
    return ".".join(match.groups()) if match else None


def is_throttling(code: int, text: str) -> bool:
    """A "slow down" reply: 454 (SES: "Maximum sending rate exceeded"), or a 421 about rate."""
    lower = text.lower()
    return code == 454 or (code == 421 and any(w in lower for w in ("rate", "throttl", "too many")))


def is_daily_quota(code: int, text: str) -> bool:
    """A spent daily quota (SES: "454 Throttling failure: Daily message quota exceeded"; other
    providers answer 4xx or 5xx "daily sending quota exceeded"): it lasts hours, not seconds."""
    lower = text.lower()
    return 400 <= code < 600 and "quota" in lower and ("daily" in lower or "24 hour" in lower)


def judge(command: Command, reply: Reply, *, reused: bool) -> NotifierError | Literal["stale"]:
    """The outcome of a refusal (`reply` is not the success `command` expects)."""
    code, text = reply.code, reply.text
    said = f"SMTP {code} {text}"
    if is_daily_quota(code, text):
        return DailyQuotaExceeded(said)
    if is_throttling(code, text):
        return SmtpThrottled(said)
    if command != "MESSAGE" and code in _AUTH_CODES:
        return LoginRefused(f"{said} (check SMTP_USER and the password)")
    if code == 421 and command != "MESSAGE":
        return STALE if reused else SmtpUnavailable(said)
    if _too_large(command, code, enhanced_status(text)):
        return MessageTooLarge(f"{said} (the server's size limit)")
    if 500 <= code < 600:
        if command == "MAIL" or "sender address rejected" in text.lower():
            return SenderRejected(f"{said} (refused the sender: check EMAIL_FROM)")
        return RecipientRejected(said)
    return SmtpUnavailable(said)


# "Message too big for system", "message length exceeds administrative limit" (RFC 3463).
_TOO_LARGE = frozenset({"5.3.4", "5.2.3"})


def _too_large(command: Command, code: int, enhanced: str | None) -> bool:
    if enhanced is not None:
        return enhanced in _TOO_LARGE
    return code == 552 and command != "RCPT"


# "250 2.0.0 Ok: queued as 4F2A1C3B" (Postfix), "250 OK id=1rB2c3-000Abc-4D" (Exim),
# "250 Ok 0100018c...-000000" (SES), in that order of trust.
_QUEUE_IDS = (
    re.compile(r"queued as <?([\w.@-]{4,})", re.IGNORECASE),
    re.compile(r"\bid=<?([\w.@-]{4,})", re.IGNORECASE),
    re.compile(r"^(?:2\.\d{1,3}\.\d{1,3} )?ok:? <?([\w.@-]{6,})", re.IGNORECASE),
)


def queue_id(text: str) -> str | None:
    """The provider's id for an accepted message, when its 250 names one."""
    for pattern in _QUEUE_IDS:
        if match := pattern.search(text.strip()):
            return match.group(1)
    return None
