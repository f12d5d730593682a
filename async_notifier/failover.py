"""Two transports, one sending: the primary while it can, the fallback while it cannot.

FALLBACK_TRANSPORT names a second transport (an SMTP relay behind the SES API, the SES API
behind a relay, or SES in another region) for what holds for every message on the primary:
its circuit open, its daily quota spent, its login, sender or account refused
(`errors.ProviderCondition`). Such a refusal delivered nothing, so the same email goes to the
fallback at once. Anything else the primary says (accepted, refused for this message,
delivery unknown) is that email's outcome: an email is never handed to both, so it is never
sent twice. While the primary's condition holds, emails go straight to the fallback; once the
hold is over, the next email is the primary's probe and, if it goes through, the primary
carries the traffic again. `FallbackMessages` counts what the fallback carried.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import ProviderCondition
from .logs import get_logger
from .mail.mime import StreamedEmail
from .ports import MailTransport, PoolStats, Receipt

log = get_logger()


class FailoverTransport:
    """`ports.MailTransport` over a primary and a fallback transport."""

    def __init__(self, primary: MailTransport, fallback: MailTransport) -> None:
        self.primary = primary
        self.fallback = fallback
        self.name = f"{primary.name}+{fallback.name}"
        self._carried = 0  # emails the fallback delivered in this batch

    async def deliver(
        self, email: StreamedEmail, *, reached: Callable[[], None] | None = None
    ) -> Receipt:
        if self.primary.held() is None:
            try:
                return await self.primary.deliver(email, reached=reached)
            except ProviderCondition as exc:  # refused before anything was delivered
                log.warning(
                    "primary transport held: sending through the fallback",
                    extra={"transport": self.primary.name, "condition": exc.condition},
                )
        receipt = await self.fallback.deliver(email, reached=reached)
        self._carried += 1
        return receipt

    def held(self) -> ProviderCondition | None:
        """Held only when both are: then nothing can be sent until one is back."""
        if self.primary.held() is None:
            return None
        return self.fallback.held()

    async def refresh_limits(self) -> None:
        await self.primary.refresh_limits()
        await self.fallback.refresh_limits()

    async def server_size_limit(self) -> int | None:
        """The smaller of the two limits, as either may send the email; a transport that is
        held (its circuit open: it cannot even say) will not be the one, and is left out."""
        limits: list[int | None] = []
        for transport in (self.primary, self.fallback):
            try:
                limits.append(await transport.server_size_limit())
            except ProviderCondition:
                if transport is self.fallback and not limits:
                    raise  # both held: the record goes back
        known = [limit for limit in limits if limit]
        if known:
            return min(known)
        return 0 if 0 in limits else None

    def start_batch(self, connections: int) -> None:
        self._carried = 0
        self.primary.start_batch(connections)
        self.fallback.start_batch(0)  # warmed only when it is needed

    async def finish_batch(self, *, until: float | None = None) -> PoolStats:
        first = await self.primary.finish_batch(until=until)
        second = await self.fallback.finish_batch(until=until)
        return PoolStats(
            connections_opened=first.connections_opened + second.connections_opened,
            connections_failed=first.connections_failed + second.connections_failed,
            connections_closed=first.connections_closed + second.connections_closed,
            circuit_opened=first.circuit_opened + second.circuit_opened,
            throttled=first.throttled + second.throttled,
            send_rate=first.send_rate,
            fallback_messages=self._carried,
        )

    async def aclose(self) -> None:
        try:
            await self.primary.aclose()
        finally:
            await self.fallback.aclose()
