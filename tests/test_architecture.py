"""The layout is the architecture: these tests fail when an import breaks it.

The package is read as "rooms": each top-level module of `async_notifier` and each
sub-package (`smtp/`, `aws/`, `batch/`, `mail/`, `runner/`, `local/`), plus `handler.py`. Every
import counts, inside functions and under `TYPE_CHECKING` too: a cycle there is still a
tangle for the reader.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import MotoServer, sqs_record

from async_notifier import wiring
from async_notifier.config import Settings

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "async_notifier"
HANDLER = "handler"
# The core: what a record goes through. It is handed its SMTP and AWS adapters.
CORE = {
    "config",
    "errors",
    "logs",
    "deadline",
    "after_cutoff",
    "messages",
    "ses_events",
    "delivery_status",
    "metrics",
    "mail",
    "ports",
    "batch",
    # The provider account's limits (pace, conditions, quota): every transport's, no adapter.
    "account",
    # Two transports behind the port, one sending (FALLBACK_TRANSPORT): it knows only the port.
    "failover",
}
ADAPTERS = {"smtp", "aws"}
MAX_LEVELS = 6  # the longest chain of imports between rooms, in arrows


def modules() -> Iterator[tuple[str, Path]]:
    """(dotted name, path) of every module of the package, and the handler."""
    yield HANDLER, ROOT / "handler.py"
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def room(module: str) -> str | None:
    """The room a module belongs to; None for the package's face (`__init__`)."""
    if module == HANDLER:
        return HANDLER
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imported(module: str, path: Path) -> set[str]:
    """The package's modules that `module` imports (absolute names)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("async_notifier"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("async_notifier"):
                continue
            found.add(target)
            # `from . import x` / `from .batch import notifier`: x may itself be a module.
            for alias in node.names:
                found.add(f"{target}.{alias.name}")
    known = {name for name, _ in modules()}
    return {name for name in found if name in known and name != module}


@functools.cache
def module_graph() -> dict[str, set[str]]:
    return {name: imported(name, path) for name, path in modules()}


@functools.cache
def room_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in module_graph().items():
        source = room(module)
        if source is None:
            continue
        arrows = graph.setdefault(source, set())
        for target in targets:
            target_room = room(target)
            if target_room is not None and target_room != source:
                arrows.add(target_room)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def depth(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each node's longest chain of arrows down to a node that imports nothing."""

    @functools.cache
    def level(node: str) -> int:
        return max((level(n) + 1 for n in graph.get(node, ())), default=0)

    return {node: level(node) for node in graph}


def test_no_module_imports_itself_back() -> None:
    assert find_cycle(module_graph()) is None


def test_no_room_imports_itself_back() -> None:
    assert find_cycle(room_graph()) is None


def test_the_import_graph_is_at_most_six_levels_deep() -> None:
    levels = depth(room_graph())
    deepest = max(levels, key=levels.__getitem__)
    assert levels[deepest] <= MAX_LEVELS, f"{deepest} sits {levels[deepest]} levels up"


def test_settings_import_nothing_of_the_package() -> None:
    assert room_graph()["config"] == set()


def test_the_core_never_imports_smtp_aws_or_the_wiring() -> None:
    for name in CORE:
        assert room_graph()[name] <= CORE, f"{name} imports {room_graph()[name] - CORE}"


def test_the_smtp_and_aws_sides_do_not_know_each_other() -> None:
    assert "aws" not in room_graph()["smtp"]
    assert "smtp" not in room_graph()["aws"]
    assert room_graph()["smtp"] | room_graph()["aws"] <= CORE | ADAPTERS


def test_the_handler_only_wires() -> None:
    assert room_graph()[HANDLER] <= {"wiring", "config", "lambda_process"}
    assert len((ROOT / "handler.py").read_text().splitlines()) < 80


def test_the_reader_finds_a_cycle_when_there_is_one() -> None:
    """The checks above would pass on any graph if `find_cycle` never found one."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert depth({"a": {"b"}, "b": {"c"}, "c": set()}) == {"a": 2, "b": 1, "c": 0}


# --------------------------------------------------------------------------- what is built


class Built:
    """What the wiring makes, counted as it is made: the AWS clients by service, the SMTP
    pools. The real factories run (a spy, not a stand-in)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clients: list[str] = []
        self.pools = 0
        real_client, real_pool = wiring.aws_client, wiring.SmtpPool

        def client(service: str, *args: Any, **kwargs: Any) -> Any:
            self.clients.append(service)
            return real_client(service, *args, **kwargs)

        built = self

        class CountedPool(real_pool):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                built.pools += 1
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(wiring, "aws_client", client)
        monkeypatch.setattr(wiring, "SmtpPool", CountedPool)


async def test_the_ses_events_entry_point_builds_no_smtp_pool_and_no_s3_client(
    aws: MotoServer, worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It sends no email: prepared and run, it makes DynamoDB's client and nothing to mail
    with; the notifier, wired the same way, makes both (so the count can fail)."""
    monkeypatch.setenv("SUPPRESSION_TABLE", "suppression")
    monkeypatch.setenv("RETRY_BACKOFF", "false")
    built = Built(monkeypatch)
    recorder = wiring.build_ses_recorder(Settings.from_env(sending=False))
    try:
        await recorder.prepare()
        result = await recorder.process([sqs_record("not an SES notification", "foreign")])
        assert [o.message_id for o in result.failures] == ["foreign"]
        assert recorder.held_for() == 0.0
    finally:
        await recorder.aclose()
    assert (built.clients, built.pools) == (["dynamodb"], 0)

    notifier = wiring.build_notifier(Settings.from_env())
    try:
        await notifier.prepare()
    finally:
        await notifier.aclose()
    assert built.pools == 1
    assert "s3" in built.clients
