"""`make package`: the deployment zip is reproducible, lean, and runs on its own.

The zip targets Lambda's CPython 3.13; binary wheels for 3.13 do not import on the 3.11 that
may run these tests, so they build it for the running interpreter and this machine's
architecture (`scripts/package.py --python-version --arch`): the same code path, other wheels.
The unpacked zip is then imported by a clean interpreter (`-I -S`: no site-packages, no
environment, nothing but the zip's directory and the standard library on sys.path), which
runs the handler on an empty batch and on a real one against moto and an SMTP sink.
tests/test_runtime.py runs the real 3.13 zips on CPython 3.13 (`make test-runtime`).
The `cold_build` test (`make test-cold-build`, downloads every wheel) builds the real targets
twice from empty caches; the others share build/package/ and reuse its installs.
"""

from __future__ import annotations

import contextlib
import email
import hashlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from package_cache import one_build_at_a_time
from packaging.utils import canonicalize_name
from servers import MotoServer, SmtpSink, make_zip, s3_client, seed_objects, sqs_record

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "package.py"
# Lambda's python3.13 runtime: the default of `make package` and of scripts/package.py.
LAMBDA_PYTHON = "3.13"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(
    platform.machine().lower()
)

# Run by `python -I -S -c RUNNER <unpacked dir>` with the event as JSON on stdin.
RUNNER = r"""
import json, sys, sysconfig
root = sys.argv[1]
sys.path.insert(0, root)
assert not any("site-packages" in p or "dist-packages" in p for p in sys.path), sys.path

import handler

class Context:
    aws_request_id = "test-request"
    def get_remaining_time_in_millis(self):
        return 60_000

result = handler.lambda_handler(json.load(sys.stdin), Context())
handler.reset()
stdlib = (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"])
outside = sorted(
    name
    for name, module in list(sys.modules.items())
    if getattr(module, "__file__", None)
    and not module.__file__.startswith((root, *stdlib))
)
print(json.dumps({"result": result, "outside": outside}))
"""


@dataclass(frozen=True)
class Build:
    path: Path
    sha256: str
    stdout: str


def _build(
    output: Path,
    *,
    arch: str | None = ARCH,
    python_version: str = PYTHON_VERSION,
    cache_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Build:
    """Run scripts/package.py; with `cache_dir`, on that private cache instead of build/package/
    (so without the lock that shared cache needs)."""
    options = ["--cache-dir", str(cache_dir)] if cache_dir is not None else []
    shared = one_build_at_a_time() if cache_dir is None else contextlib.nullcontext()
    with shared:
        completed = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--arch",
                str(arch),
                "--python-version",
                python_version,
                "--output",
                str(output),
                *options,
            ],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=600,
        )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    printed = [
        line.split()[-1] for line in completed.stdout.splitlines() if line.startswith("sha256:")
    ]
    assert len(printed) == 1, completed.stdout
    return Build(output, printed[0], completed.stdout)


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Build, Build]:
    if ARCH is None:
        pytest.fail(f"no Lambda architecture for this machine ({platform.machine()})")
    directory = tmp_path_factory.mktemp("package")
    # The second build reuses the first one's cached dependency install (build/package/).
    return _build(directory / "first.zip"), _build(directory / "second.zip")


