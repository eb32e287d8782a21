"""How the package imports: no cycles between its modules, and no torch for the catalog and readers.

The import graph is read from the source with ``ast`` — every ``import`` anywhere in a file,
function-local ones and ``if TYPE_CHECKING:`` ones included — because a cycle hidden behind
function-local imports is still a cycle: it decides which module may be imported first and
breaks as soon as someone moves an import to the top. A function-local import is allowed only
with a ``# local: <reason>`` comment on its line (today: scipy, which only the .mat rules need),
one of a sibling module only with ``# local sibling: <reason>`` (today: none).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

PACKAGE = "vlprompt.datasets"
FOLDER = Path(__file__).resolve().parents[2] / "datasets"
MODULES = sorted(p.stem for p in FOLDER.glob("*.py"))

TORCH_FREE = (
    "vlprompt.datasets",
    "vlprompt.datasets.catalog",
    "vlprompt.datasets.tasks",
    "vlprompt.datasets.splits",
    "vlprompt.datasets.fewshot",
    "vlprompt.datasets.fewshot_cache",
    "vlprompt.datasets.generate",
    "vlprompt.datasets.makesplit",
    "vlprompt.datasets.doctor",
)


def _imports(module: str) -> Iterator[tuple[ast.stmt, list[str]]]:
    """Every import statement of ``module`` with the sibling modules it names."""
    for node in ast.walk(ast.parse((FOLDER / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield node, [_sibling(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = PACKAGE if node.level else (node.module or "")
            if node.level and node.module:
                base = f"{PACKAGE}.{node.module}"
            if base == PACKAGE:  # from vlprompt.datasets import x: x is a module, or __init__'s name
                yield node, [alias.name if alias.name in MODULES else "__init__" for alias in node.names]
            else:
                yield node, [_sibling(base)]


def _sibling(dotted: str) -> str:
    if dotted == PACKAGE:
        return "__init__"
    if dotted.startswith(PACKAGE + "."):
        return dotted[len(PACKAGE) + 1 :].split(".")[0]
    return ""  # not in the package


def import_graph() -> dict[str, set[str]]:
    """Module → the sibling modules it imports (anywhere in the file)."""
    return {
        module: {name for _, names in _imports(module) for name in names if name and name != module}
        for module in MODULES
    }


def find_cycle(graph: Mapping[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as [a, b, ..., a], or [] when it is acyclic."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_reads_both_import_forms() -> None:
    graph = import_graph()
    assert "layouts" in graph["catalog"]  # from vlprompt.datasets.layouts import layout_of
    assert {"fashion20", "fgvc", "imagenet", "splitjson"} <= graph[
        "layouts"
    ]  # from vlprompt.datasets import x


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle in vlprompt.datasets: " + " -> ".join(cycle)


def _local_imports(module: str) -> Iterator[tuple[str, list[str]]]:
    """(source line, sibling modules named) of every import inside a function of ``module``."""
    lines = (FOLDER / f"{module}.py").read_text(encoding="utf-8").splitlines()
    local = {
        node.lineno
        for fn in ast.walk(ast.parse("\n".join(lines)))
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    }
    for node, names in _imports(module):
        if node.lineno in local:
            yield f"{module}.py:{node.lineno}: {lines[node.lineno - 1].strip()}", [n for n in names if n]


@pytest.mark.parametrize("module", MODULES)
def test_function_local_imports_say_why(module: str) -> None:
    """A function-local import hides a dependency: each needs ``# local: <reason>`` on its line, and
    one of a sibling module the stronger ``# local sibling: <reason>`` (there are none today)."""
    unmarked = [
        line
        for line, siblings in _local_imports(module)
        if ("# local sibling:" if siblings else "# local:") not in line
    ]
    assert unmarked == []


def test_package_import_does_not_load_torch() -> None:
    """The experiment driver validates dataset names and split files before Ray starts; that must
    not cost a torch import. Run in a fresh interpreter: this one has torch loaded already."""
    code = (
        "import importlib, sys\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in ('torch', 'torchvision') if m in sys.modules)\n"
        "assert not loaded, f'importing vlprompt.datasets loaded {loaded}'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
