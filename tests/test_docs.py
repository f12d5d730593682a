"""The docs hold together: every relative link and anchor resolves, quoted paths exist.

A newcomer follows the README into `docs/`; a link to a page that moved or a heading that
was renamed is a dead end, and a path to a module that no longer exists sends them looking
for it. The README also has to stay short and open on the two commands.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cfnlint.decode import decode_str

from async_notifier.config import Rule, Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 250
# "Near the top": the two commands come before anything a newcomer must read first.
TOP_LINES = 30

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); the text may hold one level of [brackets].
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)[^)]*\)")
_REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_NOT_SOURCE = {"build", "dist", "outbox", "preview", "out", "__pycache__"}
_EXTERNAL = re.compile(r"^(https?:|mailto:)", re.IGNORECASE)
# A repository path quoted as code: `async_notifier/mail/render.py`, `tests/servers.py`.
_QUOTED_PATH = re.compile(
    r"^(?:async_notifier|tests|bench|scripts|templates|docs)/[\w./-]*$|^[\w-]+\.(?:py|md|yaml)$"
)


def documents() -> list[Path]:
    """The Markdown a reader can reach from the README."""
    pages = [README, *sorted((ROOT / "docs").glob("**/*.md")), *sorted(ROOT.glob("bench/*.md"))]
    pages += [ROOT / name for name in ("CONTRIBUTING.md", "CHANGELOG.md") if (ROOT / name).exists()]
    return pages


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with code spans blanked out."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if match:
            if fence is None:
                fence = match[1]
            elif match[1] == fence:
                fence = None
            continue
        if fence is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters (any script), digits and _
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, repeats numbered as GitHub does (-1, -2)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match[2])
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


@dataclass(frozen=True)
class Link:
    source: Path
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.source.relative_to(ROOT)}:{self.line}: ({self.target})"


def links(path: Path) -> Iterator[Link]:
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = _CODE_SPAN.sub(lambda m: " " * len(m[0]), line)
        targets = [m[1] for m in _INLINE_LINK.finditer(line)]
        definition = _REFERENCE_DEF.match(line)
        if definition:
            targets.append(definition[1])
        for target in targets:
            yield Link(path, number, target.strip("<>"))


def broken(link: Link, root: Path = ROOT) -> str | None:
    """Why `link` does not resolve, or None when it does (external links are not fetched)."""
    if _EXTERNAL.match(link.target):
        return None
    target, _, anchor = link.target.partition("#")
    if target.startswith("/"):
        return "absolute path: write it relative to the document"
    path = (link.source.parent / target).resolve() if target else link.source
    if not path.is_relative_to(root.resolve()):
        return "points outside the repository"
    if not path.exists():
        return "no such file"
    if anchor:
        if path.suffix != ".md":
            return "an anchor into a file that is not Markdown cannot be checked"
        if anchor not in anchors(path):
            return f"no heading with anchor #{anchor} in {path.relative_to(root.resolve())}"
    return None


@functools.cache
def repository_file_names() -> frozenset[str]:
    """Names of the files in the repository, outside hidden, build and cache directories."""
    names: set[str] = set()
    for _folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _NOT_SOURCE]
        names.update(files)
    return frozenset(names)


def path_exists(quoted: str, document: Path) -> bool:
    """A path with a folder is relative to the repository (or the document); a bare file
    name, as in "`wiring.py` builds the adapters", must be some file of the repository."""
    if "/" not in quoted.rstrip("/"):
        return quoted in repository_file_names() or (ROOT / quoted).exists()
    return (ROOT / quoted).exists() or (document.parent / quoted).exists()


def quoted_paths(path: Path) -> Iterator[tuple[int, str]]:
    """Repository paths written as code spans in the prose of `path`."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in _CODE_SPAN.finditer(line):
            text = match[2].strip()
            if _QUOTED_PATH.match(text):
                yield number, text


def config_variables() -> set[str]:
    """Every environment variable `Settings.from_env` reads (its readers record them)."""
    return set(Settings.rules())


