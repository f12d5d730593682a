"""requirements.txt, requirements.lock and pyproject.toml agree, and the build reads the lock
for Lambda, not for the machine it runs on.

requirements.txt is the hand-edited list of direct pins; requirements.lock (`make lock`) pins
every transitive dependency with its hashes and is what the zip (scripts/package.py) and the
venv (`make venv`) install; pyproject.toml's ranges are what the wheel accepts. A pin changed
in one of them and not the others ships, or tests, something nobody chose.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from lambda_sandbox import package_script
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
# The libraries whose internals the code reaches into (see the comments in pyproject.toml).
INTERNALS_USED = ("aioboto3", "aiosmtplib")


def _locked() -> dict[str, str]:
    """The lock's `name==version` lines, read without scripts/package.py's parser."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", LOCK.read_text(), re.M)
    return {canonicalize_name(name): version for name, version in pins}


def _direct() -> dict[str, Requirement]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    requirements = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0]]
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


def _pinned(requirement: Requirement) -> str:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", f"requirements.txt pins exactly: {requirement}"
    return specifier.version


def _declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


def test_every_direct_pin_is_in_the_lock_at_its_version() -> None:
    locked = _locked()
    for name, requirement in _direct().items():
        assert name in locked, f"{requirement} is not in requirements.lock: run make lock"
        assert locked[name] == _pinned(requirement), (
            f"requirements.txt pins {requirement}, requirements.lock {locked[name]}: run make lock"
        )


def test_every_locked_pin_is_exact_and_hashed() -> None:
    # read_lock refuses an entry without a hash or not pinned with ==.
    pins = package_script().read_lock(LOCK)
    assert {pin.name: pin.version for pin in pins} == _locked()
    assert all(hash.startswith("sha256:") for pin in pins for hash in pin.hashes)
    # Every transitive dependency is there, not just the direct ones.
    assert {"botocore", "aiohttp", "yarl", "markupsafe", "dnspython"} <= set(_locked())


def test_the_wheel_declares_each_direct_dependency_and_accepts_its_pin() -> None:
    declared, direct = _declared(), _direct()
    assert set(declared) == set(direct)
    for name, requirement in declared.items():
        assert requirement.specifier.contains(_pinned(direct[name])), (requirement, direct[name])


@pytest.mark.parametrize("name", INTERNALS_USED)
def test_libraries_whose_internals_the_code_uses_have_an_upper_bound(name: str) -> None:
    assert any(spec.operator == "<" for spec in _declared()[name].specifier)


def test_the_venv_runs_what_the_lock_pins() -> None:
    """`make venv` installs the lock and holds the dev tools to it: the tests import the
    versions the zip ships (for this interpreter: markers evaluated here)."""
    pins = package_script().read_lock(LOCK)
    for pin in pins:
        marker = pin.requirement.marker
        if marker is None or marker.evaluate():
            assert metadata.version(pin.name) == pin.version, pin.name


def _write_lock(path: Path, *lines: str) -> Path:
    path.write_text("".join(f"{line} \\\n    --hash=sha256:{'0' * 64}\n" for line in lines))
    return path


def test_markers_are_evaluated_for_the_target_not_for_this_interpreter(tmp_path: Path) -> None:
    package = package_script()
    pins = package.read_lock(
        _write_lock(
            tmp_path / "requirements.lock",
            "always==1.0",
            "new-python==1.0 ; python_full_version >= '3.13'",
            "graviton==1.0 ; platform_machine == 'aarch64'",
            "windows==1.0 ; sys_platform == 'win32'",
        )
    )

    def kept(arch: str, python_version: str) -> set[str]:
        environment = package.target_environment(arch, python_version)
        return {pin.name for pin in package.for_target(pins, environment)}

    assert kept("arm64", "3.13") == {"always", "new-python", "graviton"}
    assert kept("x86_64", "3.13") == {"always", "new-python"}
    assert kept("x86_64", "3.12") == {"always"}
    assert pins[0].line() == f"always==1.0 --hash=sha256:{'0' * 64}"


@pytest.mark.parametrize(
    "text",
    [
        "unhashed==1.0\n",
        f"ranged>=1.0 --hash=sha256:{'0' * 64}\n",
        f"extras[x]==1.0 --hash=sha256:{'0' * 64}\n",
        f"--index-url https://example.com/simple\nx==1.0 --hash=sha256:{'0' * 64}\n",
    ],
)
def test_a_lock_entry_that_is_not_an_exact_hashed_pin_is_refused(text: str, tmp_path: Path) -> None:
    package = package_script()
    lock = tmp_path / "requirements.lock"
    lock.write_text(text)
    with pytest.raises(package.PackageError, match="run make lock"):
        package.read_lock(lock)


def _dist(deps: Path, name: str, version: str, *requires: str) -> None:
    info = deps / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {requirement}" for requirement in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


def test_an_install_missing_what_a_pin_requires_for_the_target_is_reported(
    tmp_path: Path,
) -> None:
    package: Any = package_script()
    deps = tmp_path / "deps"
    _dist(
        deps,
        "app",
        "1.0",
        "lib[fast]>=2",
        'graviton-only; platform_machine == "aarch64"',
        'windows-only; sys_platform == "win32"',
    )
    _dist(deps, "lib", "2.0", 'speedup<3; extra == "fast"', 'unused; extra == "slow"')
    _dist(deps, "speedup", "3.0")
    arm = package.target_environment("arm64", "3.13")
    assert package.unmet_dependencies(deps, arm) == [
        'app requires graviton-only; platform_machine == "aarch64", which the lock does not pin',
        'lib requires speedup<3; extra == "fast", the lock pins 3.0',
    ]
    x86 = package.target_environment("x86_64", "3.13")
    assert package.unmet_dependencies(deps, x86) == [
        'lib requires speedup<3; extra == "fast", the lock pins 3.0'
    ]
    _dist(deps, "graviton-only", "1.0")
    (deps / "speedup-3.0.dist-info" / "METADATA").unlink()
    (deps / "speedup-3.0.dist-info").rmdir()
    _dist(deps, "speedup", "2.9")
    assert package.unmet_dependencies(deps, arm) == []


def test_the_build_refuses_a_lock_older_than_requirements_txt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = package_script()
    requirements = tmp_path / "requirements.txt"
    direct = (ROOT / "requirements.txt").read_text()
    requirements.write_text(re.sub(r"^aiosmtplib==\S+", "aiosmtplib==99.0", direct, flags=re.M))
    monkeypatch.setattr(package, "REQUIREMENTS", requirements)
    output = tmp_path / "package.zip"
    with pytest.raises(
        package.PackageError, match=r"aiosmtplib==99\.0 but the lock has .*make lock"
    ):
        package.build(
            arch="arm64", python_version="3.13", output=output, cache_root=tmp_path / "cache"
        )
    assert not output.exists()
    assert not (tmp_path / "cache").exists()  # refused before any install
