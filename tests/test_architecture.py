"""The layers of docs/architecture.md, checked on the source: the import graph of `src/difflm` (every
import, module-level or inside a function) has no cycle, the low layers import no high one, and no
file or function grows past the size a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "difflm"

# layer -> the layers it must not import (docs/architecture.md, "Layers")
HIGH = ("commands", "systems", "train", "evaluate")
FORBIDDEN: dict[str, tuple[str, ...]] = {low: HIGH for low in ("models", "diffusion", "data", "sampling")}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    files = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def resolve(name: str, modules: set[str]) -> str | None:
    """The module `name` lands on: itself, else its longest prefix that is a module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The difflm modules `module` imports anywhere in its file; `from a import b` counts `a.b`
    when b is a submodule, relative imports are made absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            if name.split(".")[0] == PACKAGE and (target := resolve(name, modules)) not in (None, module):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    modules = set(files)
    return {module: imports_of(module, path, modules) for module, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a] (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return path[path.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_find_cycle_reports_the_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_resolve_submodules_and_relative_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from difflm.sub import leaf\n")
    modules = {"difflm.sub", "difflm.sub.leaf"}
    assert imports_of("difflm.sub", pkg / "sub" / "__init__.py", modules) == {"difflm.sub.leaf"}
    assert imports_of("difflm.sub.leaf", pkg / "sub" / "leaf.py", modules) == {"difflm.sub"}


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_low_layers_import_no_high_layer():
    broken = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if layer(target) in FORBIDDEN.get(layer(module), ())
    ]
    assert not broken, "layer rule broken (docs/architecture.md):\n" + "\n".join(broken)


MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 80


def test_files_and_functions_stay_short():
    too_long = []
    for module, path in module_files().items():
        source = path.read_text(encoding="utf-8")
        if source.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{module}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {length} lines")
    assert not too_long, "split these up:\n" + "\n".join(too_long)
