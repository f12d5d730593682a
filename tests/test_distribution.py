"""What pyproject.toml ships and where the installed worker finds its templates; and the
pre-commit hooks' pins. Cheap checks on the files themselves: building and installing the
wheel is `make test-wheel` (tests/test_wheel.py).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

import async_notifier
from async_notifier.config import DEFAULT_TEMPLATES_DIR, _default_templates_dir

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS: dict[str, Any] = PYPROJECT["tool"]["setuptools"]


def _pins(requirements: Path) -> dict[str, str]:
    """name -> `name==version` for every pinned line (the name normalised, extras dropped)."""
    pins = {}
    for line in requirements.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==(\S+)", line)
        if match:
            pins[_name(match[1])] = f"{_name(match[1])}=={match[2]}"
    return pins


def test_every_package_under_async_notifier_is_shipped() -> None:
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "async_notifier").rglob("__init__.py")
    }
    assert set(SETUPTOOLS["packages"]) == on_disk | {"async_notifier.templates"}


def test_the_top_level_templates_ship_inside_the_package() -> None:
    """setuptools globs package-data in the mapped directory; every template must match."""
    assert SETUPTOOLS["package-dir"] == {"async_notifier.templates": "templates"}
    patterns = SETUPTOOLS["package-data"]["async_notifier.templates"]
    templates = ROOT / "templates"
    shipped = {path for pattern in patterns for path in templates.glob(pattern)}
    on_disk = {path for path in templates.rglob("*") if path.is_file()}
    assert sorted(on_disk - shipped) == []
    assert SETUPTOOLS["package-data"]["async_notifier"] == ["py.typed"]
    assert (ROOT / "async_notifier" / "py.typed").is_file()


def test_the_version_has_one_source() -> None:
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert SETUPTOOLS["dynamic"]["version"] == {"attr": "async_notifier.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", async_notifier.__version__)


def test_templates_default_to_the_packages_own_else_the_ones_beside_it(tmp_path: Path) -> None:
    package = tmp_path / "async_notifier"
    package.mkdir()
    # A checkout, an editable install, the Lambda zip: templates/ next to the package.
    assert _default_templates_dir(package) == tmp_path / "templates"
    # An installed wheel: templates/ inside the package.
    (package / "templates").mkdir()
    assert _default_templates_dir(package) == package / "templates"
    # This checkout.
    assert DEFAULT_TEMPLATES_DIR == ROOT / "templates"


def test_pre_commit_hooks_pin_the_versions_the_project_uses() -> None:
    """The hooks build their own environments; they must check with the same ruff and mypy
    as `make lint`, against the same runtime libraries."""
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    pins = _pins(ROOT / "requirements-dev.txt") | _pins(ROOT / "requirements.txt")
    hooks = {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}
    assert set(hooks) == {"ruff-check", "ruff-format", "mypy"}
    for hook in hooks.values():
        assert hook["language"] == "python"
        assert ".venv" not in hook["entry"]
        dependencies = hook["additional_dependencies"]
        for dependency in dependencies:
            assert dependency.lower() == pins.get(_name(dependency)), dependency
    # mypy follows the imports into every runtime dependency the package declares.
    declared = {_name(d) for d in PYPROJECT["project"]["dependencies"]}
    checked = {_name(d) for d in hooks["mypy"]["additional_dependencies"]}
    assert sorted(declared - checked) == []


def _name(requirement: str) -> str:
    """The normalised project name of a requirement (`Email_Validator>=2` -> email-validator)."""
    name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_changelog_has_a_section_and_a_link_for_this_version() -> None:
    """Keep a Changelog: `## [Unreleased]` on top, a dated `## [X.Y.Z] - YYYY-MM-DD` for the
    version the package says it is, and a link reference for every heading."""
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", changelog, flags=re.M)
    assert headings[0] == "Unreleased"
    assert headings[1] == async_notifier.__version__
    assert re.search(
        rf"^## \[{re.escape(async_notifier.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$",
        changelog,
        flags=re.M,
    )
    links = set(re.findall(r"^\[([^\]]+)\]: https://\S+$", changelog, flags=re.M))
    assert set(headings) <= links
