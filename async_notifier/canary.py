"""The canary: proof that the whole deployed path works, from a notification to its status.

It publishes three notifications to the notification queue, addressed to SES's mailbox
simulator (whose success, bounce and complaint addresses make SES act out a delivery, a
hard bounce and a complaint without mailing anyone or hurting the sender's reputation),
then reads the status table until each has the status it must end with: `delivered`,
`bounced`, `complained`. They get there only if every part works: the queue and its event
source mapping, the worker (parsing, rendering, the transport, SES's credentials), the
configuration set's event publishing, the SES events function, and the status writes on
both sides. What is missing, or what came instead, says where to look.

The probes are FAILED notifications by default: they need no ZIP, so the canary needs no
write access to a bucket and leaves nothing to clean up. With a ZIP already in an allowed
bucket (`zip_location`), they are COMPLETED notifications of it, which adds the S3 download
and the attachment to the path proved. Each run addresses the simulator with a label of its
own (`bounce+canary-RUN@...`): the suppression list records the bounced and complaining
addresses, and the next run's must not be suppressed.

This module knows nothing of AWS: it is handed a way to send a body and a way to read a
status (`wiring.run_canary` gives it SQS and `DynamoStatusReader`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .delivery_status import State, StatusRecord
from .errors import StatusUnavailable
from .messages import parse_body

SIMULATOR_DOMAIN = "simulator.amazonses.com"
#: SES's mailbox simulator addresses (the local part) and the status each must end with.
EXPECTED: dict[str, State] = {
    "success": "delivered",
    "bounce": "bounced",
    "complaint": "complained",
}
#: Statuses after which the expected one will not come within a canary's wait: the worker
#: gave up on the email, or SES refused it.
_DEAD_ENDS: frozenset[State] = frozenset(
    {"failed", "dead_lettered", "expired", "suppressed", "rejected"}
)
DEFAULT_TIMEOUT = 300.0
DEFAULT_INTERVAL = 5.0
#: Reads of the table that fail in a row before the canary gives up on it: one failure is
#: retried at the next read (a throttle, a blip), a table that is gone is reported soon.
MAX_READ_FAILURES = 3


@dataclass(frozen=True, slots=True)
class Probe:
    """One canary notification: the simulator address it goes to and what must come of it."""

    kind: str  # "success", "bounce", "complaint"
    expected: State
    body: str
    tracking_id: str
    address: str


@dataclass
class ProbeResult:
    probe: Probe
    record: StatusRecord | None = None

    @property
    def ok(self) -> bool:
        return self.record is not None and self.record.status == self.probe.expected

    @property
    def settled(self) -> bool:
        """Nothing more to wait for: the status expected, or one it will not come after."""
        return self.ok or (self.record is not None and self.record.status in _DEAD_ENDS)


@dataclass
class CanaryResult:
    run_id: str
    results: list[ProbeResult]
    seconds: float = 0.0
    timed_out: bool = False
    error: str | None = None  # the queue or the table could not be used
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and all(r.ok for r in self.results)

    def missing(self) -> list[str]:
        """One line per probe without its expected status: what came instead, if anything."""
        lines = []
        for result in self.results:
            if result.ok:
                continue
            probe, record = result.probe, result.record
            got = "no status at all" if record is None else f"status {record.status}"
            if record is not None and record.reason:
                got += f" ({record.reason})"
            lines.append(
                f"{probe.kind}: expected {probe.expected}, got {got} "
                f"(tracking id {probe.tracking_id})"
            )
        return lines

    def summary(self) -> dict[str, Any]:
        """The run as JSON values (the Lambda entry point's response, `canary --json`)."""
        return {
            "ok": self.ok,
            "run_id": self.run_id,
            "seconds": round(self.seconds, 1),
            "timed_out": self.timed_out,
            "error": self.error,
            "probes": [
                {
                    "kind": r.probe.kind,
                    "expected": r.probe.expected,
                    "status": r.record.status if r.record is not None else None,
                    "reason": r.record.reason if r.record is not None else None,
                    "ok": r.ok,
                    "tracking_id": r.probe.tracking_id,
                    "video_id": r.record.video_id if r.record is not None else None,
                }
                for r in self.results
            ],
            "missing": self.missing(),
        }


def new_run_id(now: float | None = None) -> str:
    """`20261208T024900-a1b2c3`: sortable, unique, and safe in an address and a tag."""
    moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return f"{moment.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def parse_zip_location(text: str) -> tuple[str, str]:
    """`s3://bucket/key` as (bucket, key); ValueError otherwise."""
    rest = text.strip().removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if not text.strip().startswith("s3://") or not bucket or not key:
        raise ValueError(f"not an s3://BUCKET/KEY location: {text[:200]!r}")
    return bucket, key


def make_probes(
    run_id: str, *, zip_location: tuple[str, str] | None = None, now: float | None = None
) -> list[Probe]:
    """The run's three notifications, one per simulator address, with their tracking ids."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    probes = []
    for kind, expected in EXPECTED.items():
        address = f"{kind}+canary-{run_id}@{SIMULATOR_DOMAIN}"
        body: dict[str, Any] = {
            "video_id": f"canary-{run_id}",
            "notification_id": f"canary-{run_id}-{kind}",
            "email": address,
            "name": "async-notifier canary",
            "file_name": "canary.mp4",
            "locale": "en",
            "timestamp": stamp.isoformat(timespec="seconds"),
        }
        if zip_location is None:
            body["status"] = "FAILED"
            body["message"] = "async-notifier canary: a health check, not a real failure"
        else:
            body.update(status="COMPLETED", bucket=zip_location[0], key=zip_location[1])
        text = json.dumps(body)
        probes.append(Probe(kind, expected, text, parse_body(text).tracking_id, address))
    return probes


Send = Callable[[str], Awaitable[None]]
Read = Callable[[str], Awaitable[StatusRecord | None]]


async def run_canary(
    send: Send,
    read: Read,
    *,
    run_id: str | None = None,
    wait: float = DEFAULT_TIMEOUT,
    interval: float = DEFAULT_INTERVAL,
    zip_location: tuple[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_progress: Callable[[CanaryResult], None] | None = None,
) -> CanaryResult:
    """Send the probes, then read their statuses every `interval` seconds until each is
    settled or `wait` seconds have passed since they were sent. Never raises for the
    queue or the table: the result says what failed (`error`), after MAX_READ_FAILURES
    reads in a row failed."""
    run_id = run_id or new_run_id()
    probes = make_probes(run_id, zip_location=zip_location)
    result = CanaryResult(run_id, [ProbeResult(p) for p in probes])
    started = clock()
    try:
        for probe in probes:
            await send(probe.body)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        result.error = f"could not send to the notification queue: {exc}"
        result.seconds = clock() - started
        return result
    deadline = started + wait
    failures = 0
    while True:
        try:
            for entry in result.results:
                if not entry.settled:
                    entry.record = await read(entry.probe.tracking_id)
            failures = 0
        except StatusUnavailable as exc:
            failures += 1
            if failures >= MAX_READ_FAILURES or clock() >= deadline:
                result.error = f"could not read the status table: {exc}"
                break
        if on_progress is not None:
            on_progress(result)
        if all(entry.settled for entry in result.results):
            break
        left = deadline - clock()
        if left <= 0:
            result.timed_out = True
            break
        await asyncio.sleep(min(interval, left))
    result.seconds = clock() - started
    return result


@dataclass(frozen=True)
class CanaryRequest:
    """What the scheduled entry point is asked: the queue, and how long to wait (never past
    the invocation's end, less a margin to report)."""

    queue_url: str
    timeout: float
    zip_location: tuple[str, str] | None = None

    REPORT_MARGIN = 15.0

    @classmethod
    def from_event(cls, event: Any, remaining_seconds: float | None) -> CanaryRequest:
        if not isinstance(event, dict):
            raise ValueError("the canary's event must be a JSON object with queue_url")
        queue_url = event.get("queue_url")
        if not isinstance(queue_url, str) or not queue_url.startswith(("https://", "http://")):
            raise ValueError("the canary's event needs queue_url, the notification queue's URL")
        timeout = float(event.get("timeout_seconds", DEFAULT_TIMEOUT))
        if not 0 < timeout < float("inf"):
            raise ValueError("timeout_seconds must be a number of seconds, more than 0")
        if remaining_seconds is not None:
            timeout = max(1.0, min(timeout, remaining_seconds - cls.REPORT_MARGIN))
        zip_text = event.get("zip")
        zip_location = parse_zip_location(zip_text) if isinstance(zip_text, str) else None
        return cls(queue_url, timeout, zip_location)
