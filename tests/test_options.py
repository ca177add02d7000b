"""One declaration per speed option (firered_core/options.py): its settings field, CLI flag, node widget, range and
docs row all come from the same row. The checker below compares the places an option shows up; it fails when an
option exists in one and not the others, or when a range or default disagrees (planted cases prove it can fail)."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

import nodes_support as S
from firered_core import options as O
from firered_core.limits import Limit, OptionError
from firered_core.speed import ModelSettings, RunSettings, SettingsError

ROOT = Path(__file__).resolve().parents[1]
NODE_ONLY = {"block_cache"}  # the node's own switch of the block cache (threshold 0 when off)


def settings_fields() -> dict[str, tuple]:
    """name -> (half, default, ge, le) of every settings field."""
    out = {}
    for half, cls in (("model", ModelSettings), ("run", RunSettings)):
        for name, info in cls.model_fields.items():
            bounds = {type(m).__name__: m for m in info.metadata}
            out[name] = (half, info.default, getattr(bounds.get("Ge"), "ge", None), getattr(bounds.get("Le"), "le", None))
    return out


def cli_flags() -> dict[str, tuple]:
    """dest -> (flag, default) of every flag of the CLI's "speed and memory" group."""
    from firered_core.cli import build_parser

    parser = build_parser()
    group = next(g for g in parser._action_groups if g.title == "speed and memory")
    return {a.dest: (a.option_strings[0], a.default) for a in group._group_actions}


def node_widgets() -> dict[str, tuple]:
    inputs = S.classes()["FireRedSpeedSettings"].INPUT_TYPES()
    return {name: (spec[1].get("default"), spec[1].get("min"), spec[1].get("max"), where == "optional")
            for where in ("required", "optional") for name, spec in inputs[where].items()}


def doc_rows() -> set[str]:
    page = (ROOT / "docs" / "speed-and-memory.md").read_text()
    return set(re.findall(r"^\| `(\w+)` \((?:model|run)\) \|", page, re.M))


def disagreements(options, fields: dict, flags: dict, widgets: dict, docs: set) -> list[str]:
    """Every way the places disagree with the table (empty = one declaration holds)."""
    bad = []
    table = {o.name: o for o in options}
    for place, names in (("settings", set(fields)), ("CLI", set(flags)), ("node", set(widgets) - NODE_ONLY),
                         ("docs", docs)):
        bad += [f"{name}: in {place}, not in the option table" for name in sorted(names - set(table))]
        bad += [f"{name}: in the option table, not in {place}" for name in sorted(set(table) - names)]
    for name, o in table.items():
        lo, hi = (o.limit.lo, o.limit.hi) if o.limit else (None, None)
        if name in fields and fields[name] != (o.half, o.default, lo, hi):
            bad.append(f"{name}: settings field {fields[name]} != table {(o.half, o.default, lo, hi)}")
        if name in flags and flags[name] != (o.flag, o.default):
            bad.append(f"{name}: CLI {flags[name]} != table {(o.flag, o.default)}")
        if name in widgets:
            default = o.default if o.node_default is None else o.node_default
            want = ("" if default is None else default, lo, hi, o.optional)
            if widgets[name] != want:
                bad.append(f"{name}: node widget {widgets[name]} != table {want}")
    return bad


def test_every_option_is_everywhere_with_one_range_and_default():
    bad = disagreements(O.OPTIONS, settings_fields(), cli_flags(), node_widgets(), doc_rows())
    assert not bad, "\n".join(bad)


def test_checker_catches_an_option_missing_or_disagreeing():
    places = (settings_fields(), cli_flags(), node_widgets(), doc_rows())
    extra = replace(O.BY_NAME["block_swap"], name="resident_blocks")
    assert "resident_blocks: in the option table, not in settings" in disagreements((*O.OPTIONS, extra), *places)
    wider = tuple(replace(o, limit=Limit(int, 0, 1000, "x")) if o.name == "block_swap" else o for o in O.OPTIONS)
    assert any(b.startswith("block_swap: settings field") for b in disagreements(wider, *places))
    fields, flags, widgets, docs = places
    assert "quantize: in the option table, not in docs" in disagreements(O.OPTIONS, fields, flags, widgets,
                                                                          docs - {"quantize"})


