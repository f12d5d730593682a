"""Start the deployment zip the way Lambda's python3.x runtime does, here or in a chroot.

Lambda unpacks the zip into /var/task (read-only), puts its runtime interface client in
/var/runtime, sets a fixed environment and runs `python -m awslambdaric <_HANDLER>` in the task
root, which then polls the Runtime API. `LambdaProcess` does the same against a `RuntimeApi`
emulator (tests/support/runtime_api.py):

- on this machine's interpreter (`rootfs=None`): the base interpreter, not the venv's, with
  `-S` so that no site-packages of this machine can hide a module missing from the zip;
- in a Debian root file system (scripts/rootfs.py): read-only, as Lambda's file system is, with
  the unpacked zip and awslambdaric bind-mounted read-only at /var/task and /var/runtime and a
  fresh, writable /tmp. The mounts are made in a private mount namespace (`unshare --mount`),
  so they vanish with the process however it ends, and the cached root file system is never
  written to (bar two empty mount points). A foreign architecture runs through qemu-user
  (binfmt_misc). The process shares the host's network, so the emulator, moto and the SMTP
  sink stay on the host's 127.0.0.1.

Every `exec` keeps the process id, so the pid the test holds is the interpreter's.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from package_cache import one_build_at_a_time

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_SCRIPT = ROOT / "scripts" / "package.py"
ROOTFS_SCRIPT = ROOT / "scripts" / "rootfs.py"
RUNTIME_CLIENT_REQUIREMENTS = Path(__file__).with_name("requirements-lambda-runtime.txt")
RUNTIME_CLIENT_CACHE = ROOT / "build" / "lambda-runtime"
HANDLER = "handler.lambda_handler"
FUNCTION_NAME = "async-notifier"
REGION = "us-east-1"
TASK_ROOT = "/var/task"
RUNTIME_DIR = "/var/runtime"
# Lambda's PATH and LD_LIBRARY_PATH for its python3.x runtimes.
LAMBDA_PATH = "/var/lang/bin:/usr/local/bin:/usr/bin/:/bin:/opt/bin"
LAMBDA_LD_LIBRARY_PATH = (
    "/var/lang/lib:/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:/var/task:/var/task/lib:/opt/lib"
)

# Run by /bin/sh inside `unshare --mount`: mount, then become the runtime in the chroot.
# PATH is Lambda's, for the runtime; the host's tools are found on the host's own.
_CHROOT_SCRIPT = r"""
set -e
root=$1 task=$2 runtime=$3 tmp=$4
shift 4
lambda_path=$PATH
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
chroot=$(command -v chroot)
mkdir -p "$root/var/task" "$root/var/runtime"
mount --bind -o ro "$root" "$root"
mount --bind -o ro "$task" "$root/var/task"
mount --bind -o ro "$runtime" "$root/var/runtime"
mount --bind "$tmp" "$root/tmp"
mount -t proc proc "$root/proc"
export PATH="$lambda_path"
exec "$chroot" "$root" /usr/bin/env -C /var/task "$@"
"""


@cache
def _script(path: Path) -> Any:
    """scripts/*.py as modules (they are scripts, not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def package_script() -> Any:
    return _script(PACKAGE_SCRIPT)


def rootfs_script() -> Any:
    return _script(ROOTFS_SCRIPT)


def build_zip(*, arch: str, python_version: str, output: Path) -> Path:
    """`scripts/package.py` as `make package` runs it; fails the test with its output."""
    with one_build_at_a_time():
        completed = subprocess.run(
            [
                sys.executable,
                str(PACKAGE_SCRIPT),
                "--arch",
                arch,
                "--python-version",
                python_version,
                "--output",
                str(output),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return output


def unpack(archive: Path, target: Path) -> Path:
    """Unpack like Lambda: the zip's modes are kept (0644 files, 0755 directories)."""
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as opened:
        for info in opened.infolist():
            path = Path(opened.extract(info, target))
            mode = info.external_attr >> 16 & 0o777
            if mode:
                path.chmod(mode)
    return target


def runtime_client(*, arch: str, python_version: str) -> Path:
    """awslambdaric for the target interpreter and architecture, installed outside the zip.

    The same cached, binary-only `pip install --platform --target` that builds the zip's
    dependencies, from tests/support/requirements-lambda-runtime.txt.
    """
    with one_build_at_a_time():
        path: Path = package_script().install_dependencies(
            RUNTIME_CLIENT_REQUIREMENTS,
            arch=arch,
            python_version=python_version,
            cache_root=RUNTIME_CLIENT_CACHE,
        )
    return path


def runtime_client_version() -> str:
    for line in RUNTIME_CLIENT_REQUIREMENTS.read_text().splitlines():
        if line.startswith("awslambdaric=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError("awslambdaric is not pinned in " + RUNTIME_CLIENT_REQUIREMENTS.name)


def lambda_environment(
    *,
    runtime_api: str,
    python_version: str,
    task_root: str,
    runtime_dir: str,
    timeout: int,
    memory_mb: int = 1024,
) -> dict[str, str]:
    """The variables Lambda sets for a python3.x function (credentials are the test's)."""
    return {
        "_HANDLER": HANDLER,
        "AWS_EXECUTION_ENV": f"AWS_Lambda_python{python_version}",
        "AWS_LAMBDA_RUNTIME_API": runtime_api,
        "AWS_LAMBDA_FUNCTION_NAME": FUNCTION_NAME,
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
        # Not documented for the managed runtimes, but set by AWS's runtime interface emulator.
        "AWS_LAMBDA_FUNCTION_TIMEOUT": str(timeout),
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{FUNCTION_NAME}",
        "AWS_LAMBDA_LOG_STREAM_NAME": "2024/01/01/[$LATEST]0123456789abcdef0123456789abcdef",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "LAMBDA_TASK_ROOT": task_root,
        "LAMBDA_RUNTIME_DIR": runtime_dir,
        "PYTHONPATH": runtime_dir,
        "PATH": LAMBDA_PATH,
        "LD_LIBRARY_PATH": LAMBDA_LD_LIBRARY_PATH,
        "LANG": "en_US.UTF-8",
        "TZ": ":UTC",
    }


@dataclass(frozen=True)
class Target:
    """Where the zip runs: this machine's interpreter, or a root file system's python3."""

    arch: str  # Lambda's name: x86_64 or arm64
    python_version: str
    rootfs: Path | None = None

    @property
    def name(self) -> str:
        where = "host" if self.rootfs is None else self.rootfs.name
        return f"cpython{self.python_version}-{self.arch}-{where}"


class LambdaProcess:
    """`python -m awslambdaric handler.lambda_handler` on an unpacked zip, until stopped."""

    def __init__(
        self,
        target: Target,
        *,
        task: Path,
        runtime: Path,
        workdir: Path,
        runtime_api: str,
        settings: dict[str, str],
        timeout: int,
    ) -> None:
        self.target = target
        self.task = task
        self.runtime = runtime
        self.tmp = workdir / "tmp"
        self.log = workdir / "runtime.log"
        self._runtime_api = runtime_api
        self._settings = settings
        self._timeout = timeout
        self._process: subprocess.Popen[bytes] | None = None

    def _command(self) -> tuple[list[str], dict[str, str], Path | None]:
        in_chroot = self.target.rootfs is not None
        env = lambda_environment(
            runtime_api=self._runtime_api,
            python_version=self.target.python_version,
            task_root=TASK_ROOT if in_chroot else str(self.task),
            runtime_dir=RUNTIME_DIR if in_chroot else str(self.runtime),
            timeout=self._timeout,
        )
        env.update(self._settings)
        runtime = ["-m", "awslambdaric", HANDLER]
        if self.target.rootfs is None:
            # The base interpreter, not the venv's; -S: none of its site-packages either.
            python = getattr(sys, "_base_executable", sys.executable)
            env["TMP_DIR"] = str(self.tmp)
            env["HOME"] = str(self.tmp)
            return [python, "-S", *runtime], env, self.task
        python = f"python{self.target.python_version}"
        unshare = shutil.which("unshare")
        if unshare is None:
            raise RuntimeError("unshare (util-linux) is missing")
        command = [
            unshare,
            "--mount",
            "--propagation",
            "private",
            "/bin/sh",
            "-c",
            _CHROOT_SCRIPT,
            "sh",
            str(self.target.rootfs),
            str(self.task),
            str(self.runtime),
            str(self.tmp),
            python,
            *runtime,
        ]
        return command, env, None

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("already started")
        self.tmp.mkdir(parents=True, exist_ok=True)
        command, env, cwd = self._command()
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("not started")
        return self._process.pid

    def poll(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def wait(self, timeout: float) -> int:
        if self._process is None:
            raise RuntimeError("not started")
        return self._process.wait(timeout)

    def output(self) -> str:
        """Everything the runtime wrote (stdout and stderr: Lambda's log stream)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def mapped_files(self) -> set[str]:
        """Paths of the files the process has mapped (its loaded extension modules among them)."""
        lines = Path(f"/proc/{self.pid}/maps").read_text().splitlines()
        fields = (line.split(maxsplit=5) for line in lines)
        return {parts[5] for parts in fields if len(parts) == 6}

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: what Lambda does to an environment it shuts down."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> LambdaProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_root() -> bool:
    return os.geteuid() == 0
