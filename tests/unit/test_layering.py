"""The layering rule, read from the imports themselves (the AST, so `TYPE_CHECKING` and function-level imports
count too): who may import whom, and no import cycle anywhere in `server/` or `routers/`.

The rule (docs/architecture.md tells why):
- `routers` is a library: it never imports `server`, `testkit`, `tests` or `loadtest`; within it, `embedding`
  imports nothing else of `routers`, and only `offline` (the training stack) may import `routers.offline`.
- `server` never imports `testkit`, `tests` or `loadtest`; `testkit` never imports `tests` or `loadtest`;
  `loadtest` never imports `tests`. So `testkit` is imported by tests and load tests only.
- Within `server`, each part sits in a layer and imports only its own part and parts of lower layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOP = ("server", "routers", "testkit", "tests", "loadtest")

#: `server`'s parts, lowest first. A part may import itself and any part of a lower layer, nothing above or beside.
SERVER_LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"outcome", "tasks"}),
    frozenset({"errors", "config"}),
    frozenset({"store", "telemetry"}),
    frozenset({"upstream"}),
    frozenset({"policy"}),
    frozenset({"quota"}),
    frozenset({"snapshot"}),
    frozenset({"fleet"}),
    frozenset({"gateway"}),
    frozenset({"api"}),
    frozenset({"app", "connections"}),
    frozenset({"cli"}),
    frozenset({"__main__"}),
)
#: What each top-level tree may not import.
FORBIDDEN_TOPS = {
    "routers": {"server", "testkit", "tests", "loadtest"},
    "server": {"testkit", "tests", "loadtest"},
    "testkit": {"tests", "loadtest"},
    "loadtest": {"tests"},
}


def module_name(path: Path) -> str:
    """`server/api/body.py` -> `server.api.body`; a package's `__init__.py` is the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in the file. `from pkg import mod` counts as `pkg.mod`
    when that is a module."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
    return {m for m in out if m.split(".")[0] in TOP}


def project_imports() -> dict[str, set[str]]:
    """Every project module and the project modules it imports."""
    paths = [p for top in TOP for p in (REPO / top).rglob("*.py")]
    known = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, known) for p in paths}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "server" or len(parts) < 2:
        return None
    for rank, layer in enumerate(SERVER_LAYERS):
        if parts[1] in layer:
            return rank
    return -1  # a part the rule does not place: reported


def _part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def direction_problems(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Every import that points the wrong way."""
    problems: list[str] = []
    for mod, deps in sorted(graph.items()):
        top = mod.split(".")[0]
        rank = _layer(mod)
        if rank == -1:
            problems.append(f"{mod}: its part of server is in no layer of SERVER_LAYERS")
        for dep in sorted(deps):
            dep_top = dep.split(".")[0]
            if dep_top in FORBIDDEN_TOPS.get(top, ()):
                problems.append(f"{mod} imports {dep}: {top} never imports {dep_top}")
            if top == "routers":
                problems += _routers_problem(mod, dep)
            dep_rank = _layer(dep)
            if rank is None or dep_rank is None or rank < 0 or _part(dep) == _part(mod):
                continue
            if dep_rank >= rank:
                problems.append(f"{mod} imports {dep}: {_part(mod)} sits below or beside {_part(dep)}")
    return problems


def _routers_problem(mod: str, dep: str) -> list[str]:
    if mod.startswith("routers.embedding") and dep.startswith("routers.") and not dep.startswith("routers.embedding"):
        return [f"{mod} imports {dep}: routers.embedding imports nothing else of routers"]
    if dep.startswith("routers.offline") and not mod.startswith("routers.offline"):
        return [f"{mod} imports {dep}: only routers.offline imports the training stack"]
    return []


def cycles(graph: Mapping[str, Iterable[str]], prefixes: tuple[str, ...] = ("server", "routers")) -> list[list[str]]:
    """Import cycles among modules under `prefixes` (each reported once, from its smallest module)."""
    nodes = {m for m in graph if m.startswith(prefixes)}
    edges = {m: sorted(d for d in graph[m] if d in nodes and d != m) for m in nodes}
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in edges[m]:
            if state.get(d) == 1:
                cycle = path[path.index(d):]
                start = cycle.index(min(cycle))
                found.append(cycle[start:] + cycle[:start])
            elif d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(nodes):
        if m not in state:
            visit(m)
    return found


def test_imports_point_one_way() -> None:
    problems = direction_problems(project_imports())
    assert not problems, "\n".join(problems)


def test_no_import_cycles_in_server_or_routers() -> None:
    found = cycles(project_imports())
    assert not found, "\n".join(" -> ".join(c) for c in found)


def test_the_rule_catches_what_it_forbids() -> None:
    """The checks themselves, on planted imports: each wrong direction and a cycle are reported."""
    planted = {
        "server.telemetry.status": {"server.gateway"},  # a leaf service importing the whole gateway
        "server.store.guard": {"server.telemetry.metrics"},  # beside, not below
        "server.api.body": {"server.upstream.sse"},  # allowed: api sits above upstream
        "routers.learned": {"server.config", "routers.offline.dataset"},
        "routers.embedding.static": {"routers.learned"},
        "loadtest.soak": {"tests.conftest"},
        "server.new_part": set(),
    }
    problems = direction_problems(planted)
    assert len(problems) == 7, problems
    assert not any(p.startswith("server.api.body") for p in problems)
    assert cycles({"server.a": {"server.b"}, "server.b": {"server.c"}, "server.c": {"server.a"}}) == [
        ["server.a", "server.b", "server.c"]]


def test_every_server_part_says_what_it_holds_and_may_import() -> None:
    for init in sorted((REPO / "server").glob("*/__init__.py")) + sorted((REPO / "routers").glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and "import" in doc, f"{init.relative_to(REPO)}: a docstring saying what it holds and may import"