def readme_section(heading: str) -> str:
    """The README's `## heading` section, up to the next `## `."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def readme_settings_table() -> str:
    return readme_section("Configuration")


def table_rows(section: str) -> Iterator[list[str]]:
    """The cells of each row of the Markdown tables in `section`, header rows included and
    rule rows left out; a `|` inside a code span does not split a cell."""
    for table in tables(section):
        yield from table


def tables(section: str) -> list[list[list[str]]]:
    """Each Markdown table of `section`: its rows' cells, the header row first."""
    found: list[list[list[str]]] = []
    inside = False
    for _, line in prose_lines(section):
        if not line.startswith("|"):
            inside = False
            continue
        cells = [cell.strip() for cell in re.split(r"\|(?=(?:[^`]*`[^`]*`)*[^`]*$)", line)[1:-1]]
        if all(re.fullmatch(r":?-+:?", cell) for cell in cells):
            continue
        if not inside:
            found.append([])
            inside = True
        found[-1].append(cells)
    return found


def code_spans(cell: str) -> list[str]:
    return [match[2] for match in _CODE_SPAN.finditer(cell)]


@dataclass(frozen=True)
class SettingRow:
    names: tuple[str, ...]
    default: str
    allowed: str


def readme_settings() -> dict[str, SettingRow]:
    """The configuration table's rows, by variable (a row may name several)."""
    header = ["variable", "default", "allowed", "meaning"]
    [table] = [t for t in tables(readme_settings_table()) if t[0] == header]
    rows: dict[str, SettingRow] = {}
    for cells in table[1:]:
        assert len(cells) == 4, f"README configuration row without 4 cells: {cells}"
        names = tuple(code_spans(cells[0]))
        for name in names:
            assert name not in rows, f"{name} has two rows in README's configuration table"
            rows[name] = SettingRow(names, cells[1], cells[2])
    return rows


