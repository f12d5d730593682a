#!/usr/bin/env python3
"""Build the Lambda deployment package: `dist/deployment-package.zip` (`make package`).

The zip holds, at its root, the runtime dependencies exactly as requirements.lock pins them
(every transitive one, `make lock`), built for the Lambda runtime: binary wheels for CPython
3.13 on arm64 or x86_64, fetched with `pip install --require-hashes --no-deps --platform ...
--only-binary=:all: --target`. Then the `async_notifier` package (without
`async_notifier/local/`, the dev demo, which needs moto and aiosmtpd), `handler.py` and
`templates/`.

The lock's environment markers are evaluated here, for the target (pip would evaluate them
for the interpreter running it, not for --python-version and --platform). The build refuses a
lock that disagrees with a direct pin of requirements.txt, and an install in which a
dependency requires something the lock does not provide for the target.

It is reproducible: every wheel is the one whose sha256 the lock names, and the zip's entries
are sorted, every timestamp 1980-01-01 (or SOURCE_DATE_EPOCH), modes 0644 for files and 0755
for directories. So the same lock, sources, architecture and Python version give the same
sha256 from an empty cache or a warm one, today or later. Tests, caches, type stubs, Cython
sources, console scripts and the dist-info files nothing reads at run time are left out; each
dist-info keeps METADATA (dnspython and others call importlib.metadata.version at import),
entry_points.txt and its licence files.

The dependency install is cached under build/package/, keyed by the lock's content, the
platform and the Python version, so a second build only zips. The build fails when the zip is
over 50 MiB or its contents over 250 MiB (Lambda's limits for a direct upload and for the
unzipped function).

`--output-dir DIR` writes the same files unpacked into DIR instead of the zip: what
`sam build` runs (`make build-NotifierFunction`), SAM zipping `$ARTIFACTS_DIR` itself.

Usage: python scripts/package.py [--arch arm64|x86_64] [--python-version 3.13]
                                 [--output dist/deployment-package.zip | --output-dir DIR]
                                 [--refresh] [--cache-dir build/package]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import NamedTuple

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # outside the dev venv: pip, which the build needs anyway, vendors it
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# The direct pins (edited by hand) and every dependency they pull in, with hashes (make lock).
REQUIREMENTS = ROOT / "requirements.txt"
LOCK = ROOT / "requirements.lock"
MIB = 1024 * 1024
# Lambda: 50 MB for a zip uploaded directly, 250 MB for the unzipped function (and layers).
# AWS counts these in binary megabytes: the API refuses more than 262,144,000 bytes unzipped.
MAX_ZIPPED_BYTES = 50 * MIB
MAX_UNZIPPED_BYTES = 250 * MIB
ARCHES = {"arm64": "aarch64", "x86_64": "x86_64"}
# The python3.12 and python3.13 runtimes run on Amazon Linux 2023, glibc 2.34: any manylinux
# wheel up to manylinux_2_34 runs there. pip does not widen a --platform to older manylinux
# versions (bar manylinux2014's own aliases), so every one is listed; css-inline ships aarch64
# only as manylinux_2_24, for instance.
LAMBDA_GLIBC_MINOR = 34
DEFAULT_ARCH = "arm64"
# Lambda's python3.13 runtime (template.yaml's Runtime follows it).
DEFAULT_PYTHON = "3.13"
FILE_MODE = 0o644
DIR_MODE = 0o755
ZIP_EPOCH = 315532800  # 1980-01-01T00:00:00Z, the earliest time a ZIP entry can hold
# Bump when the shape of the cached dependency install changes.
CACHE_FORMAT = "2"

# Never imported or read at run time.
_SKIP_DIRS = frozenset({"__pycache__", "tests", "test"})
_SKIP_SUFFIXES = frozenset({".pyc", ".pyo", ".pyi", ".pyx", ".pxd", ".pxi", ".c", ".h"})
# Of a dependency's dist-info: METADATA (importlib.metadata.version), entry points and licences.
_KEEP_DIST_INFO = frozenset({"METADATA", "entry_points.txt"})
_LICENCE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")


class PackageError(Exception):
    """The package cannot be built, or breaks Lambda's limits."""


