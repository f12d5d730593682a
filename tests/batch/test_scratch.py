"""The scratch directory: private, removed whole, and named with the time it becomes stale,
so that the next invocation sweeps the directories a killed invocation left behind."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from servers import CapturedLogs

from async_notifier.batch.scratch import STALE_AFTER, ScratchDir, stale_at
from async_notifier.deadline import Deadline


async def test_scratch_dir_is_private_and_names_are_ours(tmp_path: Path) -> None:
    with ScratchDir(tmp_path) as scratch:
        assert scratch.path.parent == tmp_path
        assert stat.S_IMODE(scratch.path.stat().st_mode) == 0o700
        names = {scratch.new_file().name for _ in range(50)}
        assert len(names) == 50
        assert all(name.endswith(".zip") and "/" not in name for name in names)


def test_scratch_dir_close_removes_everything(tmp_path: Path) -> None:
    scratch = ScratchDir(tmp_path)
    for index in range(3):
        scratch.new_file().write_bytes(b"x" * index)
    nested = scratch.path / "left" / "behind"
    nested.mkdir(parents=True)
    (nested / "file").write_bytes(b"y")
    scratch.close()
    assert not scratch.path.exists()
    assert os.listdir(tmp_path) == []
    scratch.close()  # idempotent


# --------------------------------------------------------------------------- stale scratch dirs


def _dir(parent: Path, name: str, *, age: float = 0.0) -> Path:
    path = parent / name
    path.mkdir()
    (path / "left.zip").write_bytes(b"x" * 100)
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path


def test_scratch_dir_name_records_when_it_becomes_stale(tmp_path: Path) -> None:
    before = time.time()
    with ScratchDir(tmp_path) as plain:
        until = stale_at(plain.path.name)
        assert until is not None
        assert before + STALE_AFTER <= until <= time.time() + STALE_AFTER + 1
    with ScratchDir(tmp_path, Deadline.after(5.0, grace=20.0)) as timed:
        until = stale_at(timed.path.name)
        assert until is not None
        assert before + 25 <= until <= time.time() + 25 + 1  # the deadline's end
    assert stale_at("async-notifier-abcd1234") is None
    assert stale_at("async-notifier-until-12x-abcd1234") is None


def test_sweep_removes_only_stale_scratch_dirs(tmp_path: Path, captured: CapturedLogs) -> None:
    now = time.time()
    gone = [
        _dir(tmp_path, f"async-notifier-until-{int(now) - 5}-abcd1234"),
        _dir(tmp_path, "async-notifier-k3j_9x0a", age=STALE_AFTER + 60),  # the old format
    ]
    kept = [
        _dir(tmp_path, f"async-notifier-until-{int(now) + 60}-abcd1234"),  # live
        _dir(tmp_path, "async-notifier-zz99yy88", age=STALE_AFTER - 60),  # old format, recent
        _dir(tmp_path, "async-notifier-backup", age=10 * STALE_AFTER),  # not our name
        _dir(tmp_path, "other-app-until-1-abcd1234", age=10 * STALE_AFTER),
    ]
    note = tmp_path / "async-notifier-until-1-abcd1234.txt"  # a file, not a directory
    note.write_text("keep")
    # A stale name on a symbolic link: removing it must not follow it anywhere.
    target = _dir(tmp_path, "elsewhere")
    (tmp_path / "async-notifier-until-1-linkdirx").symlink_to(target)

    with ScratchDir(tmp_path) as scratch:
        kept.append(scratch.path)
        for path in gone:
            assert not path.exists(), path
        for path in kept:
            assert path.is_dir(), path
    assert note.read_text() == "keep"
    assert (target / "left.zip").exists()
    removed = sorted(r.dir for r in captured.named("stale scratch dir removed"))
    assert removed == sorted(p.name for p in gone)


@pytest.fixture
def undeletable(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Make a file impossible to delete, for real: a read-only parent for a normal user, the
    immutable attribute for root (who ignores permissions)."""
    made: list[Path] = []

    def make(path: Path) -> None:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", str(path)], check=True)
        else:
            path.parent.chmod(0o500)
        made.append(path)

    yield make
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            path.parent.chmod(0o700)


def test_a_stale_dir_that_cannot_be_removed_is_logged_and_skipped(
    tmp_path: Path, undeletable: Callable[[Path], None], captured: CapturedLogs
) -> None:
    stuck = _dir(tmp_path, "async-notifier-until-1-stuck000")
    undeletable(stuck / "left.zip")
    stale = _dir(tmp_path, "async-notifier-until-2-stale000")

    with ScratchDir(tmp_path) as scratch:
        assert scratch.path.is_dir()
        assert not stale.exists()
        assert (stuck / "left.zip").exists()
    [warning] = captured.named("stale scratch dir not removed")
    assert warning.dir == stuck.name
