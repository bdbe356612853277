"""The package's floors (ARCHITECTURE.md): imports only run downward, no tool imports another, no
two modules import each other (not even from inside a function), and every imported name exists.

Floors, bottom to top: errors/constants/compat/profiling; config/distributed/checkpoint;
method/data; engine/evaluation; cli.  The bench tool is one tool in a sub-package
(cli/bench/: step, eigen, data, gpu, components, synth); cli/__init__ holds argument types the tools share.
Every import counts, the ones inside functions too: a circle closed inside a function is still
a circle, one that only the reader of that function sees.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "eagle_dist"
FLOORS = {"errors": 0, "constants": 0, "compat": 0, "profiling": 0,
          "config": 1, "distributed": 1, "checkpoint": 1,
          "method": 2, "data": 2, "engine": 3, "evaluation": 3, "cli": 4}
TOP = 5  # the `python -m eagle_dist.<tool>` modules


def _floor(module: str) -> int:
    return FLOORS.get(module.split(".")[1], TOP)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _tree(path: Path) -> ast.Module:
    """The module's code without its `if __name__ == "__main__":` block, which runs only when the
    module is the program (eagle_dist/checkpoint.py's `python -m` shim to its tool), not when it
    is imported."""
    tree = ast.parse(path.read_text())
    tree.body = [node for node in tree.body if not _is_main_guard(node)]
    return tree


def _from_imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) of every `from eagle_dist... import name` in the file, at any depth."""
    return [(node.module, alias.name, node.lineno) for node in ast.walk(_tree(path))
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
            and node.module.split(".")[0] == "eagle_dist" for alias in node.names]


def _imports(path: Path) -> list[str]:
    """The eagle_dist modules the file imports, at any depth: `from X import sub` counts as the
    sub-module X.sub where that is a module, else as X."""
    found = [f"{module}.{name}" if f"{module}.{name}" in MODULES else module
             for module, name, _ in _from_imports(path)]
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "eagle_dist"]
    return [m for m in found if m != "eagle_dist"]


def _defined_names(path: Path) -> set[str]:
    """Names bound at module level (inside top-level if/try blocks too)."""
    names: set[str] = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            body += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            body += [n for h in getattr(node, "handlers", []) for n in h.body]
    return names


def _graph() -> dict[str, set[str]]:
    return {mod: set(_imports(path)) - {mod} for mod, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_only_run_downward():
    upward = [f"{mod} imports {target}" for mod, path in MODULES.items() if mod != "eagle_dist"
              for target in _imports(path) if _floor(target) > _floor(mod)]
    assert upward == []


def test_no_tool_imports_another_tool():
    crossing = []
    for mod, path in MODULES.items():
        if not mod.startswith("eagle_dist.cli.") or mod == "eagle_dist.cli.main":
            continue
        own = ".".join(mod.split(".")[:3])
        for target in _imports(path):
            tool = ".".join(target.split(".")[:3])
            if tool.startswith("eagle_dist.cli.") and tool != own:
                crossing.append(f"{mod} imports {target}")
    assert crossing == []


def test_no_two_modules_import_each_other_not_even_inside_a_function():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle_closed_inside_a_function(tmp_path):
    # The check above must be able to fail: a two-module circle, one side inside a function.
    (tmp_path / "a.py").write_text("from eagle_dist.x import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from eagle_dist.x import a\n")
    graph = {"eagle_dist.x.a": {"eagle_dist.x.b"}, "eagle_dist.x.b": {"eagle_dist.x.a"}, "eagle_dist.x.c": set()}
    assert _cycles(graph) == [["eagle_dist.x.a", "eagle_dist.x.b"]]
    inside = [n for n in ast.walk(ast.parse((tmp_path / "b.py").read_text())) if isinstance(n, ast.ImportFrom)]
    assert [n.module for n in inside] == ["eagle_dist.x"]


def test_every_imported_name_exists():
    missing = []
    for mod, path in list(MODULES.items()) + [(f"tests:{p.name}", p) for p in PACKAGE.parent.joinpath("tests").rglob("*.py")]:
        for module, name, line in _from_imports(path):
            if f"{module}.{name}" in MODULES or name == "*":
                continue
            if module not in MODULES:
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports from {module}, which does not exist")
            elif name not in _defined_names(MODULES[module]):
                missing.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} from {module}, "
                               "which does not define it")
    assert missing == []


def test_errors_module_imports_nothing():
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