@pytest.fixture(scope="module")
def unpacked(builds: tuple[Build, Build], tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(builds[0].path) as archive:
        archive.extractall(target)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_builds_are_byte_identical(builds: tuple[Build, Build]) -> None:
    first, second = builds
    assert _sha256(first.path) == first.sha256
    assert _sha256(second.path) == second.sha256
    assert first.sha256 == second.sha256
    assert "dependencies: cached" in second.stdout


@pytest.mark.cold_build
@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_two_cold_builds_are_byte_identical_and_carry_the_lock(arch: str, tmp_path: Path) -> None:
    """The real target, built twice from nothing: each build has its own empty dependency
    cache and pip's cache is off, so every wheel is downloaded again. Same bytes, and
    exactly the lock's pins."""
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1"}
    builds = []
    for name in ("first", "second"):
        build = _build(
            tmp_path / name / "deployment-package.zip",
            arch=arch,
            python_version=LAMBDA_PYTHON,
            cache_dir=tmp_path / name / "package-cache",
            env=env,
        )
        assert "dependencies: pip install" in build.stdout  # not "dependencies: cached"
        builds.append(build)
    first, second = builds
    assert _sha256(first.path) == first.sha256
    assert first.sha256 == second.sha256
    package = _load_script()
    locked = {
        (pin.name, pin.version)
        for pin in package.for_target(
            package.read_lock(package.LOCK), package.target_environment(arch, LAMBDA_PYTHON)
        )
    }
    assert _vendored(first.path) == locked


def _vendored(archive: Path) -> set[tuple[str, str]]:
    """(canonical name, version) of every distribution in the zip, from its METADATA."""
    vendored = set()
    with zipfile.ZipFile(archive) as opened:
        for name in opened.namelist():
            parts = PurePosixPath(name).parts
            if len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "METADATA":
                fields = email.message_from_bytes(opened.read(name))
                vendored.add((canonicalize_name(fields["Name"]), fields["Version"]))
    return vendored


def test_zip_carries_exactly_the_locked_distributions(builds: tuple[Build, Build]) -> None:
    package = _load_script()
    environment = package.target_environment(ARCH, PYTHON_VERSION)
    locked = {
        (pin.name, pin.version)
        for pin in package.for_target(package.read_lock(package.LOCK), environment)
    }
    assert _vendored(builds[0].path) == locked


def test_build_reports_sizes_within_lambda_limits(builds: tuple[Build, Build]) -> None:
    stdout = builds[0].stdout
    assert "zipped:" in stdout
    assert "unzipped:" in stdout
    with zipfile.ZipFile(builds[0].path) as archive:
        unzipped = sum(info.file_size for info in archive.infolist())
    assert builds[0].path.stat().st_size < 50 * 1024 * 1024
    assert unzipped < 250 * 1024 * 1024


def test_zip_entries_are_normalised(builds: tuple[Build, Build]) -> None:
    with zipfile.ZipFile(builds[0].path) as archive:
        infos = archive.infolist()
    names = [info.filename for info in infos]
    assert names == sorted(names)
    for info in infos:
        assert info.date_time == (1980, 1, 1, 0, 0, 0), info.filename
        mode = info.external_attr >> 16
        expected = 0o40755 if info.is_dir() else 0o100644
        assert mode == expected, (info.filename, oct(mode))


def test_zip_holds_the_function_and_nothing_it_does_not_need(
    builds: tuple[Build, Build],
) -> None:
    with zipfile.ZipFile(builds[0].path) as archive:
        names = [name for name in archive.namelist() if not name.endswith("/")]
    paths = [PurePosixPath(name) for name in names]
    assert "handler.py" in names
    assert "async_notifier/__init__.py" in names
    assert "async_notifier/batch/notifier.py" in names
    assert "templates/base.html" in names
    assert any(name.startswith("templates/pt-BR/") for name in names)
    assert any(name.startswith("templates/en/") for name in names)
    # The dev demo needs moto and aiosmtpd, which are not shipped.
    assert not any(name.startswith("async_notifier/local/") for name in names)
    # aiobotocore pins one botocore: the zip carries it rather than the runtime's.
    assert any(name.startswith("botocore/") for name in names)
    assert any(name.startswith("aiobotocore/") for name in names)
    for path in paths:
        assert "__pycache__" not in path.parts, path
        assert path.suffix not in (".pyc", ".pyo", ".pyi", ".pyx", ".c", ".h"), path
        assert not {"tests", "test"} & set(path.parts[:-1]), path
        assert path.parts[0] != "bin", path
        if path.parts[0].endswith(".dist-info"):
            assert (
                path.name in ("METADATA", "entry_points.txt")
                or "licenses" in path.parts
                or path.name.upper().startswith(
                    ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")
                )
            ), path
    metadata = [path for path in paths if path.name == "METADATA"]
    # dnspython (via email-validator) asks importlib.metadata for idna's version at import.
    assert any(path.parts[0].startswith("idna-") for path in metadata)


def _run_clean(unpacked: Path, event: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-I", "-S", "-c", RUNNER, str(unpacked)],
        input=json.dumps(event),
        capture_output=True,
        text=True,
        env=env,
        cwd=unpacked,
        check=False,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    # Every module came from the zip or the standard library, none from the venv.
    assert report["outside"] == []
    return report["result"]  # type: ignore[no-any-return]


def test_handler_runs_from_the_zip_alone(unpacked: Path) -> None:
    env = {
        "SMTP_SERVER": "smtp.example.com",
        "EMAIL_FROM": "no-reply@example.com",
        "ALLOWED_BUCKETS": "*",
    }
    assert _run_clean(unpacked, {"Records": []}, env) == {"batchItemFailures": []}


def test_batch_runs_from_the_zip_against_s3_and_smtp(
    unpacked: Path,
    worker_env: dict[str, str],
    bucket: str,
    aws: MotoServer,
    smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    attachment = make_zip(48 * 1024, seed=7)
    seed_objects(s3_client(aws.endpoint_url), bucket, {"v1/frames.zip": attachment})
    completed = sqs_record(
        {
            "video_id": "v1",
            "status": "COMPLETED",
            "bucket": bucket,
            "key": "v1/frames.zip",
            "email": "maria@example.com",
            "name": "Maria",
            "file_name": "ferias.mp4",
        },
        "m-completed",
    )
    failed = sqs_record(
        {"video_id": "v2", "status": "FAILED", "email": "john@example.com", "locale": "en"},
        "m-failed",
    )
    bad = sqs_record("not json", "m-bad")
    env = {
        **worker_env,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": aws.endpoint_url,
        "ALLOWED_BUCKETS": bucket,
        "RETRY_BACKOFF": "false",
        "HOME": str(tmp_path),
    }
    env.pop("TEMPLATES_DIR", None)
    result = _run_clean(unpacked, {"Records": [completed, failed, bad]}, env)
    assert result == {"batchItemFailures": [{"itemIdentifier": "m-bad"}]}
    smtp_sink.wait_for(2)
    by_recipient = {str(message["To"]): message for message in smtp_sink.parsed()}
    assert set(by_recipient) == {"Maria <maria@example.com>", "john@example.com"}
    zips = [
        part.get_content()
        for part in by_recipient["Maria <maria@example.com>"].iter_attachments()
        if part.get_content_type() == "application/zip"
    ]
    assert zips == [attachment]
    assert not list(by_recipient["john@example.com"].iter_attachments())


# ELF e_machine of each Lambda architecture.
_ELF_MACHINE = {"x86_64": 62, "arm64": 183}


@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_lambda_target_carries_only_its_own_binaries(arch: str, tmp_path: Path) -> None:
    """The real target (CPython 3.13, Linux, arch): every extension module is built for it."""
    output = tmp_path / f"{arch}.zip"
    with one_build_at_a_time():
        completed = subprocess.run(
            [sys.executable, str(SCRIPT), "--arch", arch, "--output", str(output)],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    machine = {"x86_64": "x86_64", "arm64": "aarch64"}[arch]
    with zipfile.ZipFile(output) as archive:
        extensions = [name for name in archive.namelist() if name.endswith(".so")]
        assert extensions
        for name in extensions:
            assert name.endswith((f".cpython-313-{machine}-linux-gnu.so", ".abi3.so")), name
            header = archive.read(name)[:20]
            assert header[:4] == b"\x7fELF", name
            assert int.from_bytes(header[18:20], "little") == _ELF_MACHINE[arch], name


def _load_script(path: Path = SCRIPT) -> Any:
    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_fails_over_lambda_limits(
    builds: tuple[Build, Build], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _load_script()
    monkeypatch.setattr(package, "MAX_UNZIPPED_BYTES", 1024 * 1024)
    output = tmp_path / "too-big.zip"
    with (
        one_build_at_a_time(),
        pytest.raises(package.PackageError, match=r"unzipped package is .* over Lambda's"),
    ):
        package.build(
            arch=ARCH,
            python_version=PYTHON_VERSION,
            output=output,
            cache_root=ROOT / "build" / "package",
        )
    assert not output.exists()


def test_bad_python_version_is_refused() -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--python-version", "three"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2
    assert "--python-version" in completed.stderr


def test_python_version_is_lambdas_python_313_everywhere() -> None:
    """The zip's wheels, the template's Runtime and the runtime tests name one Python."""
    assert _load_script().DEFAULT_PYTHON == LAMBDA_PYTHON
    # The Debian root file systems that `make test-runtime` runs the zips in.
    assert _load_script(ROOT / "scripts" / "rootfs.py").PYTHON_VERSION == LAMBDA_PYTHON
    runtimes = re.findall(r"^\s+Runtime: (\S+)$", (ROOT / "template.yaml").read_text(), re.M)
    # Every function (the notifier, the SES events one and the canary) runs the same zip.
    assert runtimes == [f"python{LAMBDA_PYTHON}"] * 3
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^PYTHON_VERSION = {re.escape(LAMBDA_PYTHON)}$", makefile, re.M)


def _make_package_command(args: list[str], env: dict[str, str]) -> str:
    completed = subprocess.run(
        ["make", "-n", "package", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    lines = [line for line in completed.stdout.splitlines() if "scripts/package.py" in line]
    assert len(lines) == 1, completed.stdout
    return lines[0]


def test_make_package_takes_the_python_version_from_its_command_line_only() -> None:
    # Python's container images export PYTHON_VERSION=3.x.y: that must not pick the wheels.
    env = {"PATH": os.environ["PATH"], "PYTHON_VERSION": "3.11.7"}
    assert '--python-version "3.13"' in _make_package_command([], env)
    assert '--python-version "3.12"' in _make_package_command(["PYTHON_VERSION=3.12"], env)
