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

The real mail servers of `make test-mta` (Postfix and Exim) come from the same machinery: each
in its own trixie root file system for this machine's architecture,
`mta-<postfix|exim>-trixie-<arch>`: a minimal trixie, then the MTA's packages installed by the
chroot's own apt-get (debootstrap's `--include` cannot order exim4's dependencies: it takes the
first alternative of `cron | cron-daemon`, which drags in systemd, and fails), with a
policy-rc.d that keeps every service from starting. Debian's packages for the two MTAs conflict
(both provide mail-transport-agent), so one root file system each keeps them apart, and keeps
this machine free of an MTA.

Usage: python scripts/rootfs.py [--arch x86_64|arm64]... [--mta postfix|exim]... [--cache-dir DIR]
Prints the path of each root file system, building it first if it is not cached (both Lambda
architectures when neither option is given).
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
from collections.abc import Callable, Iterator, Sequence
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
# The MTAs of `make test-mta`, each in a root file system of its own; the file whose presence
# proves the build complete.
MTA_PACKAGES = {"postfix": ("postfix",), "exim": ("exim4-daemon-light",)}
MTA_BINARY = {"postfix": "usr/sbin/postfix", "exim": "usr/sbin/exim4"}
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


def mta_rootfs_path(mta: str, cache_dir: Path | None = None) -> Path:
    """Where the root file system with an MTA (postfix or exim) is cached."""
    return (cache_dir or default_cache_dir()) / f"mta-{mta}-{SUITE}-{host_arch()}"


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


# Run by /bin/sh inside `unshare --mount`: /proc for dpkg's scripts, then apt-get in the chroot.
# The mount vanishes with the namespace. policy-rc.d (exit 101) forbids starting any service.
_APT_INSIDE_SCRIPT = r"""
set -e
root=$1
shift
mount -t proc proc "$root/proc"
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
chroot "$root" apt-get update -qq
chroot "$root" apt-get install -y -qq --no-install-recommends "$@"
chroot "$root" apt-get clean
rm -f "$root/usr/sbin/policy-rc.d"
"""


def _apt_install_inside(root: Path, packages: Sequence[str]) -> None:
    """apt-get install `packages` in the root file system, starting none of their services."""
    _say(f"rootfs: apt-get install {' '.join(packages)} in {root}")
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C",
    }
    command = ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c"]
    try:
        subprocess.run(
            [*command, _APT_INSIDE_SCRIPT, "sh", str(root), *packages],
            check=True,
            env=env,
            timeout=APT_TIMEOUT,
        )
    except subprocess.CalledProcessError as exc:
        raise RootfsError(f"apt-get in {root} failed (exit {exc.returncode}); see above") from exc
    except subprocess.TimeoutExpired as exc:
        raise RootfsError(f"apt-get in {root} took over {APT_TIMEOUT} s") from exc


def _build(
    target: Path,
    *,
    include: Sequence[str],
    complete: str,
    install: Sequence[str] = (),
    debian_arch: str | None = None,
    check: Callable[[Path], str] | None = None,
) -> Path:
    """`target`, built by debootstrap with `include` (then `install` by apt-get inside) unless
    cached; `complete` is a path inside it whose presence shows a finished build.
    `debian_arch` is given for a foreign one."""
    with _lock(target.with_name(f".{target.name}.lock")):
        if target.is_dir():
            if not (target / complete).exists():
                raise RootfsError(f"{target} has no /{complete}: remove it to rebuild")
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
            *([f"--include={','.join(include)}"] if include else []),
            *([f"--arch={debian_arch}"] if debian_arch else []),
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
        if install:
            _apt_install_inside(partial, install)
        if not (partial / complete).exists():
            raise RootfsError(f"debootstrap left no /{complete} in {partial}")
        checked = check(partial) if check else complete
        _say(f"rootfs: {checked} in {time.monotonic() - started:.0f} s")
        partial.rename(target)
        _say(f"rootfs: {target}")
        return target


def ensure(arch: str, cache_dir: Path | None = None) -> Path:
    """The root file system for a Lambda architecture, built first if it is not cached."""
    _require_root()
    debian_arch = DEBIAN_ARCH[arch]
    foreign = debian_arch != host_arch()
    if foreign:
        ensure_binfmt(debian_arch)
    return _build(
        rootfs_path(arch, cache_dir),
        include=INCLUDE,
        complete=f"usr/bin/{PYTHON}",
        debian_arch=debian_arch if foreign else None,
        check=_check_python,
    )


def ensure_mta(mta: str, cache_dir: Path | None = None) -> Path:
    """The root file system with an MTA installed (not configured, not running), built first
    if it is not cached."""
    _require_root()
    if mta not in MTA_PACKAGES:
        raise RootfsError(f"unknown MTA {mta!r} (known: {', '.join(sorted(MTA_PACKAGES))})")
    return _build(
        mta_rootfs_path(mta, cache_dir),
        include=(),
        install=MTA_PACKAGES[mta],
        complete=MTA_BINARY[mta],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        action="append",
        choices=sorted(DEBIAN_ARCH),
        help="Lambda architecture (repeatable; default both)",
    )
    parser.add_argument(
        "--mta",
        action="append",
        choices=sorted(MTA_PACKAGES),
        help="a root file system with this MTA, for make test-mta (repeatable)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where root file systems are kept (default {default_cache_dir()})",
    )
    args = parser.parse_args(argv)
    try:
        for arch in args.arch or ([] if args.mta else sorted(DEBIAN_ARCH)):
            print(ensure(arch, args.cache_dir))
        for mta in args.mta or []:
            print(ensure_mta(mta, args.cache_dir))
    except (RootfsError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        _say(f"rootfs: error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
