"""One build at a time on the dependency caches of scripts/package.py (build/package/ and the
runtime client's build/lambda-runtime/).

On a miss, package.py installs into a staging directory and then replaces the cache entry
whole (rmtree, then rename): a build that reads that entry at the same moment, in another
xdist worker, loses it under its feet. On a fresh clone every entry misses. So every test
that builds holds this lock, across processes, for as long as its build runs.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

LOCK = Path(__file__).resolve().parents[2] / "build" / "package.lock"


@contextlib.contextmanager
def one_build_at_a_time() -> Iterator[None]:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield
