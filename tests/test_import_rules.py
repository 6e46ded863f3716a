"""The never-import rules of the runtime (issue 19), read from the source with `ast`.

- engines never import a strategy, an FL algorithm, transient or any application module;
- strategies and FL algorithms never import an engine;
- comm imports neither an engine nor the context;
- no import cycles among dlion's modules.

Every import counts, wherever it stands: at the top, inside a function (a lazy import is
still a dependency) and under `if TYPE_CHECKING:` (the type checker follows it, and a
circle through annotations is still a circle). This matches shared/tools/boundaries.py.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

# Algorithm families and applications: built on the engines, never imported by them.
APPLICATIONS = [
    "dlion.strategies",
    "dlion.fl",
    "dlion.transient",
    "dlion.hybrid",
    "dlion.transfer",
    "dlion.thermal",
    "dlion.jobs",
    "dlion.cli.commands",
    "dlion.api",
    "dlion.cli.suites",
    "dlion.distbench.runs",
    "dlion.distbench.cli",
    "dlion.probe.cli",
]
# (importer package, packages or modules it must never import)
NEVER: list[tuple[str, list[str]]] = [
    ("dlion.engines", APPLICATIONS),
    ("dlion.strategies", ["dlion.engines", "dlion.jobs"]),
    ("dlion.fl", ["dlion.engines"]),
    ("dlion.comm", ["dlion.engines", "dlion.context"]),
]


def _modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every module under root/dlion (packages by their name)."""
    out = {}
    for path in sorted((root / "dlion").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, name: str) -> set[str]:
    """Every dotted name the module imports (`from a import b` gives a and a.b)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The dlion module a dotted name lands in (`dlion.fl.job.run` -> `dlion.fl.job`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _graph(root: Path) -> dict[str, set[str]]:
    """Module -> the dlion modules it imports (a package's __init__ stands for the package)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {_resolve(n, modules) for n in _imports(path, name)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def broken_rules(root: Path) -> list[str]:
    """One line per import that a never-rule forbids."""
    problems = []
    for module, targets in sorted(_graph(root).items()):
        for importer, banned in NEVER:
            if not _inside(module, importer):
                continue
            for target in sorted(targets):
                if any(_inside(target, b) for b in banned):
                    problems.append(f"{module} imports {target}")
    return problems


def cycles(root: Path) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted.

    A package's __init__ importing its own submodules (registration of built-ins) is not
    a circle: edges into a package's own __init__ from inside it are left out."""
    graph = _graph(root)
    edges = {
        m: {t for t in ts if not (_inside(m, t) and t != m and _is_package(root, t))}
        for m, ts in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _is_package(root: Path, name: str) -> bool:
    return (root / Path(*name.split(".")) / "__init__.py").exists()


def test_the_tree_keeps_the_never_rules() -> None:
    assert broken_rules(SRC) == []


def test_the_tree_has_no_import_cycle() -> None:
    assert cycles(SRC) == []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of src/ to plant violations in."""
    shutil.copytree(SRC / "dlion", tmp_path / "dlion", ignore=shutil.ignore_patterns("*.pyc"))
    return tmp_path


@pytest.mark.parametrize(
    ("where", "line", "expected"),
    [
        ("engines/sim.py", "from dlion.strategies import gaia", "dlion.strategies.gaia"),
        ("engines/runtime.py", "import dlion.fl.fedavg", "dlion.fl.fedavg"),
        ("engines/dist.py", "from dlion.transient.cost import x", "dlion.transient.cost"),
        ("engines/network.py", "from dlion.jobs.fl_sim import run_fl", "dlion.jobs.fl_sim"),
        ("strategies/gaia.py", "from dlion.engines.sim import run_sim", "dlion.engines.sim"),
        ("fl/fedavg.py", "from ..engines import runtime", "dlion.engines.runtime"),
        ("comm/job.py", "from dlion.context import WorkerContext", "dlion.context"),
        ("comm/codec.py", "from dlion.engines.network import Network", "dlion.engines.network"),
    ],
)
def test_a_planted_import_is_found(tree: Path, where: str, line: str, expected: str) -> None:
    path = tree / "dlion" / where
    # Inside a function, so even a lazy import is caught.
    path.write_text(path.read_text() + f"\n\ndef _planted() -> None:\n    {line}\n")
    module = "dlion." + where.removesuffix(".py").replace("/", ".")
    problems = broken_rules(tree)
    assert f"{module} imports {expected}" in problems
    assert all(p.startswith(f"{module} imports ") for p in problems)


def test_a_planted_cycle_is_found_also_through_type_checking(tree: Path) -> None:
    path = tree / "dlion" / "cluster/topology.py"
    path.write_text(
        path.read_text()
        + "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
        + "    from dlion.engines.network import Network\n"
    )
    assert ["dlion.cluster.topology", "dlion.engines.network"] in cycles(tree)