def platform_tags(arch: str) -> list[str]:
    """The wheel platforms Lambda can load, newest first (pip prefers earlier ones)."""
    machine = ARCHES[arch]
    newer = [f"manylinux_2_{minor}_{machine}" for minor in range(LAMBDA_GLIBC_MINOR, 16, -1)]
    return [*newer, f"manylinux2014_{machine}"]


class Pin(NamedTuple):
    """One entry of the lock: `name==version`, the marker it holds under, its hashes.

    (A NamedTuple, not a dataclass: the tests load this script by path, unregistered in
    sys.modules, where a dataclass cannot resolve its string annotations.)
    """

    requirement: Requirement
    hashes: tuple[str, ...]

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    @property
    def version(self) -> str:
        return next(iter(self.requirement.specifier)).version

    def line(self) -> str:
        """The pin for pip, without its marker (evaluated by `for_target`)."""
        hashes = " ".join(f"--hash={digest}" for digest in self.hashes)
        return f"{self.requirement.name}=={self.version} {hashes}"


def _logical_lines(text: str) -> Iterator[str]:
    """A requirements file's lines, continuations joined and comments dropped."""
    pending = ""
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw)
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined = " ".join((pending + line).split())
        pending = ""
        if joined:
            yield joined


def read_requirements(path: Path) -> list[Requirement]:
    """requirements.txt's direct requirements (the file holds nothing but requirements)."""
    try:
        return [Requirement(line) for line in _logical_lines(path.read_text())]
    except InvalidRequirement as exc:
        raise PackageError(f"{path.name}: {exc}") from None


def read_lock(path: Path) -> list[Pin]:
    """The lock's pins; anything but a hash-pinned `name==version [; marker]` is refused."""
    pins = []
    for line in _logical_lines(path.read_text()):
        words = line.split(" ")
        hashes = tuple(word.removeprefix("--hash=") for word in words if word.startswith("--hash="))
        rest = " ".join(word for word in words if not word.startswith("--hash="))
        try:
            requirement = Requirement(rest)
        except InvalidRequirement:
            requirement = None
        specifiers = list(requirement.specifier) if requirement else []
        if (
            requirement is None
            or rest.startswith("-")
            or requirement.url
            or requirement.extras
            or len(specifiers) != 1
            or specifiers[0].operator != "=="
            or not hashes
        ):
            raise PackageError(
                f"{path.name}: not a hash-pinned name==version: {line[:80]!r} (run make lock)"
            )
        pins.append(Pin(requirement, hashes))
    return pins


def stale_pins(requirements: Sequence[Requirement], pins: Sequence[Pin]) -> list[str]:
    """Direct requirements the lock lacks or pins to a version they do not allow."""
    locked = {pin.name: pin.version for pin in pins}
    problems = []
    for requirement in requirements:
        version = locked.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement} but the lock has {version}")
    return problems


def target_environment(arch: str, python_version: str) -> dict[str, str]:
    """PEP 508 marker values on Lambda: Linux, CPython `python_version`, this processor."""
    full = f"{python_version}.0"  # markers that tell patch releases apart are not expected
    return {
        "implementation_name": "cpython",
        "implementation_version": full,
        "os_name": "posix",
        "platform_machine": ARCHES[arch],
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": full,
        "python_version": python_version,
        "sys_platform": "linux",
    }


def for_target(pins: Sequence[Pin], environment: Mapping[str, str]) -> list[Pin]:
    """The pins whose marker holds in `environment` (all of them when none has a marker)."""
    return [
        pin
        for pin in pins
        if pin.requirement.marker is None or pin.requirement.marker.evaluate(dict(environment))
    ]


