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
# Seed 300 of the fresh held-out split (its five photographs, every class at three strengths: the same rows as that
# seed's part of the benchmark's held-out table in docs/benchmarks.md). The floors: clean rows kept >= 0.95
# and visible-strength recall >= 0.9, here pooled over the classes (~95 visible rows). Per class (~9 visible rows
# each here) a regression guard: 0.9 - 3 binomial standard deviations at n = 9 (0.6). Logo had its own lower guard
# (0.5) while it was short of 0.9 on the whole held-out split (34 of 40 visible rows at the first look); with the
# opacity-model watermark check it reads 38 of 40 (second look), so it takes the common guard.
CLEAN_FLOOR = 0.95
POOLED_FLOOR = 0.9
CLASS_GUARD = 0.6


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
    """One held-out seed, the five held-out photographs (a stereo view, a micrograph, handwriting, a printed page,
    faces), every class at three strengths, 8 clean rows each (the benchmark runs 4 seeds)."""
    from firered_core.data.holdout import decide_set, format_table, score_set, table

    truth = make_photo_set(tmp_path, "heldout", size=96, clean_per=8, seeds=(300,))
    stages = shipped()
    rows, scores = score_set(tmp_path / "data", stages, 256, work=tmp_path / "work")
    what, reason = decide_set(rows, scores, stages, 256)
    result = table(truth, what, levels=3)
    print("\n" + "\n".join(format_table(result, STRENGTHS)))
    lost = [(u, reason[u]) for u, t in truth.items() if t["class"] == "clean" and u in what]
    assert result["clean_kept"] >= CLEAN_FLOOR, lost
    visible = [u for u, t in truth.items() if t["visible"]]
    assert sum(1 for u in visible if u in what) >= POOLED_FLOOR * len(visible)
    for cls, r in result["classes"].items():
        assert r["visible"] >= 6, (cls, r)
        missed = [(u, truth[u]) for u, t in truth.items() if t["class"] == cls and t["visible"] and u not in what]
        assert r["visible_recall"] >= CLASS_GUARD, (cls, missed)


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


def _textured(name: str) -> np.ndarray:
    crops, textured = regions(photograph(name), 96)
    detail = [float(np.abs(np.diff(c.astype(np.float32).mean(axis=2), axis=1)).mean()) for c in crops]
    return crops[int(np.argmax(detail))]


def test_added_noise_is_read_through_texture():
    """The noise score is the target's fine detail its source does not explain: on the most textured region of a
    tuning photograph (brick: the texture that hid noise from the flat-cell measure) a clean edit reads ~0 and
    Gaussian noise of sigma 7 / 14 reads 7 / 14 (+-1: the estimate's spread over 64-cell medians); blur reads less
    than the faintest planted noise (sigma 3): blur is not read as noise."""
    from firered_core.data.pairquality import pair_quality

    src = _textured("brick")
    rng = np.random.default_rng(11)
    tgt = clean_edit(src, "object", rng)
    assert pair_quality(src, tgt)["noise"] < 1.0
    for sigma in (7.0, 14.0):
        got = pair_quality(src, defect(tgt, "noise", sigma, rng))["noise"]
        assert abs(got - sigma) < 1.0, (sigma, got)
    assert pair_quality(src, defect(tgt, "blurred", 1.2, rng))["noise"] < 3.0  # below the faintest planted noise


def test_paired_text_ignores_covered_texture_and_sees_a_faint_watermark():
    """Overlay text in a pair: an object covering a textured tuning region (its texture shows, inverted, in the
    difference) is not text; a watermark at 0.6 opacity (the visible strength) is."""
    from firered_core.data.artefacts import text_find
    from firered_core.data.config import ArtefactConfig

    limit = ArtefactConfig().text
    src = _textured("brick")
    rng = np.random.default_rng(4)
    for seed in range(4):
        tgt = clean_edit(src, "object", np.random.default_rng(seed))
        assert text_find(tgt, src)[0] < limit, seed
    assert text_find(defect(src, "logo", 0.6, rng), src)[0] >= limit


def test_collage_counts_only_borders_the_source_lacks(tmp_path):
    """A source with its own straight strong line (a horizon) and a clean relight of it: not a collage (the source
    is no longer judged alone, and a brightened edge is not a new one); the same target with a pasted picture's
    border is."""
    from firered_core.data.artefacts import collage_score
    from firered_core.data.config import ArtefactConfig

    limit = ArtefactConfig().collage
    src = regions(photograph("camera"), 96)[0][4].copy()
    src[48:, :] = np.clip(src[48:, :].astype(int) + 60, 0, 255).astype(np.uint8)  # a straight horizon
    assert collage_score(src) >= limit  # alone, the horizon looks like a border
    tgt = clean_edit(src, "relight", np.random.default_rng(2))
    assert collage_score(tgt, ref=src) < limit
    pasted = tgt.copy()
    pasted[:, 40:] = regions(photograph("astronaut"), 96)[0][2][:, 40:]
    assert collage_score(pasted, ref=src) >= limit
    out = run_pipeline(load_pipeline_config(None, input=str(_photo_rows(tmp_path, {"relit": tgt}, src)),
                                            output=str(tmp_path / "out"), analysis_size=96,
                                            stages=[{"kind": "artefacts"}], engine={"workers": 0}))
    assert json.loads(out.decisions.read_text().splitlines()[0])["verdict"] == "keep"


