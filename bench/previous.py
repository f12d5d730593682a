"""The code of the `previous` target: what `--vs REF` measures the working tree against.

`handler.py`, `async_notifier/`, `templates/` and `requirements.txt` come from
`git archive REF` into the work dir, next to a copy of the *current* harness (`bench/`),
so both trees run under the same measurement code, in the same venv. The harness only ever
calls `handler.lambda_handler`: the package layout differs between commits.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .procs import ROOT

# What a target runs, as `snapshot_code` copies it for `project` (bench/ comes from there).
CODE = ("handler.py", "async_notifier", "templates", "requirements.txt")


class RefError(Exception):
    """REF is not a commit of this repository, or its tree has no handler."""


@dataclass(frozen=True)
class Ref:
    """A resolved `--vs` argument."""

    ref: str  # as given: HEAD, main~3, a sha
    sha: str
    short: str
    subject: str


def _git(*args: str) -> str:
    try:
        completed = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RefError(f"git {' '.join(args)}: {exc}") from exc
    if completed.returncode != 0:
        raise RefError(f"git {' '.join(args)}: {completed.stderr.strip()}")
    return completed.stdout


def resolve(ref: str) -> Ref:
    """The commit REF names now, checked before anything starts: it must have a handler."""
    try:
        sha = _git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}")
    except RefError as exc:
        raise RefError(f"--vs {ref!r} is not a commit of {ROOT}") from exc
    sha = sha.strip()
    try:
        _git("cat-file", "-e", f"{sha}:handler.py")
    except RefError as exc:
        raise RefError(f"--vs {ref!r}: that commit has no handler.py at its root") from exc
    short, _, subject = _git("log", "-1", "--format=%h%x00%s", sha).rstrip("\n").partition("\0")
    return Ref(ref=ref, sha=sha, short=short, subject=subject)


def extract(ref: Ref, dest: Path, harness: Path) -> Path:
    """Write REF's handler, package, templates and requirements to `dest`, with `harness`."""
    present = _git("ls-tree", "--name-only", ref.sha, "--", *CODE).split()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref.sha, "--", *present],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    if archive.returncode != 0:
        raise RefError(f"git archive {ref.short}: {archive.stderr.decode(errors='replace')}")
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    shutil.copytree(harness, dest / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def same_requirements(tree: Path, other: Path) -> bool:
    """Whether both trees ask for the same packages (both run in this one venv)."""
    mine, theirs = tree / "requirements.txt", other / "requirements.txt"
    if not (mine.exists() and theirs.exists()):
        return mine.exists() == theirs.exists()
    return mine.read_bytes() == theirs.read_bytes()


def knows_setting(tree: Path, name: str) -> bool:
    """Whether the tree's code reads the environment variable `name`: its name, quoted, in
    one of its modules (a REF from before a setting existed would silently ignore it)."""
    quoted = (f'"{name}"', f"'{name}'")
    for path in [tree / "handler.py", *(tree / "async_notifier").rglob("*.py")]:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if any(q in text for q in quoted):
            return True
    return False