def literal(value: float | str | bool) -> str:
    """A default or bound as the README writes it: `true`, `30` (not 30.0), `0.2`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def allowed_text(rule: Rule) -> str:
    """The "allowed" cell a rule reads as: `1` to `20`, at least `0.1`, `a`, `b` or `c`,
    or the rule's words for a text's shape; empty when any value goes."""
    parts: list[str] = []
    if rule.low is not None:
        low = f"`{literal(rule.low)}`"
        parts.append(
            f"{low} to `{literal(rule.high)}`" if rule.high is not None else f"at least {low}"
        )
    parts += [f"`{choice}`" for choice in rule.choices]
    if rule.pattern:
        parts.append(rule.pattern)
    if len(parts) < 2:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def default_problem(name: str, rule: Rule, cell: str) -> str | None:
    """Why the README's default cell does not say the code's default (None: it does)."""
    if rule.required:
        return None if cell.startswith("(required") else f"{name}: required, README says {cell!r}"
    if rule.default is None:
        return None  # no literal default: the README says in words what the code does
    wanted = f"`{literal(rule.default)}`"
    if cell.startswith(wanted):
        return None
    return f"{name}: the default is {wanted}, README says {cell!r}"


def template_resources() -> dict[str, str]:
    """template.yaml's resources: logical id -> type (short tags read by cfn-lint's loader)."""
    template, matches = decode_str((ROOT / "template.yaml").read_text(encoding="utf-8"))
    assert not matches, matches
    return {name: resource["Type"] for name, resource in template["Resources"].items()}


def readme_stack_resources() -> list[str]:
    """The logical ids the README's Deploy section lists: the "resources" column of its
    `| what | resources |` table."""
    [table] = [t for t in tables(readme_section("Deploy")) if t[0] == ["what", "resources"]]
    return [span for cells in table[1:] for span in code_spans(cells[-1])]


# --------------------------------------------------------------------------- the repository's docs


@pytest.mark.parametrize("document", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document: Path) -> None:
    problems = [f"{link}: {why}" for link in links(document) if (why := broken(link))]
    assert not problems, "\n".join(problems)


def test_the_docs_link_to_each_other() -> None:
    """The checks above have something to check: the README links into docs/ with anchors."""
    targets = [link.target for link in links(README)]
    assert any(t.startswith("docs/") and "#" in t for t in targets), targets
    assert len(documents()) >= 8


def current_documents() -> list[Path]:
    """The pages that describe the code as it is (the changelog and the benchmark's results
    are records of their time: their file names may be old ones)."""
    return [p for p in documents() if p.name != "CHANGELOG.md" and p.parent.name != "bench"]


@pytest.mark.parametrize("document", current_documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_quoted_repository_path_exists(document: Path) -> None:
    """`async_notifier/x.py` in the docs names a file that is there (layouts change)."""
    missing = [
        f"{document.relative_to(ROOT)}:{number}: `{quoted}`"
        for number, quoted in quoted_paths(document)
        if not path_exists(quoted, document)
    ]
    assert not missing, "\n".join(missing)


def test_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_readme_opens_on_the_two_commands() -> None:
    top = README.read_text(encoding="utf-8").splitlines()[:TOP_LINES]
    commands = {line.split("#")[0].strip() for line in top}
    assert {"make run-local", "make test"} <= commands, (
        f"`make run-local` and `make test` must each start a line in README's first "
        f"{TOP_LINES} lines"
    )


def test_readme_lists_every_setting() -> None:
    documented = readme_settings()
    variables = config_variables()
    assert len(variables) >= 40
    missing = sorted(variables - set(documented))
    assert not missing, f"settings read by config.py but not in README's table: {missing}"
    unknown = sorted(set(documented) - variables)
    assert not unknown, f"settings in README's table that config.py does not read: {unknown}"


def test_readme_gives_each_settings_default() -> None:
    """The default column says the default `from_env` applies: `30`, `true`, (required)."""
    documented = readme_settings()
    rules = Settings.rules()
    assert sum(rule.default is not None for rule in rules.values()) >= 35
    problems = [
        why
        for name, rule in sorted(rules.items())
        if (why := default_problem(name, rule, documented[name].default))
    ]
    assert not problems, "\n".join(problems)


def test_readme_gives_each_settings_range() -> None:
    """The allowed column says exactly what `from_env` refuses outside of: the bounds and
    choices its readers were given, nothing the code does not enforce."""
    documented = readme_settings()
    rules = Settings.rules()
    assert sum(rule.low is not None for rule in rules.values()) >= 25
    problems = [
        f"{name}: the code allows {allowed_text(rule)!r}, README says {row.allowed!r}"
        for name, rule in sorted(rules.items())
        if (row := documented[name]).allowed != allowed_text(rule)
    ]
    assert not problems, "\n".join(problems)


def test_readme_lists_every_resource_of_the_stack() -> None:
    """What `sam deploy` creates is listed by logical id: a resource added to the template
    must be added to the README's Deploy table, and one listed there must exist."""
    resources = template_resources()
    listed = readme_stack_resources()
    assert len(resources) >= 30
    missing = sorted(set(resources) - set(listed))
    assert not missing, f"template.yaml resources missing from README's Deploy table: {missing}"
    unknown = sorted(set(listed) - set(resources))
    assert not unknown, f"README's Deploy table lists resources not in template.yaml: {unknown}"
    repeated = sorted(name for name in set(listed) if listed.count(name) > 1)
    assert not repeated, f"listed twice in README's Deploy table: {repeated}"


# --------------------------------------------------------------------------- the checker itself


