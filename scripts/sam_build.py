#!/usr/bin/env python3
"""What `sam build` runs for a function (`make build-<LogicalId>`): make package's build,
unpacked into `$ARTIFACTS_DIR`, for the architecture and Python that SAM builds it for.

SAM hands a makefile build only `ARTIFACTS_DIR`: neither the function's architecture (the
template's `!Ref Architecture`, resolved from `--parameter-overrides` or its default) nor its
runtime. It does write both down before it builds, in `build.toml` beside the build
directory (`.aws-sam/build.toml`, one entry per function), so they are read from there: an
x86_64 stack gets x86_64 wheels, an arm64 one arm64 wheels, from `sam build` alone. An
explicit `--arch` or `--python-version` (make's ARCH and PYTHON_VERSION, when set) wins, with
a note when it differs; without SAM's entry (a build in a container) they, or package.py's
defaults, decide.

Usage: ARTIFACTS_DIR=DIR python scripts/sam_build.py LOGICAL_ID [--arch A] [--python-version V]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import package  # noqa: E402  (scripts/package.py, beside this file)


@dataclass(frozen=True)
class Target:
    arch: str
    python_version: str


def sam_target(artifacts_dir: Path, function: str) -> Target | None:
    """The architecture and Python of SAM's build definition of `function`, or None.

    ARTIFACTS_DIR is <build dir>/<LogicalId> (or, with --cached, <cache dir>/<uuid>); both
    sit beside build.toml's directory.
    """
    record = artifacts_dir.parent.parent / "build.toml"
    try:
        document = tomllib.loads(record.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    definitions = document.get("function_build_definitions", {})
    matches = [
        definition
        for uuid, definition in definitions.items()
        if uuid == artifacts_dir.name or function in definition.get("functions", [])
    ]
    if len(matches) != 1:
        return None
    (definition,) = matches
    runtime = re.fullmatch(r"python(3\.\d{1,2})", str(definition.get("runtime", "")))
    arch = definition.get("architecture")
    if runtime is None or arch not in package.ARCHES:
        return None
    return Target(arch, runtime[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("function", help="the function's logical id (NotifierFunction)")
    parser.add_argument("--arch", choices=sorted(package.ARCHES))
    parser.add_argument("--python-version")
    args = parser.parse_args(argv)
    artifacts = os.environ.get("ARTIFACTS_DIR", "")
    if not artifacts:
        parser.error("ARTIFACTS_DIR is not set: `sam build` runs this (make build-<LogicalId>)")
    artifacts_dir = Path(artifacts)
    sam = sam_target(artifacts_dir, args.function)
    arch = args.arch or (sam.arch if sam else package.DEFAULT_ARCH)
    python_version = args.python_version or (sam.python_version if sam else package.DEFAULT_PYTHON)
    if sam is None:
        print(f"sam build: SAM records no {args.function}; {arch}, CPython {python_version}")
    elif (arch, python_version) != (sam.arch, sam.python_version):
        print(
            f"sam build: note: building {args.function} for {arch}, CPython {python_version}, "
            f"as asked, while SAM builds it for {sam.arch}, python{sam.python_version}"
        )
    return package.main(
        ["--arch", arch, "--python-version", python_version, "--output-dir", str(artifacts_dir)]
    )


if __name__ == "__main__":
    sys.exit(main())
