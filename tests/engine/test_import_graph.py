"""The project's import graph: the config layer is the ground floor.

Every ``.py`` under engine/, models/ and parallel/ is parsed with ``ast``; imports at module
level AND inside functions count (an import moved into a function still makes the cycle, it
only hides it until run time); only ``if TYPE_CHECKING:`` blocks are left out (they never run). The graph must have no cycle, and models/ and parallel/ may
import from engine/ only its config layer."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "models", "parallel")
# The only engine modules that models/ and parallel/ may import: they import nothing of the project.
CONFIG_LAYER = {"engine.config"}


def project_modules() -> Dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _resolve(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """The longest project module that ``name`` (a module or a name inside one) denotes."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (annotations only: they
    never run, so they make no import-time arrow; everything else, functions included, counts)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def import_graph() -> Dict[str, Set[str]]:
    """module -> project modules it imports anywhere in its body (``__init__`` of parents excluded:
    importing ``engine.config`` runs ``engine/__init__``, but that is the package, not an arrow)."""
    modules = project_modules()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = module.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from engine import config` imports the module engine.config
                targets = [f"{base}.{alias.name}" for alias in node.names] or [base]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved and resolved != module:
                    graph[module].add(resolved)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle as a list of modules (first == last), or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_graph_sees_imports_inside_functions(tmp_path):
    """The parser must count a function-level import (that is how the cycle was hidden)."""
    graph = import_graph()
    assert "engine.config" in graph and graph["engine.commands.config"], graph["engine.commands.config"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_and_parallel_import_only_the_config_layer_of_engine():
    upward = sorted(
        f"{src} -> {dst}"
        for src, dsts in import_graph().items()
        if src.split(".")[0] in ("models", "parallel")
        for dst in dsts
        if dst.split(".")[0] == "engine" and dst not in CONFIG_LAYER
    )
    assert not upward, "models/parallel import engine beyond its config layer:\n" + "\n".join(upward)


def test_config_layer_imports_nothing_of_the_project():
    graph = import_graph()
    for module in CONFIG_LAYER:
        assert not graph[module], f"{module} imports {sorted(graph[module])}"
