"""The package's floors (ARCHITECTURE.md): imports only run downward, and no tool imports another.

Floors, bottom to top: errors/constants/compat/profiling; config/distributed/checkpoint;
method/data; engine/evaluation; cli.  The bench tool is one tool in three modules (step and
eigen in cli/bench.py, data in cli/bench_data.py, the GPU check in cli/bench_gpu.py); cli/__init__
holds argument types the tools share.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "eagle_dist"
FLOORS = {"errors": 0, "constants": 0, "compat": 0, "profiling": 0,
          "config": 1, "distributed": 1, "checkpoint": 1,
          "method": 2, "data": 2, "engine": 3, "evaluation": 3, "cli": 4}
TOP = 5  # the `python -m eagle_dist.<tool>` modules
BENCH = {"eagle_dist.cli.bench", "eagle_dist.cli.bench_data", "eagle_dist.cli.bench_gpu"}


def _floor(module: str) -> int:
    return FLOORS.get(module.split(".")[1], TOP)


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imports(path: Path) -> list[str]:
    """What the module imports; not what its `if __name__ == "__main__":` block does, which runs
    only when the module is the program (eagle_dist/checkpoint.py's `python -m` shim to its tool)."""
    tree = ast.parse(path.read_text())
    tree.body = [node for node in tree.body if not _is_main_guard(node)]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eagle_dist"):
            found += [f"{node.module}.{a.name}" for a in node.names] if node.module == "eagle_dist" else [node.module]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("eagle_dist")]
    return [m for m in found if m != "eagle_dist"]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def test_imports_only_run_downward():
    upward = [f"{mod} imports {target}" for mod, path in _modules() if mod != "eagle_dist"
              for target in _imports(path) if _floor(target) > _floor(mod)]
    assert upward == []


def test_no_tool_imports_another_tool():
    crossing = []
    for mod, path in _modules():
        if not mod.startswith("eagle_dist.cli.") or mod == "eagle_dist.cli.main":
            continue
        for target in _imports(path):
            tool = ".".join(target.split(".")[:3])
            if tool.startswith("eagle_dist.cli.") and tool != mod and not {tool, mod} <= BENCH:
                crossing.append(f"{mod} imports {target}")
    assert crossing == []


def test_errors_module_imports_nothing():
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
