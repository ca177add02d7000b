"""The documentation holds together: every link and anchor resolves, CONTRIBUTING.md's layout names every module,
the generated config-key table matches the config classes, and README.md stays a front page whose first commands
are the ones CI runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from firered_core.training import config_keys

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{shown(path)}: {target} (no such file)")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{shown(path)}: {target} (no such heading)")
    return bad


def test_slugs_follow_github():
    assert slug("A first edit") == "a-first-edit"
    assert slug("Plain path: ours against diffusers") == "plain-path-ours-against-diffusers"
    assert slug("firered-edit") == "firered-edit"
    assert slug("ComfyUI in a real headless ComfyUI") == "comfyui-in-a-real-headless-comfyui"
    assert slug("Full size on a `GPU` (H200)") == "full-size-on-a-gpu-h200"


def test_link_checker_catches_planted_breaks(tmp_path):
    (tmp_path / "b.md").write_text("# Title\n\n## Some part\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#some-part) [file](c.md) [anchor](b.md#other) [self](#title-here)\n\n# Title here\n"
                    "```\n[in code](nowhere.md)\n```\n")
    bad = broken_links(page)
    assert len(bad) == 2 and "c.md" in bad[0] and "b.md#other" in bad[1]


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_link_and_anchor_resolves(page):
    assert page.exists()
    assert not broken_links(page), "\n".join(broken_links(page))


def test_docs_pages_exist_and_are_linked_from_the_front_page():
    readme = (ROOT / "README.md").read_text()
    for name in ("comfyui", "cli", "formats-and-lora", "speed-and-memory", "training", "post-training", "evaluation",
                 "data-tools", "errors", "benchmarks", "verification"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name
        assert f"(docs/{name}.md" in readme, f"README.md does not link docs/{name}.md"
    assert "(CONTRIBUTING.md)" in readme


def test_readme_is_a_front_page_that_starts_with_the_ci_commands():
    """README stays short, and its first code block holds exactly the two commands .ci/run executes."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(commands) == 2
    for command in commands:
        assert command in ci, command


def modules() -> list[str]:
    out = subprocess.run(["git", "ls-files", "__init__.py", "firered_core/*.py", "nodes/*.py", "training/*.py",
                          "benchmarks/*.py", "scripts/*.py"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.split() if (ROOT / p).is_file()]


def test_contributing_layout_names_every_module():
    """One line per module, `path` first: a new module without its line (or a line for a module that is gone)
    fails here."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    layout = text[text.index("## Layout"):text.index("## Conventions")]
    listed = re.findall(r"^- `([\w/.]+\.py)` — \S", layout, re.M)
    missing = sorted(set(modules()) - set(listed))
    stale = sorted(set(listed) - set(modules()))
    assert not missing, f"CONTRIBUTING.md's layout lacks: {missing}"
    assert not stale, f"CONTRIBUTING.md's layout lists modules that do not exist: {stale}"
    assert len(listed) == len(set(listed)), "a module is listed twice"


def test_config_key_table_matches_the_config_classes():
    page = (ROOT / "docs" / "training.md").read_text()
    generated = config_keys.replace_between_markers(page, config_keys.markdown_table())
    assert page == generated, "docs/training.md's config-key table is stale: python -m " \
                              "firered_core.training.config_keys --write"
    keys = {r.key for r in config_keys.rows()}
    assert {"lora.rank", "nft.reward.judge.model", "validation.seed", "low_vram.resident_blocks"} <= keys


def test_config_key_rows_read_types_ranges_and_defaults():
    rows = {r.key: r for r in config_keys.rows()}
    assert rows["lora.rank"].type == "int" and rows["lora.rank"].range == ">= 1" and rows["lora.rank"].default == "16"
    assert rows["method"].range == "lora / full"
    assert rows["ema_decay"].range == ">= 0, < 1"
    assert rows["outlier"].type == "float or null"
    assert "stop_after" not in rows  # test-only
