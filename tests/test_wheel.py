"""`make test-wheel`: the sdist and the wheel are complete, and the wheel runs on its own.

`python -m build` makes the sdist and then the wheel *from that sdist*, so a file the sdist
leaves out is missing from the wheel too. The wheel is installed into a fresh virtualenv in
a temp dir, and every command runs there with that directory as its working directory and no
PYTHONPATH: nothing can come from the checkout. The dependencies are pinned to the versions
this test runs with (`pip freeze` as constraints, which pin but never add a package), so an
undeclared dependency still fails and the install comes from pip's cache.

The installed worker then renders emails from its packaged templates (`preview`, compared
with the checkout's own rendering) and drains a queue on moto into an SMTP sink (`run
--drain`), end to end. Marked `wheel` (not in `make test`): the builds and the install take
about half a minute.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from queues import Queues, client, counts, create_queues, notification, receive_all, send
from servers import MotoServer, SmtpSink, make_zip, s3_client, seed_objects

from async_notifier import __version__

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parent.parent
DIST_NAME = "async_notifier"
# Never inherited by the installed commands: each would let the checkout in.
_LEAKY_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")


@dataclass(frozen=True)
class Dists:
    source: Path  # the copy of the checkout they were built from
    sdist: Path
    wheel: Path


@dataclass(frozen=True)
class Venv:
    root: Path
    python: Path
    command: Path  # the async-notifier console script
    cwd: Path  # an empty directory outside the checkout


def _files(base: Path) -> set[str]:
    """Relative POSIX paths of the files under `base`, caches left out."""
    return {
        path.relative_to(base).as_posix()
        for path in base.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def _run(args: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command to completion; its output, or a failure that shows all of it."""
    environment = {k: v for k, v in (env or dict(os.environ)).items() if k not in _LEAKY_ENV}
    done = subprocess.run(
        [str(arg) for arg in args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, (
        f"{' '.join(map(str, args))} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def _copy_of_the_checkout(target: Path) -> Path:
    """The working tree's files as git sees them (tracked or new, not ignored): no stale
    egg-info, build/ or caches, which setuptools would otherwise read into the sdist."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT)
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # not a tracked file deleted in the working tree
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    source = _copy_of_the_checkout(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", out, source], cwd=out)
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    return Dists(source, sdist, wheel)


@pytest.fixture(scope="module")
def venv(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    root = tmp_path_factory.mktemp("venv")
    cwd = tmp_path_factory.mktemp("outside")
    assert not cwd.resolve().is_relative_to(ROOT)
    frozen = _run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], cwd=cwd)
    constraints = cwd / "constraints.txt"
    constraints.write_text("".join(f"{line}\n" for line in frozen.splitlines() if "==" in line))
    _run([sys.executable, "-m", "venv", root], cwd=cwd)
    python = root / "bin" / "python"
    _run(
        [python, "-m", "pip", "install", "--quiet", "--constraint", constraints, dists.wheel],
        cwd=cwd,
    )
    constraints.unlink()
    return Venv(root, python, root / "bin" / "async-notifier", cwd)


# --------------------------------------------------------------------------- the archives


def test_the_sdist_holds_what_the_wheel_is_built_from(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as archive:
        top = f"{DIST_NAME}-{__version__}/"
        names = {name.removeprefix(top) for name in archive.getnames()}
    expected = {
        "pyproject.toml",
        "MANIFEST.in",
        "README.md",
        "LICENSE",
        "CHANGELOG.md",
        *(f"async_notifier/{name}" for name in _files(dists.source / "async_notifier")),
        *(f"templates/{name}" for name in _files(dists.source / "templates")),
    }
    assert sorted(expected - names) == []


def test_the_wheel_holds_every_module_the_templates_and_the_licence(dists: Dists) -> None:
    assert dists.wheel.name == f"{DIST_NAME}-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(dists.wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"{DIST_NAME}-{__version__}.dist-info/METADATA").decode()
        entry_points = archive.read(f"{DIST_NAME}-{__version__}.dist-info/entry_points.txt")
    info = f"{DIST_NAME}-{__version__}.dist-info/"
    expected = {
        *(f"async_notifier/{name}" for name in _files(dists.source / "async_notifier")),
        *(f"async_notifier/templates/{name}" for name in _files(dists.source / "templates")),
        f"{info}licenses/LICENSE",
    }
    assert {"async_notifier/py.typed", "async_notifier/templates/base.html"} <= expected
    assert sorted(expected - names) == []
    # Nothing but the package and its metadata: no top-level templates/, tests or handler.py.
    assert {name for name in names if not name.startswith(("async_notifier/", info))} == set()
    fields = email.message_from_string(metadata, policy=email.policy.compat32)
    assert fields["Version"] == __version__
    assert fields["License-Expression"] == "MIT"
    assert fields.get_all("Provides-Extra") == ["local"]
    assert {label.split(",")[0] for label in fields.get_all("Project-URL")} == {
        "Homepage",
        "Documentation",
        "Changelog",
        "Issues",
    }
    assert b"async-notifier = async_notifier.__main__:main" in entry_points


# --------------------------------------------------------------------------- the installed wheel


def test_installed_from_the_wheel_not_the_checkout(venv: Venv) -> None:
    where = _run(
        [
            venv.python,
            "-c",
            "import async_notifier, async_notifier.config as c; "
            "print(async_notifier.__file__); print(c.DEFAULT_TEMPLATES_DIR)",
        ],
        cwd=venv.cwd,
    ).split()
    module, templates = (Path(line) for line in where)
    site_packages = module.parent.parent
    assert module.is_relative_to(venv.root)
    assert site_packages.name == "site-packages"
    assert templates == site_packages / "async_notifier" / "templates"


def test_version(venv: Venv) -> None:
    assert _run([venv.command, "--version"], cwd=venv.cwd) == f"async-notifier {__version__}\n"


@pytest.mark.parametrize(
    ("status", "locale"), [("COMPLETED", "pt-BR"), ("FAILED", "en"), ("COMPLETED", "en")]
)
def test_preview_renders_the_packaged_templates(venv: Venv, status: str, locale: str) -> None:
    """The installed command's email is the checkout's, byte for byte (bar the .eml, whose
    Date and Message-ID differ per run)."""
    options = ["preview", "--status", status, "--locale", locale, "--out"]
    installed = _run([venv.command, *options, venv.cwd / "installed"], cwd=venv.cwd)
    checkout = _run(
        [sys.executable, "-m", "async_notifier", *options, venv.cwd / "checkout"], cwd=ROOT
    )
    assert installed.splitlines()[0] == checkout.splitlines()[0]
    assert installed.startswith("Subject: ")
    stem = f"{status.lower()}-{locale}"
    for suffix in (".html", ".txt"):
        made = (venv.cwd / "installed" / stem).with_suffix(suffix).read_text()
        assert made == (venv.cwd / "checkout" / stem).with_suffix(suffix).read_text()
    assert (venv.cwd / "installed" / stem).with_suffix(".eml").is_file()


@pytest.fixture
def sqs(aws: MotoServer) -> Any:
    return client("sqs", aws.endpoint_url)


@pytest.fixture
def queues(sqs: Any) -> Queues:
    return create_queues(sqs, visibility_timeout=30, max_receive_count=2, prefix="wheel")


def test_run_drains_a_queue_end_to_end(
    venv: Venv,
    runner_env: dict[str, str],
    aws: MotoServer,
    bucket: str,
    smtp_sink: SmtpSink,
    sqs: Any,
    queues: Queues,
) -> None:
    frames = make_zip(20_000, seed=7)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v1/v1.zip": frames})
    completed = notification(
        "v1", bucket=bucket, key="v1/v1.zip", email="ana@example.com", locale="pt-BR"
    )
    send(sqs, queues.url, {**completed, "file_name": "ferias.mp4"})
    send(sqs, queues.url, notification("v2", status="FAILED", email="bo@example.com"))
    assert "TEMPLATES_DIR" not in os.environ

    _run(
        [
            venv.command,
            "run",
            "--queue-url",
            queues.url,
            "--drain",
            "--wait-time",
            "1",
            "--batch-window",
            "0",
            "--batch-timeout",
            "60",
        ],
        cwd=venv.cwd,
    )

    sent = {
        message["To"].addresses[0].addr_spec: message
        for message in smtp_sink.parsed()
        if isinstance(message, EmailMessage)
    }
    assert sorted(sent) == ["ana@example.com", "bo@example.com"]
    assert sent["ana@example.com"]["Subject"] == "Seus frames de ferias.mp4 estão prontos"
    [attachment] = sent["ana@example.com"].iter_attachments()
    assert attachment.get_content() == frames
    assert str(sent["bo@example.com"]["Subject"]).startswith("We could not process ")
    assert counts(sqs, queues.url) == dict.fromkeys(counts(sqs, queues.url), 0)
    assert receive_all(sqs, queues.dlq_url) == []
