"""The account's SES sending quota (GetSendQuota), so pacing can start at the real rate.

SES limits the whole account: MaxSendRate messages per second and Max24HourSend per rolling
day, over SMTP and the API alike. Reading them beats guessing: a guess too high is throttled
at once, one too low wastes the quota. Only SES SMTP endpoints have a quota to read; their
host name says the region to ask.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from ..account.quota import SendQuota
from ..config import is_ses, ses_region
from ..logs import get_logger
from .errors import aws_error

__all__ = ["QuotaUnavailable", "SendQuota", "SesQuotaReader", "is_ses", "ses_region"]

log = get_logger()


class QuotaUnavailable(Exception):
    """The quota could not be read; the text says why (an error code or type, never secrets)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"SES GetSendQuota failed: {reason}")
        self.reason = reason  # "Throttling: ...", "AccessDenied: ...", "no answer within 5 s"


class SesQuotaReader:
    """Reads the account's sending quota (SES GetSendQuota) for pacing."""

    def __init__(self, client: Any, *, timeout: float = 5.0) -> None:
        """`client`: an aiobotocore "ses" client in the region of the SMTP endpoint."""
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"timeout must be a finite number of seconds > 0, not {timeout!r}")
        self._client = client
        self._timeout = timeout

    async def read(self) -> SendQuota:
        """One GetSendQuota (the client's own retries included) within `timeout` seconds."""
        try:
            async with asyncio.timeout(self._timeout):
                response: Any = await self._client.get_send_quota()
        except TimeoutError:
            raise self._unavailable(f"no answer within {self._timeout:g} s") from None
        except Exception as exc:
            error = aws_error(exc)
            status = f" (HTTP {error.status})" if error.status and not error.code else ""
            raise self._unavailable(error.describe() + status) from None
        try:
            return SendQuota(
                max_send_rate=_number(response, "MaxSendRate", positive=True),
                max_24_hour_send=_number(response, "Max24HourSend"),
                sent_last_24_hours=_number(response, "SentLast24Hours", positive=False),
            )
        except ValueError as exc:
            raise self._unavailable(str(exc)) from None

    def _unavailable(self, reason: str) -> QuotaUnavailable:
        log.warning("SES send quota unavailable", extra={"error": reason})
        return QuotaUnavailable(reason)


def _number(response: Any, name: str, *, positive: bool | None = None) -> float:
    """A finite number from the answer: > 0 if `positive`, >= 0 if False, any if None."""
    value = response.get(name) if isinstance(response, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"the answer has no valid {name} ({type(value).__name__})")
    if (positive and value <= 0) or (positive is False and value < 0):
        raise ValueError(f"the answer's {name} is out of range ({value})")
    return float(value)
