"""The scenarios, full and `--quick`, and how command-line flags override them."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB

NAMES = ("small", "large", "remote", "remote-warm", "scale", "throttled", "ses-large")
# Every target, in the order of one round of runs; `previous` runs wherever `project` does.
TARGETS = ("baseline", "previous", "project")
HANDLERS = ("previous", "project")  # the targets that call handler.lambda_handler


@dataclass(frozen=True)
class Scenario:
    name: str
    records: int
    size: int  # bytes per attachment
    smtp_delay_ms: float = 0.0
    s3_delay_ms: float = 0.0
    targets: tuple[str, ...] = TARGETS
    about: str = ""
    # Records of a warm-up invocation run in the same process before the measured call,
    # so the measured call is the process's second (warm) invocation; 0 = a cold call.
    warmup: int = 0
    # An account's sending rate (messages/s) enforced by `bench.relay` in place of the sink,
    # and how many instances (concurrent target processes) share it; 0 = no relay.
    account_rate: float = 0.0
    instances: int = 1
    # The fleet's Lambda timeout: an invocation stuck in back-off hands its records back
    # before it (the worker's deadline), and they are redelivered; bounds a round's time.
    invocation_timeout_s: float = 900.0
    # TRANSPORT of each row: a scenario with several runs every target once per transport
    # (rows tell them apart by `transport`); the default is SMTP, as before TRANSPORT existed.
    transports: tuple[str, ...] = ("smtp",)
    # SES_MAX_INFLIGHT_BYTES and MAX_CONCURRENCY of every run; 0 = the project's default.
    ses_max_inflight_bytes: int = 0
    max_concurrency: int = 0

    @property
    def delayed(self) -> bool:
        return self.smtp_delay_ms > 0 or self.s3_delay_ms > 0


def _table(
    small: tuple[int, int],
    large: tuple[int, int],
    remote: tuple[int, int, float, float],
    warmup: int,
    throttled: tuple[int, int, float, float],
    ses_large: tuple[int, int, int],
) -> dict[str, Scenario]:
    records, size = small
    remote_row = Scenario(
        "remote",
        remote[0],
        remote[1],
        smtp_delay_ms=remote[2],
        s3_delay_ms=remote[3],
        about="SMTP and S3 behind a delay proxy",
    )
    return {
        "small": Scenario("small", records, size, about="many small attachments, no delay"),
        "large": Scenario("large", *large, about="few large attachments, no delay"),
        "remote": remote_row,
        # What a Lambda under load mostly runs: a warm invocation, in a process that already
        # imported aioboto3, built its clients and opened its SMTP connections.
        "remote-warm": dataclasses.replace(
            remote_row,
            name="remote-warm",
            targets=HANDLERS,
            about="remote, measured as the process's second invocation (after a warm-up batch)",
            warmup=warmup,
        ),
        # Memory flatness: 4x the records and 4x the size of `small`; compare peak RSS.
        "scale": Scenario(
            "scale",
            records * 4,
            size * 4,
            targets=HANDLERS,
            about="small x4 records x4 size (peak RSS should match small's)",
        ),
        # A fleet against the account's limit: two instances, each configured with the
        # account's rate and FLEET_SIZE=2, their failed records redelivered as SQS would.
        "throttled": Scenario(
            "throttled",
            throttled[0],
            throttled[1],
            targets=HANDLERS,
            about="2 instances sharing one account's rate (454 beyond it), with redelivery",
            account_rate=throttled[2],
            instances=2,
            invocation_timeout_s=throttled[3],
        ),
        # The SES API holds each message whole (and botocore its base64): the in-flight byte
        # budget, not MAX_CONCURRENCY, must bound the memory. The same records by SMTP,
        # which streams from disk, are the second row.
        "ses-large": Scenario(
            "ses-large",
            ses_large[0],
            ses_large[1],
            targets=HANDLERS,
            about="large attachments by the SES API under a byte budget, and by SMTP",
            transports=("smtp", "ses"),
            ses_max_inflight_bytes=ses_large[2],
            max_concurrency=32,
        ),
    }


FULL = _table(
    small=(2000, 32 * KiB),
    large=(32, 20 * MiB),
    remote=(500, 128 * KiB, 50, 25),
    warmup=16,
    throttled=(600, 32 * KiB, 100, 60),
    ses_large=(16, 20 * MiB, 128 * MiB),
)
QUICK = _table(
    small=(200, 16 * KiB),
    large=(4, 2 * MiB),
    remote=(40, 16 * KiB, 20, 10),
    warmup=8,
    throttled=(120, 16 * KiB, 40, 10),
    ses_large=(6, 8 * MiB, 32 * MiB),
)


def select(
    names: list[str],
    *,
    quick: bool,
    records: int | None = None,
    size: int | None = None,
    smtp_delay_ms: float | None = None,
    s3_delay_ms: float | None = None,
    account_rate: float | None = None,
) -> list[Scenario]:
    """The chosen scenarios with the flags applied to every one of them.

    `--records` and `--size` set small, large, remote, remote-warm, throttled and ses-large; scale
    stays at 4x small's values. The delays, when given, apply to every chosen scenario. The
    warm-up batch of remote-warm keeps its size in records (the attachment size follows
    `--size`). `--account-rate` sets throttled's account rate.
    """
    base = QUICK if quick else FULL
    chosen = []
    for name in names:
        scenario = base[name]
        factor = 4 if name == "scale" else 1
        changes: dict[str, object] = {}
        if records is not None:
            changes["records"] = records * factor
        if size is not None:
            changes["size"] = size * factor
        if smtp_delay_ms is not None:
            changes["smtp_delay_ms"] = smtp_delay_ms
        if s3_delay_ms is not None:
            changes["s3_delay_ms"] = s3_delay_ms
        if account_rate is not None and scenario.account_rate > 0:
            changes["account_rate"] = account_rate
        chosen.append(dataclasses.replace(scenario, **changes))  # type: ignore[arg-type]
    return chosen


def parse_names(text: str) -> list[str]:
    """`all`, one name, or a comma-separated list, in the canonical order."""
    wanted = {part.strip() for part in text.split(",") if part.strip()}
    if "all" in wanted:
        return list(NAMES)
    unknown = wanted - set(NAMES)
    if unknown or not wanted:
        raise ValueError(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(NAMES)}")
    return [name for name in NAMES if name in wanted]


def parse_targets(text: str | None, *, vs: str | None) -> tuple[str, ...]:
    """`--target`: a comma-separated subset of TARGETS (`both`: baseline,project), in that order.

    The default is baseline,project, or project,previous with `--vs`; `previous` exists only
    with `--vs`, and `--vs` is pointless without it.
    """
    if text is None:
        wanted = {"previous", "project"} if vs is not None else {"baseline", "project"}
    elif text.strip() == "both":
        wanted = {"baseline", "project"}
    else:
        wanted = {part.strip() for part in text.split(",") if part.strip()}
    unknown = wanted - set(TARGETS)
    if unknown or not wanted:
        raise ValueError(f"unknown target(s) {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    if "previous" in wanted and vs is None:
        raise ValueError("target previous runs the code of --vs REF: give --vs")
    if vs is not None and "previous" not in wanted:
        raise ValueError("--vs REF adds target previous: include it in --target")
    return tuple(target for target in TARGETS if target in wanted)


def interleaved(targets: tuple[str, ...], repetition: int) -> tuple[str, ...]:
    """One round of runs: the targets in order, reversed every other round (0-based).

    Alternating who goes first cancels what running first or second does to a target
    (a just-seeded moto, the page cache, the machine warming up) over an even count.
    """
    return targets if repetition % 2 == 0 else targets[::-1]


def parse_size(text: str) -> int:
    """Bytes, or with a unit: 32K, 32KiB, 20M, 20MiB."""
    units = {"": 1, "k": KiB, "kib": KiB, "kb": KiB, "m": MiB, "mib": MiB, "mb": MiB}
    match = re.fullmatch(r"\s*(\d+)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in units:
        raise ValueError(f"not a size: {text!r} (e.g. 32768, 32K, 20M)")
    return int(match.group(1)) * units[match.group(2)]


def human_size(size: int) -> str:
    if size >= MiB and size % MiB == 0:
        return f"{size // MiB} MiB"
    if size >= KiB and size % KiB == 0:
        return f"{size // KiB} KiB"
    return f"{size} B"
