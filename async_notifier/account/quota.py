"""The provider account's quota, as a transport reads it (SES `GetSendQuota`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SendQuota:
    """The provider account's limits (SES GetSendQuota), shared by the whole fleet."""

    max_send_rate: float  # messages per second
    max_24_hour_send: float  # -1: unlimited
    sent_last_24_hours: float

    @property
    def unlimited(self) -> bool:
        """No daily quota (SES answers -1)."""
        return self.max_24_hour_send < 0

    @property
    def exhausted(self) -> bool:
        """The daily quota is spent: nothing more goes out until old sends age out."""
        return not self.unlimited and self.sent_last_24_hours >= self.max_24_hour_send


class QuotaSource(Protocol):
    """Where the account's quota is read (`aws/ses_quota.py`); raises when it cannot be."""

    async def read(self) -> SendQuota: ...