def unmet_dependencies(deps: Path, environment: Mapping[str, str]) -> list[str]:
    """What the distributions installed in `deps` require and the others do not provide.

    pip's --no-deps installs the lock's pins and nothing else, so a dependency the lock
    lacks for this target (or pins outside a requirer's range) would go unnoticed until
    import. Extras are followed: `aiobotocore[boto3]` requires boto3 too.
    """
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist
        for dist in metadata.distributions(path=[str(deps)])
    }
    problems: set[str] = set()
    todo = [(name, "") for name in installed]
    seen: set[tuple[str, str]] = set()
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        for line in installed[name].requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and not marker.evaluate({**environment, "extra": extra}):
                continue
            wanted = canonicalize_name(requirement.name)
            found = installed.get(wanted)
            if found is None:
                problems.add(f"{name} requires {requirement}, which the lock does not pin")
            elif not requirement.specifier.contains(found.version, prereleases=True):
                problems.add(f"{name} requires {requirement}, the lock pins {found.version}")
            else:
                todo.extend((wanted, wanted_extra) for wanted_extra in requirement.extras)
    return sorted(problems)


def install_dependencies(
    requirements: Path,
    *,
    arch: str,
    python_version: str,
    cache_root: Path,
    refresh: bool = False,
    locked: bool = False,
) -> Path:
    """Install requirements for the target platform into a cached directory and return it.

    `locked`: `requirements` is a lock (requirements.lock): its pins for this target are
    installed alone (--no-deps) and hash-checked, and must meet each other's requirements.
    Otherwise pip resolves `requirements` itself (the runtime client of the tests).
    """
    tags = platform_tags(arch)
    key_source = "\n".join([CACHE_FORMAT, *tags, python_version, requirements.read_text()])
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    prefix = f"deps-py{python_version}-{arch}-"
    target = cache_root / f"{prefix}{key}"
    marker = target / ".complete"
    if marker.is_file() and not refresh:
        print(f"dependencies: cached in {_show(target)}")
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = cache_root / f".staging-{target.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    environment = target_environment(arch, python_version)
    pins = for_target(read_lock(requirements), environment) if locked else None
    options = ["--require-hashes", "--no-deps"] if locked else []
    print(
        f"dependencies: pip install {' '.join([*options, '-r', requirements.name])} for CPython "
        f"{python_version} on {arch} ({tags[-1]} to {tags[0]})"
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".requirements-", dir=cache_root) as scratch:
        requirement_file = requirements
        if pins is not None:  # markers evaluated here, for the target, not by pip
            requirement_file = Path(scratch, requirements.name)
            requirement_file.write_text("".join(f"{pin.line()}\n" for pin in pins))
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--no-compile",
            "--target",
            str(staging),
            *(option for tag in tags for option in ("--platform", tag)),
            "--implementation",
            "cp",
            "--python-version",
            python_version,
            "--only-binary=:all:",
            *options,
            "-r",
            str(requirement_file),
        ]
        try:
            subprocess.run(command, check=True)
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise PackageError(
                f"pip install failed (exit {exc.returncode}); a dependency without a binary "
                f"wheel for CPython {python_version} on {arch} (manylinux up to glibc "
                f"2.{LAMBDA_GLIBC_MINOR}) cannot be packaged: pin a version that has one"
                + (", and every file must have a sha256 the lock lists" if locked else "")
            ) from exc
    unmet = unmet_dependencies(staging, environment) if locked else []
    if unmet:
        shutil.rmtree(staging, ignore_errors=True)
        raise PackageError(
            f"{requirements.name} is incomplete for CPython {python_version} on {arch}: "
            + "; ".join(unmet)
            + " (run make lock)"
        )
    marker_tmp = staging / ".complete"
    marker_tmp.write_text(key_source)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    # Older installs for the same interpreter and arch are stale: the lock changed.
    for old in cache_root.glob(f"{prefix}*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    print(f"dependencies: installed in {time.monotonic() - started:.1f} s")
    return target


def _is_licence(name: str) -> bool:
    return name.upper().startswith(_LICENCE_PREFIXES)


def _skipped(relative: PurePosixPath) -> bool:
    """Files of the dependency tree that are not needed at run time."""
    parts = relative.parts
    if parts[0] == "bin" or relative.suffix in _SKIP_SUFFIXES:
        return True
    if any(part in _SKIP_DIRS for part in parts[:-1]):
        return True
    if parts[0].endswith(".dist-info"):
        inner = parts[1:]
        if inner and inner[0] == "licenses":
            return False
        return not (len(inner) == 1 and (inner[0] in _KEEP_DIST_INFO or _is_licence(inner[0])))
    return False


def _walk(base: Path) -> Iterator[tuple[PurePosixPath, Path]]:
    for directory, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(directory, name)
            yield PurePosixPath(path.relative_to(base).as_posix()), path


def dependency_files(deps: Path) -> dict[str, Path]:
    return {
        str(relative): path
        for relative, path in _walk(deps)
        if relative.name != ".complete" and not _skipped(relative)
    }


def project_files(root: Path) -> dict[str, Path]:
    """handler.py, the async_notifier package without local/, and templates/."""
    files = {"handler.py": root / "handler.py"}
    for top in ("async_notifier", "templates"):
        for relative, path in _walk(root / top):
            parts = relative.parts
            if top == "async_notifier" and parts[0] == "local":
                continue
            if any(part == "__pycache__" or part.startswith(".") for part in parts):
                continue
            if relative.suffix in (".pyc", ".pyo"):
                continue
            files[f"{top}/{relative}"] = path
    for name, path in files.items():
        if not path.is_file():
            raise PackageError(f"missing project file: {name}")
    return files


def write_zip(files: dict[str, Path], output: Path, *, epoch: int) -> int:
    """Write a reproducible zip of `files` (arcname -> path); return the unzipped size."""
    date_time = time.gmtime(max(epoch, ZIP_EPOCH))[:6]
    directories = {
        f"{parent}/"
        for name in files
        for parent in PurePosixPath(name).parents
        if str(parent) != "."
    }
    unzipped = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with zipfile.ZipFile(partial, "w") as archive:
        for name in sorted(directories | set(files)):
            info = zipfile.ZipInfo(name, date_time=date_time)
            info.create_system = 3  # Unix, so the modes below are honoured when unpacked
            if name in directories:
                info.external_attr = ((stat.S_IFDIR | DIR_MODE) << 16) | 0x10  # MS-DOS dir bit
                archive.writestr(info, b"")
                continue
            data = files[name].read_bytes()
            unzipped += len(data)
            info.external_attr = (stat.S_IFREG | FILE_MODE) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data, compresslevel=6)
    partial.replace(output)
    return unzipped


