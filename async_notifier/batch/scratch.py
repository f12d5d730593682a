"""The private temp directory of one invocation, and the bytes it may hold.

Downloads land here under names the worker chooses, so a key like ``../../x.zip`` cannot
escape it; Lambda's /tmp is small and shared, so concurrent downloads reserve their bytes
first; and a directory left by a killed invocation is swept by the next one.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from pathlib import Path

from ..deadline import Deadline
from ..logs import get_logger

log = get_logger()


PREFIX = "async-notifier-"
#: A directory of the old format (no stale time in its name) is stale after this long
#: without a change; also the stale time of a directory made without a deadline (Lambda's
#: longest timeout).
STALE_AFTER = 900.0
_NAME = re.compile(re.escape(PREFIX) + r"until-(\d{1,12})-[a-z0-9_]{8}")
_OLD_NAME = re.compile(re.escape(PREFIX) + r"[a-z0-9_]{8}")


def stale_at(name: str) -> float | None:
    """The wall-clock time (epoch seconds) after which a scratch dir named `name` is stale."""
    match = _NAME.fullmatch(name)
    return float(match[1]) if match else None


class ScratchDir:
    """A private (0700) directory for one invocation's downloads.

    Files get names we choose, so a key like ``../../x.zip`` cannot escape it;
    `close` removes whatever a cancelled or crashed record left behind. An invocation
    that is killed (timeout, out of memory) never gets to `close`, so the name records
    when the directory becomes stale (`deadline.end` in wall-clock time, or `STALE_AFTER`
    seconds from now without a deadline), and making a new one removes the stale ones.
    """

    def __init__(self, parent: Path, deadline: Deadline | None = None) -> None:
        left = deadline.remaining_to_end() if deadline is not None else STALE_AFTER
        until = math.ceil(time.time() + max(left, 0.0))
        self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}until-{until}-", dir=parent))
        sweep_stale(parent, keep=self.path)

    def new_file(self, suffix: str = ".zip") -> Path:
        return self.path / f"{uuid.uuid4().hex}{suffix}"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> ScratchDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def sweep_stale(parent: Path, *, keep: Path | None = None, now: float | None = None) -> int:
    """Remove the stale scratch directories in `parent`; return how many were removed.

    Only directories named as `ScratchDir` names them, owned by this user and not symbolic
    links; nothing else in `parent` is touched. A failure is logged, never raised: a
    leftover directory must not fail a batch.
    """
    now = time.time() if now is None else now
    removed = 0
    try:
        names = os.listdir(parent)
    except OSError as exc:
        log.warning("cannot list the temp dir for stale scratch dirs", extra={"error": str(exc)})
        return 0
    for name in names:
        path = parent / name
        if not name.startswith(PREFIX) or path == keep:
            continue
        try:
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            until = stale_at(name)
            if until is None:
                if not _OLD_NAME.fullmatch(name) or info.st_mtime + STALE_AFTER > now:
                    continue
            elif until > now:
                continue
            shutil.rmtree(path)
        except FileNotFoundError:
            continue  # removed meanwhile (its own invocation, or another sweep)
        except OSError as exc:
            log.warning("stale scratch dir not removed", extra={"dir": name, "error": str(exc)})
            continue
        removed += 1
        log.info("stale scratch dir removed", extra={"dir": name})
    return removed


class ByteBudget:
    """Bytes the scratch directory may hold at once (Lambda's /tmp is small and shared).

    Downloads reserve their object's size before writing and release it when the
    file is removed, so concurrent records cannot fill the disk between them.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.in_use = 0
        self.peak = 0
        self._cond = asyncio.Condition()

    def try_reserve(self, size: int) -> bool:
        if self.in_use + size > self.total:
            return False
        self.in_use += size
        self.peak = max(self.peak, self.in_use)
        return True

    async def reserve(self, size: int) -> None:
        if size > self.total:
            raise ValueError(f"{size} bytes can never fit a budget of {self.total}")
        async with self._cond:
            await self._cond.wait_for(lambda: self.try_reserve(size))

    async def release(self, size: int) -> None:
        async with self._cond:
            self.in_use -= size
            self._cond.notify_all()
