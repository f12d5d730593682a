#!/usr/bin/env python3
"""Debian root file systems in which the deployment zip runs on CPython 3.13 (`make test-runtime`).

Lambda's python3.13 runtime is CPython 3.13 on Amazon Linux 2023, on x86_64 or arm64. Debian 13
("trixie") ships CPython 3.13 for both, so a minimal trixie made by debootstrap is the closest
free stand-in that runs the real interpreter on the real instruction set: natively for the
host's architecture, through qemu-user (binfmt_misc) for the other one.

Each root file system is cached outside the clone, in
`${XDG_CACHE_HOME:-~/.cache}/async-notifier/rootfs/trixie-<amd64|arm64>`, so later runs (and CI on
the same machine) skip the download. It is built in `<name>.partial` and renamed when complete,
so an interrupted build is never taken for a good cache; a lock keeps two builds apart. Missing
tools (debootstrap, qemu-user-static) are installed with apt-get, and qemu's binfmt_misc entry is
registered when needed: all of it needs root, as do chroot and mount.

Usage: python scripts/rootfs.py [--arch x86_64|arm64]... [--cache-dir DIR]
Prints the path of each root file system, building it first if it is not cached.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
INCLUDE = ("python3",)
# Lambda's architecture names, Debian's, and qemu's.
DEBIAN_ARCH = {"x86_64": "amd64", "arm64": "arm64"}
QEMU_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}
HOST_DEBIAN_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
# A stuck mirror must not hang CI: arm64 takes ~4 min here (its setup runs under qemu).
DEBOOTSTRAP_TIMEOUT = 30 * 60
APT_TIMEOUT = 10 * 60
# The interpreter of every root file system: Lambda's python3.13 runtime.
PYTHON_VERSION = "3.13"
PYTHON = f"python{PYTHON_VERSION}"


class RootfsError(Exception):
    """A root file system cannot be built or used on this machine."""


def _say(message: str) -> None:
    """Progress goes to stderr; stdout carries only the paths (for callers to read)."""
    print(message, file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "async-notifier" / "rootfs"


def host_arch() -> str:
    machine = platform.machine().lower()
    if machine not in HOST_DEBIAN_ARCH:
        raise RootfsError(f"no Debian architecture for this machine ({platform.machine()})")
    return HOST_DEBIAN_ARCH[machine]


def rootfs_path(arch: str, cache_dir: Path | None = None) -> Path:
    """Where the root file system for a Lambda architecture (x86_64 or arm64) is cached."""
    return (cache_dir or default_cache_dir()) / f"{SUITE}-{DEBIAN_ARCH[arch]}"


def _require_root() -> None:
    if os.geteuid() != 0:
        raise RootfsError("debootstrap, chroot and mount need root")


def _apt_install(packages: Sequence[str]) -> None:
    if not shutil.which("apt-get"):
        raise RootfsError(f"install {' '.join(packages)} (no apt-get on this machine)")
    _say(f"rootfs: apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=APT_TIMEOUT)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        check=True,
        env=env,
        timeout=APT_TIMEOUT,
    )


def _qemu_binary(debian_arch: str) -> Path:
    return Path(f"/usr/bin/qemu-{QEMU_ARCH[debian_arch]}-static")


def ensure_binfmt(debian_arch: str) -> None:
    """Let the kernel run `debian_arch` binaries through qemu-user, inside a chroot too.

    The F flag of Debian's entry makes the kernel open qemu when the entry is registered, so
    nothing needs copying into the root file system.
    """
    name = f"qemu-{QEMU_ARCH[debian_arch]}"
    if not _qemu_binary(debian_arch).is_file():
        _apt_install(["qemu-user-static"])
    if not (BINFMT_DIR / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], check=True)
    if not (BINFMT_DIR / name).exists():
        conf = Path(f"/usr/lib/binfmt.d/{name}.conf")
        if not conf.is_file():
            raise RootfsError(f"{conf} is missing: qemu-user-static did not install it")
        line = next(
            text.strip()
            for text in conf.read_text().splitlines()
            if text.strip() and not text.startswith("#")
        )
        with contextlib.suppress(FileExistsError):  # registered meanwhile, by another run
            (BINFMT_DIR / "register").write_text(line)
    status = (BINFMT_DIR / name).read_text()
    if not status.startswith("enabled"):
        raise RootfsError(f"binfmt_misc entry {name} is not enabled: {status.splitlines()[0]}")


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first (an interrupted debootstrap leaves some)."""
    prefix = str(path)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _remove(path: Path) -> None:
    """Delete a half-built root file system, after detaching whatever is mounted inside it."""
    for point in _mounts_under(path):
        subprocess.run(["umount", "--lazy", point], check=True)
    if _mounts_under(path):
        raise RootfsError(f"{path} still has mounts; remove it by hand")
    shutil.rmtree(path, ignore_errors=False)


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_python(root: Path) -> str:
    """The root file system's python3 runs (through qemu if foreign); return what it says."""
    completed = subprocess.run(
        [
            "chroot",
            str(root),
            PYTHON,
            "-c",
            "import platform, sys; print(platform.python_version(), platform.machine())",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if completed.returncode != 0:
        raise RootfsError(f"{PYTHON} does not run in {root}: {completed.stderr.strip()}")
    return completed.stdout.strip()


def ensure(arch: str, cache_dir: Path | None = None) -> Path:
    """The root file system for a Lambda architecture, built first if it is not cached."""
    _require_root()
    debian_arch = DEBIAN_ARCH[arch]
    foreign = debian_arch != host_arch()
    if foreign:
        ensure_binfmt(debian_arch)
    target = rootfs_path(arch, cache_dir)
    with _lock(target.with_name(f".{target.name}.lock")):
        if target.is_dir():
            if not (target / "usr" / "bin" / PYTHON).exists():
                raise RootfsError(f"{target} has no {PYTHON}: remove it to rebuild")
            _say(f"rootfs: {target} (cached)")
            return target
        if not shutil.which("debootstrap"):
            _apt_install(["debootstrap"])
        partial = target.with_name(target.name + ".partial")
        if partial.exists():
            _say(f"rootfs: removing the interrupted build {partial}")
            _remove(partial)
        command = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(INCLUDE)}",
            *([f"--arch={debian_arch}"] if foreign else []),
            SUITE,
            str(partial),
            MIRROR,
        ]
        _say(f"rootfs: {' '.join(command)}")
        started = time.monotonic()
        try:
            subprocess.run(command, check=True, timeout=DEBOOTSTRAP_TIMEOUT)
        except subprocess.CalledProcessError as exc:
            raise RootfsError(f"debootstrap failed (exit {exc.returncode}); see above") from exc
        except subprocess.TimeoutExpired as exc:
            raise RootfsError(f"debootstrap took over {DEBOOTSTRAP_TIMEOUT} s") from exc
        _say(f"rootfs: {_check_python(partial)} in {time.monotonic() - started:.0f} s")
        partial.rename(target)
        _say(f"rootfs: {target}")
        return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        action="append",
        choices=sorted(DEBIAN_ARCH),
        help="Lambda architecture (repeatable; default both)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where root file systems are kept (default {default_cache_dir()})",
    )
    args = parser.parse_args(argv)
    try:
        for arch in args.arch or sorted(DEBIAN_ARCH):
            print(ensure(arch, args.cache_dir))
    except (RootfsError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        _say(f"rootfs: error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
