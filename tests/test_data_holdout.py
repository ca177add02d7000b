"""Curation judged on real photographs it was never tuned on (firered_core/data/photos.py: skimage.data photographs
cut into regions; SPLITS declares which photographs and seeds tuned the limits and which are held out), with the
stages exactly as training/configs/curate.yaml ships them; plus the pieces: pair-aware quality locating the edit,
de-duplication keeping the clean member, pair checks agreeing, out-of-range cut-offs reported, artefact boxes drawn.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")
pytest.importorskip("cv2")
pytest.importorskip("imagehash")

from firered_core.data import load_pipeline_config, run_pipeline  # noqa: E402
from firered_core.data.photos import (SPLITS, STRENGTHS, clean_edit, defect, make_photo_set,  # noqa: E402
                                      photograph, regions)

SHIPPED = Path(__file__).resolve().parents[1] / "training" / "configs" / "curate.yaml"
JUDGED = ("quality", "artefacts", "pair_check", "fine_check")
# Measured on this test's held-out subset (seed 100; coffee, chelsea, stereo_motorcycle, gravel; 32 clean rows,
# 8 visible rows per class): clean kept 30/32 = 0.938, pooled visible recall 76/80 = 0.95, worst class noise 6/8.
# The targets (clean >= 0.95, every class >= 0.9) are NOT all met on held-out material (the benchmark's
# full held-out table in docs/benchmarks.md: clean 0.891, noise 0.78, logo 0.84). Floors: the measured value less
# 3 binomial standard deviations at this sample size (a regression guard, not the target).
CLEAN_FLOOR = 0.80  # 0.938 - 3 * sqrt(0.938 * 0.062 / 32) = 0.81
POOLED_FLOOR = 0.87  # 0.95 - 3 * sqrt(0.95 * 0.05 / 80) = 0.877
CLASS_FLOOR = 0.5  # per class, 8 rows: half of them at least (measured 0.75 at worst)


def shipped(kinds=JUDGED) -> list[dict]:
    cfg = load_pipeline_config(SHIPPED, ["input=/in", "output=/out"])
    return [s.model_dump() for s in cfg.stages if s.kind in kinds]


def test_tuning_dev_and_heldout_material_never_meet_and_the_shipped_limits_are_the_defaults():
    splits = list(SPLITS.values())
    for i, (photos, seeds) in enumerate(splits):
        for other_photos, other_seeds in splits[i + 1:]:
            assert not set(photos) & set(other_photos) and not set(seeds) & set(other_seeds)
    from firered_core.data.config import ArtefactConfig, QualityConfig

    by_kind = {s["kind"]: s for s in shipped()}
    for cls, kind in ((QualityConfig, "quality"), (ArtefactConfig, "artefacts")):
        default = cls().model_dump()
        for key in ("exposure_up", "exposure_down", "clip", "cast", "wb", "blur", "noise", "blocky", "text",
                    "mosaic", "collage"):
            if key in default:
                assert by_kind[kind][key] == default[key], (kind, key)  # what ships is what the tests prove


def test_heldout_photographs_meet_the_floors(tmp_path):
    """One held-out seed, four held-out photographs (a colour picture, a face-free animal, a stereo view and a
    grey texture), the visible strengths of every class, 8 clean rows each (the benchmark runs all 8, 2 seeds)."""
    from firered_core.data.holdout import decide_set, format_table, score_set, table

    truth = make_photo_set(tmp_path, "dev", size=96, clean_per=8, levels=(1, 2), seeds=(100,),
                           images=("coffee", "chelsea", "stereo_motorcycle", "gravel"))
    stages = shipped()
    rows, scores = score_set(tmp_path / "data", stages, 256, work=tmp_path / "work")
    what, reason = decide_set(rows, scores, stages, 256)
    result = table(truth, what, levels=3)
    print("\n" + "\n".join(format_table(result, STRENGTHS)))
    lost = [(u, reason[u]) for u, t in truth.items() if t["class"] == "clean" and u in what]
    print("clean rows lost:", lost)
    assert result["clean_kept"] >= CLEAN_FLOOR, lost
    visible = [u for u, t in truth.items() if t["visible"]]
    assert sum(1 for u in visible if u in what) / len(visible) >= POOLED_FLOOR
    for cls, r in result["classes"].items():
        assert r["visible"] >= 6, (cls, r)
        missed = [(u, truth[u]) for u, t in truth.items() if t["class"] == cls and t["visible"] and u not in what]
        assert r["visible_recall"] >= CLASS_FLOOR, (cls, missed)


def test_pair_quality_finds_the_edit_and_measures_the_rest():
    """A region of a held-out photograph, a clean local edit: the edit is located (inside the planted blob) and
    every score outside it is ~0; the same pair one stop darker reads -1 stop (linear light: exact up to uint8
    rounding and the few clipped pixels), a colour cast is seen, and the edit is still located."""
    from firered_core.data.pairquality import edit_region, pair_quality

    crops, _ = regions(photograph("coffee"), 96)
    src = crops[4]
    rng = np.random.default_rng(7)
    tgt = clean_edit(src, "object", rng)
    changed = (np.abs(tgt.astype(int) - src).max(axis=-1) > 0)
    region = edit_region(src, tgt, 16)
    cells = np.kron(region, np.ones((6, 6), bool))
    assert region.any() and changed[cells].mean() > 0.3 and not changed[~cells].any()
    clean = pair_quality(src, tgt)
    assert abs(clean["exposure"]) < 0.02 and clean["cast"] < 0.5 and abs(clean["detail"]) < 0.05
    dark = pair_quality(src, defect(tgt, "underexposed", 1.0, rng))
    assert abs(dark["exposure"] + 1.0) < 0.05, dark
    cast = pair_quality(src, defect(tgt, "colour_cast", 0.2, rng))
    assert cast["cast"] > 3 and cast["wb"] > 0.1 and cast["edit_share"] > 0


def _photo_rows(tmp_path, pictures: dict[str, np.ndarray], source: np.ndarray) -> Path:
    root = tmp_path / "rows" / "edit"
    (root / "img").mkdir(parents=True)
    Image.fromarray(source).save(root / "img" / "src.png")
    lines = []
    for name, arr in pictures.items():
        Image.fromarray(arr).save(root / "img" / f"{name}.png")
        lines.append(json.dumps({"source_image": "img/src.png", "target_image": f"img/{name}.png",
                                 "instruction": name}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "rows"


def test_dedup_keeps_the_clean_member_and_says_why(tmp_path):
    """The clean original last in the input, then copies with overlay text and with noise (both sharper than the
    original): de-dup keeps the original and names it as the kept row."""
    from firered_core.data.descriptors import sharpness_only

    crops, textured = regions(photograph("chelsea"), 96)
    src = crops[int(np.argmax(textured))]
    rng = np.random.default_rng(3)
    tgt = clean_edit(src, "recolour", rng)
    pictures = {"text": defect(tgt, "text", 0.14, rng), "noisy": defect(tgt, "noise", 10.0, rng), "clean": tgt}
    assert all(sharpness_only(pictures[k]) > sharpness_only(tgt) for k in ("text", "noisy"))
    out = run_pipeline(load_pipeline_config(None, input=str(_photo_rows(tmp_path, pictures, src)),
                                            output=str(tmp_path / "out"), analysis_size=96,
                                            stages=[{"kind": "dedup", "hash_bits": 16}], engine={"workers": 0}))
    got = {json.loads(x)["row"]: json.loads(x) for x in out.decisions.read_text().splitlines()}
    assert got["edit/data:3"]["verdict"] == "keep", got
    for uid, what in (("edit/data:1", "overlay text"), ("edit/data:2", "noise")):
        assert got[uid]["verdict"] == "drop" and got[uid]["scores"]["kept"] == "edit/data:3", got[uid]
        assert what in got[uid]["reason"], got[uid]["reason"]


def test_pair_checks_agree_before_calling_a_pair_unrelated(tmp_path):
    """Clean object edits of flat tuning regions whose pHash moved >= 30 bits (pHash alone called them unrelated)
    stay, because the thumbnails' SSIM says they are the same picture; a truly unrelated pair is still dropped."""
    from firered_core.data.rows import make_row
    from firered_core.data.stages import build_stage

    stage = build_stage({"kind": "pair_check"}, {"output": str(tmp_path), "analysis_size": 96})
    rows = []
    for name, region, seed in (("moon", 3, 1), ("camera", 2, 1)):
        src = regions(photograph(name), 96)[0][region]
        Image.fromarray(src).save(tmp_path / f"{name}_src.png")
        Image.fromarray(clean_edit(src, "object", np.random.default_rng(seed))).save(tmp_path / f"{name}_tgt.png")
        rows.append(make_row(f"e/{name}:1", "e", [str(tmp_path / f"{name}_src.png")], str(tmp_path / f"{name}_tgt.png"),
                             {}))
    Image.fromarray(regions(photograph("astronaut"), 96)[0][8]).save(tmp_path / "far.png")  # another photograph
    rows.append(make_row("x/data:1", "x", [str(tmp_path / "moon_src.png")], str(tmp_path / "far.png"), {}))
    scores = [stage.score(r) for r in rows]
    assert all(s["related_bits"] >= stage.cfg.unrelated_bits for s in scores), scores  # pHash alone: all unrelated
    verdicts = [d["verdict"] for d in stage.decide(rows, rows, scores).decisions]
    assert verdicts == ["keep", "keep", "drop"], (verdicts, scores)


