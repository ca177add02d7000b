"""Every module the sources and docs name exists: a rename (issue 27: validation -> limits, cache -> block_cache,
data/evaluate -> data/scorecard, training/validation -> training/previews) leaves no stale ``firered_core.x`` name in
an error, a docstring or a page, and no stale ``path/to/module.py`` either."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOTTED = re.compile(r"\bfirered_core(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"(?<![\w/.])((?:firered_core|nodes|benchmarks|training|tests|scripts)/[\w/]+\.py)\b")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.split("\0") if p and (ROOT / p).is_file()]


def module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def stale_dotted(name: str) -> str | None:
    """Why ``firered_core.a.b.c`` names nothing, or None: its longest module prefix must exist and the next part must
    be a word of that module's source (a function, class, constant or re-export)."""
    parts = [p for p in name.split(".") if not p.startswith("__")]  # firered_core.__file__ is the package
    for cut in range(len(parts), 0, -1):
        found = module_file(parts[:cut])
        if found is not None:
            break
    else:
        return "no such module"
    if cut == 1 and len(parts) > 1:
        return f"no module firered_core.{parts[1]}"
    if cut < len(parts) and not re.search(rf"\b{re.escape(parts[cut])}\b", found.read_text()):
        return f"{parts[cut]!r} is not in {found.relative_to(ROOT)}"
    return None


def test_checker_catches_planted_stale_names():
    assert stale_dotted("firered_core.testing") is not None
    assert stale_dotted("firered_core.validation.LIMITS") is not None
    assert stale_dotted("firered_core.limits.NOT_A_NAME_HERE") is not None
    assert stale_dotted("firered_core.limits.LIMITS") is None
    assert stale_dotted("firered_core.block_cache.BlockCache") is None


def test_every_named_module_exists():
    stale = []
    for path in tracked("*.py", "*.md", "*.toml"):
        if path == Path(__file__).resolve():  # its planted names are meant to be stale
            continue
        text = path.read_text(errors="replace")
        for name in sorted(set(DOTTED.findall(text))):
            if (why := stale_dotted(name)) is not None:
                stale.append(f"{path.relative_to(ROOT)}: {name} ({why})")
        for rel in sorted(set(PATH.findall(text))):
            if not (ROOT / rel).is_file():
                stale.append(f"{path.relative_to(ROOT)}: {rel} (no such file)")
    assert not stale, "\n".join(stale)


def test_unknown_text_encoder_error_names_real_configurations():
    """The error lists the known configurations by names a user can look up (no module that does not exist)."""
    from firered_core.errors import FireRedError
    from firered_core.formats import detect_text_encoder_config

    with pytest.raises(FireRedError) as err:
        detect_text_encoder_config({"model.language_model.norm.weight": (48,)}, None, "te.safetensors")
    message = str(err.value)
    assert "te.safetensors" in message and "FireRed demo model tiny" in message
    assert "firered_core.testing" not in message
    assert all(stale_dotted(m) is None for m in DOTTED.findall(message))