def test_docs_table_is_the_generated_one():
    page = (ROOT / "docs" / "speed-and-memory.md").read_text()
    assert O.replace_between_markers(page, O.markdown_table()) == page, \
        "docs/speed-and-memory.md is stale: python -m firered_core.options --write"


@pytest.mark.parametrize("name", sorted(O.LIMITS))
def test_each_range_is_enforced_alike_by_settings_cli_and_node(name):
    """Just past each end of the declared range: the settings, the CLI check and the node refuse it; at the ends all
    three accept it."""
    lim = O.LIMITS[name]
    step = 1 if lim.kind is int else 1e-3
    node = S.classes()["FireRedSpeedSettings"]()
    base = {n: (spec[1]["default"]) for n, spec in node.INPUT_TYPES()["required"].items()}
    base["block_cache"] = True
    for value, ok in ((lim.lo, True), (lim.hi, True), (lim.lo - step, False), (lim.hi + step, False)):
        value = lim.kind(value)
        cls = ModelSettings if O.BY_NAME[name].half == "model" else RunSettings
        if ok:
            cls(**{name: value})
            O.check({name: value})
            node.settings(**{**base, name: value})
            continue
        with pytest.raises(SettingsError):
            cls(**{name: value})
        with pytest.raises(OptionError, match=re.escape(O.BY_NAME[name].flag)):
            O.check({name: value}, spell=lambda n: O.BY_NAME[n].flag)
        with pytest.raises(Exception, match=f"input '{name}'"):
            node.settings(**{**base, name: value})


def test_the_ranges_the_issue_found_disagreeing_now_agree():
    """block_swap was 0..1000 in the settings and 0..200 in LIMITS; cache_threshold unbounded in the settings;
    pack megapixels 0.05..4 on the node, 0.05..16 on the CLI, 0.01..16 in LIMITS."""
    from firered_core.cli import build_parser, check_number_args
    from firered_core.limits import LIMITS

    assert settings_fields()["block_swap"][2:] == (0, 200) == (O.LIMITS["block_swap"].lo, O.LIMITS["block_swap"].hi)
    assert settings_fields()["cache_threshold"][3] == 10.0
    with pytest.raises(SettingsError):
        RunSettings(cache_threshold=math.inf)
    pack = S.classes()["FireRedPackPictures"].INPUT_TYPES()["required"]["megapixels"][1]
    lim = LIMITS["pack_megapixels"]
    assert (pack["min"], pack["max"]) == (lim.lo, lim.hi)
    args = build_parser().parse_args(["-p", "x", "--pack-megapixels", str(lim.hi * 2)])
    with pytest.raises(OptionError, match="--pack-megapixels"):
        check_number_args(args)


def test_cli_parses_every_flag_into_the_settings():
    from firered_core.cli import build_parser
    from firered_core.speed import from_args

    args = build_parser().parse_args(["-p", "x", "--batched-cfg", "--cache-threshold", "0.1", "--block-swap", "3",
                                      "--no-embed-cache", "--embed-cache-dir", "d", "--attention", "flash",
                                      "--fp8-mode", "runtime", "--quantize", "int8", "--taylorseer"])
    speed = from_args(args)
    assert speed.run.batched_cfg and speed.run.cache_threshold == 0.1 and speed.run.taylorseer
    assert (speed.model.block_swap, speed.model.embed_cache, speed.model.embed_cache_dir) == (3, False, "d")
    assert (speed.model.attention, speed.model.fp8_mode, speed.model.quantize) == ("flash", "runtime", "int8")
    assert isinstance(build_parser(), argparse.ArgumentParser)