def test_slugs_follow_github() -> None:
    assert slug("Failure handling and guarantees") == "failure-handling-and-guarantees"
    assert slug("The budget after the cutoff") == "the-budget-after-the-cutoff"
    assert (
        slug("Showing that a change does not regress: `--vs REF`")
        == "showing-that-a-change-does-not-regress---vs-ref"
    )
    assert slug("Run 3 (one round trip per email, and a warm row): the final numbers") == (
        "run-3-one-round-trip-per-email-and-a-warm-row-the-final-numbers"
    )
    assert slug("[Linked](x.md) heading") == "linked-heading"
    assert slug("Ação & ñ") == "ação--ñ"


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## A section\n\n## A section\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "\n".join(
            [
                "# Title",
                "[ok](docs/page.md) [ok](docs/page.md#a-section) [ok](docs/page.md#a-section-1)",
                "[ok](#title) [ok](https://example.com/x#y) [ok](mailto:a@example.com)",
                "[gone](docs/missing.md)",
                "[bad anchor](docs/page.md#no-such-section)",
                "[bad local anchor](#nowhere)",
                "[escapes](../outside.md)",
                "`[not a link](in-code.md)`",
                "```",
                "[not a link](in-a-fence.md)",
                "```",
                "[ref]: docs/also-missing.md",
            ]
        )
    )
    found = {link.target: broken(link, tmp_path) for link in links(readme)}
    assert {t for t, why in found.items() if why is None} == {
        "docs/page.md",
        "docs/page.md#a-section",
        "docs/page.md#a-section-1",
        "#title",
        "https://example.com/x#y",
        "mailto:a@example.com",
    }
    assert found["docs/missing.md"] == "no such file"
    assert found["docs/also-missing.md"] == "no such file"
    assert "#no-such-section" in (found["docs/page.md#no-such-section"] or "")
    assert "#nowhere" in (found["#nowhere"] or "")
    assert found["../outside.md"] == "points outside the repository"
    assert "in-code.md" not in found
    assert "in-a-fence.md" not in found


def test_quoted_paths_are_found_outside_fences(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "See `async_notifier/render.py` and `handler.py`, not `SMTP_SERVER`.\n"
        "```\nasync_notifier/in_a_fence.py `async_notifier/fenced.py`\n```\n"
    )
    assert list(quoted_paths(page)) == [(1, "async_notifier/render.py"), (1, "handler.py")]
    assert not path_exists("async_notifier/render.py", page)  # moved to mail/render.py
    assert path_exists("async_notifier/mail/render.py", page)
    assert path_exists("wiring.py", page)  # a bare name: some file of the repository
    assert not path_exists("smtp_pool.py", page)


def test_the_settings_checker_reads_rows_and_writes_ranges() -> None:
    section = "\n".join(
        [
            "| variable | default | allowed | meaning |",
            "|---|---|---|---|",
            "| `A`, `B` | `30` | at least `0.1` | a `x | y` pipe in code |",
            "```",
            "| `IN_A_FENCE` | | | |",
            "```",
        ]
    )
    assert list(table_rows(section)) == [
        ["variable", "default", "allowed", "meaning"],
        ["`A`, `B`", "`30`", "at least `0.1`", "a `x | y` pipe in code"],
    ]
    two = "| a | b |\n|---|---|\n| `1` | `2` |\n\n| c |\n|---|\n| `3` |\n"
    assert tables(two) == [[["a", "b"], ["`1`", "`2`"]], [["c"], ["`3`"]]]
    assert allowed_text(Rule(default=3, low=1, high=20)) == "`1` to `20`"
    assert allowed_text(Rule(default=30.0, low=0.1)) == "at least `0.1`"
    assert allowed_text(Rule(low=0.0)) == "at least `0`"
    assert allowed_text(Rule(choices=("smtp", "ses"))) == "`smtp` or `ses`"
    assert allowed_text(Rule(choices=("a", "b", "c"))) == "`a`, `b` or `c`"
    assert allowed_text(Rule(low=0.001, choices=("auto", "none"))) == (
        "at least `0.001`, `auto` or `none`"
    )
    assert allowed_text(Rule(pattern="1-64 of A-Z")) == "1-64 of A-Z"
    assert allowed_text(Rule()) == ""
    assert default_problem("X", Rule(default=30.0), "`30`, or more") is None
    assert default_problem("X", Rule(default=True), "`true`") is None
    assert default_problem("X", Rule(default=0.2), "`0.25`") is not None
    assert default_problem("X", Rule(required=True), "(required with SMTP)") is None
    assert default_problem("X", Rule(required=True), "`x`") is not None


def test_the_documented_import_cost_command_imports_what_exists() -> None:
    """docs/operations.md quotes `python -m bench.import_cost`: what it times (the worker's
    imports, then this package's metrics module) must import, or the command fails."""
    from bench import import_cost

    milliseconds, modules = import_cost.measure(
        sys.executable, import_cost.STATEMENTS[0], import_cost.WORKER_IMPORTS, dict(os.environ)
    )
    assert milliseconds >= 0
    assert modules == 0  # the worker's imports already bring the metrics module