def test_trivial_edit_is_compression_not_a_weak_visible_edit():
    """fine_check's local change: a JPEG q95 re-save of a saturated synthetic scene (chroma smeared across its
    edges) stays under trivial_local; a visible relight of a tuning photograph's region goes over it."""
    from firered_core.data.config import FineCheckConfig
    from firered_core.data.descriptors import local_change
    from firered_core.data.planted import base_scene, finish, texture
    from firered_core.data.render import jpeg

    limit = FineCheckConfig().trivial_local
    rng = np.random.default_rng(1)
    scene = np.asarray(finish(base_scene(rng, 128, 128), texture(rng, 128, 128)))
    assert local_change(scene, np.asarray(jpeg(Image.fromarray(scene), 95))) < limit
    src = regions(photograph("moon"), 96)[0][4]
    for seed in range(3):
        rng = np.random.default_rng(seed)
        assert local_change(src, clean_edit(src, "relight", rng)) > limit, seed


def test_overlay_opacity_reads_the_same_over_dark_and_bright_ground():
    """The watermark model of the paired text check: a white overlay of opacity a lifts a pixel s to
    s + a (255 - s), so (target - source) / (255 - s) reads a wherever a stroke covers the pixel fully, over a dark
    wall (s = 40, the difference is 0.35 x 215 = 75 levels) and over a bright one (s = 215: 14 levels, under the
    difference mask's 24). Bound: PIL composes in 8-bit (+-1 level of alpha, +-0.5 of the result), so a reads
    within 1/255 + 0.5/40 (the smallest room, 40 levels) = 0.017, +1/255 for the map's own rounding. A 0.6
    watermark (the weaker visible strength) over the bright wall is then found as text; the difference alone
    misses it."""
    from firered_core.data.artefacts import _overlay_alpha, text_find
    from firered_core.data.config import ArtefactConfig

    rng = np.random.default_rng(0)
    for ground in (40, 215):
        src = np.full((96, 96, 3), ground, np.uint8)
        for opacity in STRENGTHS["logo"][0]:
            got = float(_overlay_alpha(defect(src, "logo", opacity, rng), src, light=True).max()) / 255
            assert abs(got - opacity) <= 1 / 255 + 0.5 / 40 + 1 / 255, (ground, opacity, got)  # + the map's rounding
    import cv2

    from firered_core.data.artefacts import _best_line, _strokes
    from firered_core.data.imageops import gray

    src = np.clip(215 + rng.normal(0, 2, (96, 96, 1)), 0, 255).repeat(3, axis=2).astype(np.uint8)  # re-encoding
    tgt = defect(src, "logo", 0.6, rng)
    diff = np.clip(128.0 + gray(tgt) - gray(src), 0, 255).astype(np.uint8)
    own = np.clip(gray(tgt), 0, 255).astype(np.uint8)
    masks = _strokes(cv2, diff, cv2.MORPH_TOPHAT, 24) & _strokes(cv2, own, cv2.MORPH_TOPHAT, 12)
    assert _best_line(cv2, masks, (0, None))[0] < ArtefactConfig().text  # the difference alone: missed
    assert text_find(tgt, src)[0] >= ArtefactConfig().text


def test_dedup_keeps_the_original_over_a_contrast_cut_copy(tmp_path):
    """A copy of a pair with its contrast cut by 0.85 (``dup_jitter`` of the synthetic set) clips fewer pixels than
    its original (a dark tuning region, 15% crushed shadows): judged against the whole group the original would
    count worse on clipping and lose. Clipping is judged only against members of at least a row's contrast, so
    the original (the copy first in the input) is kept, as the sharper of two equally clean rows."""
    from firered_core.data.planted import _copy

    crops, _ = regions(photograph("camera"), 96)
    src = crops[int(np.argmax([float((c.max(-1) <= 5).mean()) for c in crops]))]
    assert float((src.max(-1) <= 5).mean()) > 0.1
    tgt = clean_edit(src, "relight", np.random.default_rng(2))
    rng = np.random.default_rng(5)
    root = tmp_path / "rows" / "edit"
    (root / "img").mkdir(parents=True)
    pairs = {"copy": [np.asarray(_copy(Image.fromarray(a), "dup_jitter", rng)) for a in (src, tgt)],
             "orig": [src, tgt]}
    lines = []
    for name, (s, t) in pairs.items():
        Image.fromarray(s).save(root / "img" / f"{name}_s.png")
        Image.fromarray(t).save(root / "img" / f"{name}_t.png")
        lines.append(json.dumps({"source_image": f"img/{name}_s.png", "target_image": f"img/{name}_t.png",
                                 "instruction": "relight"}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    out = run_pipeline(load_pipeline_config(None, input=str(tmp_path / "rows"), output=str(tmp_path / "out"),
                                            analysis_size=96, stages=[{"kind": "dedup"}], engine={"workers": 0}))
    got = {json.loads(x)["row"]: json.loads(x) for x in out.decisions.read_text().splitlines()}
    assert got["edit/data:2"]["verdict"] == "keep", got
    assert got["edit/data:1"]["verdict"] == "drop" and got["edit/data:1"]["scores"]["kept"] == "edit/data:2"
    assert "as clean and sharper" in got["edit/data:1"]["reason"], got["edit/data:1"]["reason"]
