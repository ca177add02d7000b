"""firered_core's modules, and the benchmarks', import each other without a circle (a circle makes import order matter
and hides coupling)."""

from __future__ import annotations

import ast
from pathlib import Path

import firered_core

ROOT = Path(firered_core.__file__).parent
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The modules of ``modules`` that ``path`` imports (at any depth of the file, lazy imports included)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules}
    return found - {name}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of the same package (``root``, a package folder) it imports."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: imports_of(path, set(files), root) for name, path in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None (a package importing its own submodules from its
    ``__init__`` counts as an edge like any other)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_finder_sees_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_firered_core_has_no_import_circle():
    edges = graph()
    assert "firered_core.formats.readers" in edges and edges["firered_core.formats.readers"]
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_benchmarks_have_no_import_circle():
    """lowvram_training and lowvram_estimate once imported each other; the step they share lives in _lora_step."""
    edges = graph(BENCHMARKS)
    assert "benchmarks._lora_step" in edges["benchmarks.lowvram_estimate"]
    assert "benchmarks._lora_step" in edges["benchmarks.lowvram_training"]
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)
