"""The package's shape: no function longer than 100 lines, and no import cycle between its modules (function-level
imports count too: a circle taken lazily is still a circle a reader has to untangle)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llm_distill"
MAX_LINES = 100


def _trees():
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def function_lengths() -> dict[str, int]:
    """`module.qualified.name` -> lines, for every function and method (nested ones too)."""
    out = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[f"{prefix}.{child.name}"] = child.end_lineno - child.lineno + 1
                walk(child, f"{prefix}.{child.name}")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}.{child.name}")
            else:
                walk(child, prefix)

    for name, tree in _trees().items():
        walk(tree, name)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in its body."""
    trees = _trees()
    graph = {name: set() for name in trees}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    targets.append(node.module.split(".")[0])
                else:  # from . import x: a module when x is one, else the package's __init__
                    targets += [a.name if a.name in trees else "__init__" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llm_distill"):
                parts = node.module.split(".")
                targets += [parts[1]] if len(parts) > 1 else \
                    [a.name if a.name in trees else "__init__" for a in node.names]
            elif isinstance(node, ast.Import):
                targets += [a.name.split(".")[1] for a in node.names if a.name.startswith("llm_distill.")]
            graph[name].update(t for t in targets if t in trees and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_function_is_longer_than_100_lines():
    long = {k: v for k, v in function_lengths().items() if v > MAX_LINES}
    assert not long, f"functions over {MAX_LINES} lines: {long}"


def test_modules_import_each_other_in_one_direction_only():
    found = cycles(import_graph())
    assert not found, f"import cycles between modules: {found}"


def test_no_private_names_are_imported_across_modules():
    bad = []
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("llm_distill")):
                bad += [f"{name}: {a.name} from {node.module}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__"]
    assert not bad, bad