def test_out_of_range_cutoff_is_an_error_in_the_report(tmp_path):
    from firered_core.data.planted import make_planted

    make_planted(tmp_path / "raw", clean=6, per_defect=0, size=64, seed=2)
    out = run_pipeline(load_pipeline_config(None, input=str(tmp_path / "raw" / "data"), output=str(tmp_path / "o"),
                                            analysis_size=64, stages=[{"kind": "photometric", "fence": 20}],
                                            engine={"workers": 0}))
    problems = out.summary[1].get("problems", [])
    assert any("brightness" in p and "outside 0..255" in p for p in problems), problems
    assert "outside 0..255" in (out.output / "report" / "00-photometric.html").read_text()


def test_local_mosaic_is_located_and_drawn(tmp_path):
    """A mosaic over the middle half of a held-out region: found in a window, its box in the decision overlaps the
    planted square, and the report's thumbnail of the dropped row carries the red box."""
    crops, textured = regions(photograph("stereo_motorcycle"), 96)
    src = crops[int(np.argmax(textured))]
    tgt = src.copy()  # the middle half of the picture (the case), 8 px blocks
    block = Image.fromarray(src[24:72, 24:72]).resize((6, 6), Image.BOX).resize((48, 48), Image.NEAREST)
    tgt[24:72, 24:72] = np.asarray(block)
    out = run_pipeline(load_pipeline_config(None, input=str(_photo_rows(tmp_path, {"mosaic": tgt}, src)),
                                            output=str(tmp_path / "out"), analysis_size=96,
                                            stages=[{"kind": "artefacts"}], engine={"workers": 0}))
    d = json.loads(out.decisions.read_text().splitlines()[0])
    assert d["verdict"] == "drop" and "mosaic" in d["reason"], d
    name, x0, y0, x1, y1, what = d["scores"]["boxes"][0]
    ix = max(0, min(x1, 0.75) - max(x0, 0.25)) * max(0, min(y1, 0.75) - max(y0, 0.25))
    assert name == "target" and what == "mosaic" and ix / ((x1 - x0) * (y1 - y0)) > 0.5, d["scores"]["boxes"]
    html = (out.output / "report" / "00-artefacts.html").read_text()
    thumbs = html.split('data:image/jpeg;base64,')[1:]
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(thumbs[1].split('"')[0]))))  # the target's thumbnail
    red = (img[..., 0] > 180) & (img[..., 1] < 80) & (img[..., 2] < 80)
    assert red.sum() > 40, red.sum()
