"""No module in nodes/ or firered_core/ is over 450 lines: a module that grows past it holds more than one idea and
is split (CONTRIBUTING.md, conventions)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450


def too_long(folder: Path, limit: int = MAX_LINES) -> list[str]:
    """``path: N lines`` for every Python file under ``folder`` longer than ``limit`` lines."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > limit:
            out.append(f"{path.relative_to(folder.parent)}: {n} lines")
    return out


def test_checker_catches_a_planted_long_module(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "short.py").write_text("x = 1\n" * MAX_LINES)
    (pkg / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert too_long(pkg) == [f"pkg/long.py: {MAX_LINES + 1} lines"]


def test_no_module_in_nodes_or_firered_core_is_over_450_lines():
    over = too_long(ROOT / "firered_core") + too_long(ROOT / "nodes")
    assert not over, "split these modules by idea: " + "; ".join(over)
