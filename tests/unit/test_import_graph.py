"""No import cycles between the modules of shimd/, shims/ and shimproto/ (issue 17, item 3), and one-way
packages (item 2): shimd and shims never import each other; both may import shimproto, which imports neither.

The graph is read from the source with ast, not by importing anything. Rules:
- every `import` / `from ... import` counts: at module level, inside functions, and under `if TYPE_CHECKING:`
  (a type-only cycle is still two modules that each know the other; the kind is printed with the cycle);
- `from pkg import name` is an edge to pkg.name when that is a module, else to pkg itself;
- importing a.b.c is an edge to a.b.c only, not to the a and a.b package __init__s Python also runs
  (a package __init__ re-exporting its own submodules is not a design cycle);
- strings given to importlib are not imports here (shimd/runtimes/registry.py uses none).
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("shimd", "shims", "shimproto")
# Which top-level package may import which (besides itself).
MAY_IMPORT = {"shimd": {"shimproto"}, "shims": {"shimproto"}, "shimproto": set()}



@dataclass(frozen=True)
class Edge:
    target: str
    line: int
    kind: str  # "module", "function" or "type-checking"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            modules[_module_name(root, path)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.module = module
        self.is_package = is_package
        self.known = known
        self.edges: list[Edge] = []
        self._function = 0
        self._type_checking = 0

    def _kind(self) -> str:
        if self._type_checking:
            return "type-checking"
        return "function" if self._function else "module"

    def _add(self, target: str, line: int) -> None:
        if target in self.known and target != self.module:
            self.edges.append(Edge(target, line, self._kind()))

    def _in_function(self, node: ast.AST) -> None:
        self._function += 1
        self.generic_visit(node)
        self._function -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _in_function

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._type_checking += 1
        for child in node.body:
            self.visit(child)
        self._type_checking -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            # Relative: resolved against this module's package.
            base = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            package = ".".join([*base, node.module] if node.module else base)
        else:
            package = node.module or ""
        for alias in node.names:
            sub = f"{package}.{alias.name}"
            self._add(sub if sub in self.known else package, node.lineno)


def build_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, list[Edge]]:
    modules = discover(root, packages)
    known = set(modules)
    graph: dict[str, list[Edge]] = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        graph[name] = visitor.edges
    return graph


def _components(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for edge in edges:
                nxt = edge.target
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _shortest_cycle(graph: dict[str, list[Edge]], members: list[str]) -> list[tuple[str, Edge]]:
    """One shortest cycle through the component's first module, as (module, edge taken) steps."""
    inside = set(members)
    start = members[0]
    came: dict[str, tuple[str, Edge]] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for edge in graph[node]:
            if edge.target not in inside:
                continue
            if edge.target == start:
                steps = [(node, edge)]
                while node != start:
                    prev, prev_edge = came[node]
                    steps.append((prev, prev_edge))
                    node = prev
                return steps[::-1]
            if edge.target not in came:
                came[edge.target] = (node, edge)
                queue.append(edge.target)
    raise AssertionError(f"no cycle through {start}")  # a component of 2+ always has one


def find_cycles(graph: dict[str, list[Edge]]) -> list[str]:
    reports = []
    for members in _components(graph):
        steps = _shortest_cycle(graph, members)
        lines = [f"  {module} -> {edge.target}  (line {edge.line}, {edge.kind} import)" for module, edge in steps]
        reports.append(f"cycle among {len(members)} modules {members}:\n" + "\n".join(lines))
    return reports


def crossings(graph: dict[str, list[Edge]], may_import: dict[str, set[str]],
              exempt: frozenset[str] = frozenset()) -> list[str]:
    """Every import from one top-level package into another that may_import does not allow."""
    out = []
    for module, edges in sorted(graph.items()):
        src = module.split(".")[0]
        if module in exempt:
            continue
        for edge in edges:
            dst = edge.target.split(".")[0]
            if dst != src and dst not in may_import.get(src, set()):
                out.append(f"{module} -> {edge.target}  (line {edge.line}, {edge.kind} import)")
    return out


@functools.cache
def _repo_graph() -> dict[str, list[Edge]]:
    return build_graph(REPO)


def test_no_import_cycles_in_shimd_and_shims() -> None:
    cycles = find_cycles(_repo_graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_shimd_and_shims_meet_only_in_shimproto() -> None:
    bad = crossings(_repo_graph(), MAY_IMPORT)
    assert not bad, "imports across the package boundary:\n" + "\n".join(bad)


def test_graph_sees_every_package() -> None:
    # A walker that silently found nothing would pass the tests above.
    graph = _repo_graph()
    assert "shimd.daemon" in graph and "shims.runc.service" in graph and "shimproto.ttrpc" in graph
    assert any(e.target == "shimproto.ttrpc" for e in graph["shimd.shimmgr.task_client"])
    assert any(e.target == "shimd.store.store" for e in graph["shimd.daemon"])


@pytest.mark.parametrize("where", ["module", "function", "type-checking"])
def test_walker_finds_a_cycle_whatever_the_import_kind(tmp_path: Path, where: str) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    back = {
        "module": "from .. import a\n",
        "function": "def f():\n    import pkg.a\n",
        "type-checking": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X\n",
    }[where]
    (pkg / "sub" / "c.py").write_text(back)
    (pkg / "d.py").write_text("import pkg.a\n")  # on no cycle: must not be reported
    cycles = find_cycles(build_graph(tmp_path, ("pkg",)))
    assert len(cycles) == 1, cycles
    assert "['pkg.a', 'pkg.sub.b', 'pkg.sub.c']" in cycles[0]
    assert f"pkg.sub.c -> pkg.a  (line {back.count(chr(10))}, {where} import)" in cycles[0]
    assert "pkg.d" not in cycles[0]


def test_boundary_rule_reports_each_crossing_whatever_the_import_kind(tmp_path: Path) -> None:
    for pkg in ("d", "s", "leaf"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "leaf" / "wire.py").write_text("")
    (tmp_path / "d" / "ok.py").write_text("from leaf import wire\n")
    (tmp_path / "s" / "ok.py").write_text("import leaf.wire\n")
    (tmp_path / "s" / "bad.py").write_text("def f():\n    from d import ok\n")
    (tmp_path / "leaf" / "bad.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import s.ok\n")
    graph = build_graph(tmp_path, ("d", "s", "leaf"))
    found = crossings(graph, {"d": {"leaf"}, "s": {"leaf"}, "leaf": set()})
    assert found == ["leaf.bad -> s.ok  (line 3, type-checking import)", "s.bad -> d.ok  (line 2, function import)"]