def write_tree(files: dict[str, Path], directory: Path, *, epoch: int) -> int:
    """Write `files` (arcname -> path) into `directory` as the zip would unpack them (same
    modes and dates); return their size. The directory must be empty or absent: a file left
    there by another build would ship unnoticed."""
    if directory.exists() and any(directory.iterdir()):
        raise PackageError(f"{_show(directory)} is not empty")
    stamp = max(epoch, ZIP_EPOCH)
    size = 0
    for name in sorted(files):
        target = directory / name
        target.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        data = files[name].read_bytes()
        target.write_bytes(data)
        target.chmod(FILE_MODE)
        os.utime(target, (stamp, stamp))
        size += len(data)
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_dir():
            path.chmod(DIR_MODE)
            os.utime(path, (stamp, stamp))
    return size


def _build_tree(files: dict[str, Path], directory: Path, *, epoch: int, what: str) -> str:
    """The unpacked package in `directory`; its sha256 is over the names and contents."""
    unzipped = write_tree(files, directory, epoch=epoch)
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{_sha256(files[name])}\n".encode())
    print(f"package:  {_show(directory)}/ ({len(files)} files, {what})")
    print(f"unzipped: {_mib(unzipped)}, limit {_mib(MAX_UNZIPPED_BYTES)}")
    if unzipped > MAX_UNZIPPED_BYTES:
        raise PackageError(
            f"the unzipped package is {_mib(unzipped)}, over Lambda's {_mib(MAX_UNZIPPED_BYTES)}"
        )
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _show(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB ({size:,} bytes)"


def _distributions(deps: Path) -> list[str]:
    names = []
    for info in sorted(deps.glob("*.dist-info")):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        names.append(f"{name} {version}")
    return names


def build(
    *,
    arch: str,
    python_version: str,
    output: Path,
    cache_root: Path,
    refresh: bool = False,
    epoch: int = ZIP_EPOCH,
    output_dir: Path | None = None,
) -> str:
    """Build the package and return its sha256; raise PackageError when it cannot be used.
    With `output_dir`, the files are written there unpacked instead of zipped to `output`."""
    started = time.monotonic()
    stale = stale_pins(read_requirements(REQUIREMENTS), read_lock(LOCK))
    if stale:
        raise PackageError(
            f"{LOCK.name} disagrees with {REQUIREMENTS.name}: {'; '.join(stale)} (run make lock)"
        )
    deps = install_dependencies(
        LOCK,
        arch=arch,
        python_version=python_version,
        cache_root=cache_root,
        refresh=refresh,
        locked=True,
    )
    print("vendored: " + ", ".join(_distributions(deps)))
    files = dependency_files(deps)
    own = project_files(ROOT)
    clash = sorted(set(files) & set(own))
    if clash:
        raise PackageError(f"a dependency ships files of this project: {', '.join(clash)}")
    files.update(own)
    if output_dir is not None:
        what = f"CPython {python_version}, {arch}"
        tree_sha256 = _build_tree(files, output_dir, epoch=epoch, what=what)
        print(f"built in {time.monotonic() - started:.1f} s")
        return tree_sha256
    unzipped = write_zip(files, output, epoch=epoch)
    zipped = output.stat().st_size
    sha256 = _sha256(output)
    print(f"package:  {_show(output)} ({len(files)} files, CPython {python_version}, {arch})")
    print(f"zipped:   {_mib(zipped)}, limit {_mib(MAX_ZIPPED_BYTES)}")
    print(f"unzipped: {_mib(unzipped)}, limit {_mib(MAX_UNZIPPED_BYTES)}")
    print(f"sha256:   {sha256}")
    print(f"built in {time.monotonic() - started:.1f} s")
    problems = []
    if zipped > MAX_ZIPPED_BYTES:
        problems.append(f"the zip is {_mib(zipped)}, over Lambda's {_mib(MAX_ZIPPED_BYTES)}")
    if unzipped > MAX_UNZIPPED_BYTES:
        problems.append(
            f"the unzipped package is {_mib(unzipped)}, over Lambda's {_mib(MAX_UNZIPPED_BYTES)}"
        )
    if problems:
        output.unlink()
        raise PackageError("; ".join(problems))
    return sha256


def _source_date_epoch() -> int:
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return ZIP_EPOCH
    try:
        return int(raw)
    except ValueError:
        raise PackageError(f"SOURCE_DATE_EPOCH must be an integer, got {raw!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        choices=sorted(ARCHES),
        default=DEFAULT_ARCH,
        help=f"Lambda architecture (default {DEFAULT_ARCH})",
    )
    parser.add_argument(
        "--python-version",
        default=DEFAULT_PYTHON,
        help=f"CPython version the wheels are for (default {DEFAULT_PYTHON}, Lambda's "
        f"python{DEFAULT_PYTHON})",
    )
    destination = parser.add_mutually_exclusive_group()
    destination.add_argument(
        "--output",
        type=Path,
        default=ROOT / "dist" / "deployment-package.zip",
        help="where to write the zip (default dist/deployment-package.zip)",
    )
    destination.add_argument(
        "--output-dir",
        type=Path,
        help="write the files unpacked into this empty directory instead (sam build)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=ROOT / "build" / "package",
        help="where dependency installs are cached (default build/package)",
    )
    parser.add_argument(
        "--refresh", action="store_true", help="reinstall the dependencies, ignoring the cache"
    )
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d{1,2}", args.python_version):
        parser.error(f"--python-version must look like 3.13, got {args.python_version!r}")
    try:
        build(
            arch=args.arch,
            python_version=args.python_version,
            output=args.output,
            cache_root=args.cache_dir,
            refresh=args.refresh,
            epoch=_source_date_epoch(),
            output_dir=args.output_dir,
        )
    except PackageError as exc:
        print(f"package: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
