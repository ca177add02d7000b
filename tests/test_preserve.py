"""Automatic preservation (``preserve``): on held-out real photographs with planted edits (local change, colour
drift, shift / zoom, tiny-VAE noise) the estimated region matches the planted one and every pixel outside it is the
input's own; a global change is returned whole with a note; the node does the same on IMAGE batches.

The thresholds were tuned on ``planted_edits.TUNING``; the held-out test uses only ``HELD_OUT`` photographs at the
declared ``TEST_SEED`` (a smaller draw than the benchmark's; ``benchmarks/preserve.py`` prints the full held-out
table); the shift-search test uses a tuning-half case."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch

from firered_core import preserve as PV
from firered_core import registration as R
from firered_core.evaluation import planted_edits as P

sys.path.insert(0, os.path.dirname(__file__))

SIDE = 128
# The held-out benchmark (docs/benchmarks.md, round 7: 108 cases at 192 px, fresh seeds 71-74, looked at once, after
# that round's change) measured an IoU mean of 0.931 for the returned mask (per-case sd 0.133, heavy-tailed: the misses
# are near 0.0-0.6) and 88.0 % of cases at IoU >= 0.9. The 0.9 per case is not reached, so this is a
# regression guard at the measurement minus 3 sigma for 18 cases: mean >= 0.931 - 3 * 0.133 / sqrt(18) = 0.837; share
# >= 0.9 at least 0.880 - 3 * sqrt(0.880 * 0.120 / 18) = 0.65, i.e. 12 of 18. (This draw, TEST_SEED, measured 0.962,
# 17 of 18; the estimator before rounds 6-7 measured 0.969 and 18 of 18 on it.)
HELD_OUT_MEAN_FLOOR = 0.83
HELD_OUT_SHARE_FLOOR = 12 / 18


@pytest.fixture(scope="module")
def held_out_cases():
    """The CI draw: 2 cases on each HELD_OUT photograph at the declared TEST_SEED, 192 px as in the benchmark."""
    return P.cases(P.HELD_OUT, 192, 2, seed=P.TEST_SEED)


def test_held_out_regions_match_and_outside_is_bit_exact(held_out_cases):
    ious = []
    for case in held_out_cases:
        result = PV.preserve(case.source, case.edited)
        region = result.estimate.region
        if result.estimate.unsure:  # returned whole, as documented
            assert torch.equal(result.image, case.edited) and "returned whole" in result.note
        else:
            out, src = P.to_8bit(result.image), P.to_8bit(case.source)
            np.testing.assert_array_equal(out[~region.numpy()], src[~region.numpy()])
            assert torch.equal(result.mask > 0, region)
        ious.append(P.iou(result.mask > 0, case.region))  # what the user gets: unsure -> the whole picture
    ious = np.array(ious)
    assert len(ious) == 18
    assert ious.mean() >= HELD_OUT_MEAN_FLOOR and (ious >= 0.9).mean() >= HELD_OUT_SHARE_FLOOR, ious.round(3)


def test_rim_is_trimmed_to_the_half_change_point():
    """A rectangle of new colour blended over 1.5 px spills past its edge above any noise-relative threshold; the
    rim trim puts the region's edge back where the change is half its size (within half a pixel all round)."""
    src = P.photo("coins", 96)
    truth = torch.zeros(src.shape[:2], dtype=torch.bool)
    truth[30:60, 25:65] = True
    alpha = P._blur(truth.float(), 1.5)[..., None]
    edited = P.quantize(src * (1 - alpha) + torch.tensor([0.9, 0.2, 0.1]) * alpha)
    on = PV.estimate_region(src, edited)[0].region
    off = PV.estimate_region(src, edited, dataclasses.replace(PV.DEFAULT, edge_ratio=0.0))[0].region
    perimeter = 2 * (30 + 40)
    assert abs(int(on.sum()) - int(truth.sum())) <= perimeter / 2, (int(on.sum()), int(truth.sum()))
    assert int(off.sum()) - int(truth.sum()) > perimeter  # more than a pixel too wide all round without it
    assert P.iou(on, truth) > P.iou(off, truth)


def test_registration_recovers_planted_shift_and_zoom():
    src, other = P.photo("clock", SIDE), P.photo("coins", SIDE)
    for seed, geometry in ((1, "shift"), (3, "both")):
        case = P.plant("clock", src, other, seed=seed, fraction=0.1, geometry=geometry)
        reg = R.register(case.source, case.edited)
        p = case.params
        assert abs(reg.dx - p["dx"]) < 0.5 and abs(reg.dy - p["dy"]) < 0.5, (reg, p)
        assert abs(reg.scale - p["zoom"]) * SIDE / 2 < 0.6, (reg, p)


def test_drift_and_noise_alone_change_nothing():
    """No local change: the region is empty and the input comes back exactly."""
    src, other = P.photo("coins", SIDE), P.photo("gravel", SIDE)
    case = P.plant("coins", src, other, seed=4, fraction=0.0001, geometry="shift")
    result = PV.preserve(case.source, case.edited)
    assert result.estimate.fraction < 0.01 and not result.estimate.unsure
    np.testing.assert_array_equal(P.to_8bit(result.image)[~result.estimate.region.numpy()],
                                  P.to_8bit(case.source)[~result.estimate.region.numpy()])


@pytest.mark.parametrize("change", ["restyle", "other picture"])
def test_global_change_is_returned_whole_with_a_note(change):
    src = P.photo("brick", SIDE)
    if change == "restyle":
        edited = P.quantize((1 - src) ** 2 * torch.tensor([1.0, 0.6, 0.3]) + 0.2 * src.roll(9, 1))
    else:
        edited = P.photo("retina", SIDE)[:src.shape[0], :src.shape[1]]
    result = PV.preserve(src, edited)
    assert result.estimate.unsure and "returned whole" in result.note
    assert torch.equal(result.image, edited) and bool((result.mask == 1).all())


def test_colour_choices_and_bad_values():
    src, other = P.photo("cell", 64), P.photo("clock", 64)
    case = P.plant("cell", src, other, seed=5, fraction=0.15)
    outside = None
    for color in PV.PRESERVE_COLOR:
        result = PV.preserve(case.source, case.edited, color=color)
        outside = ~result.estimate.region if outside is None else outside
        assert torch.equal(result.image[outside], case.source[outside])
    with pytest.raises(PV.M.MaskError, match="preserve colour"):
        PV.preserve(case.source, case.edited, color="sepia")


def test_node_outputs_image_mask_and_note():
    import nodes_support as S

    node = S.classes()["FireRedPreserveUnedited"]()
    src, other = P.photo("gravel", 64), P.photo("cell", 64)
    cases = [P.plant("gravel", src, other, seed=s, fraction=0.1) for s in (8, 9)]
    edited = torch.stack([c.edited for c in cases])
    image, mask, note = node.preserve(edited, src[None], 2, "fit")
    S.check_value("IMAGE", image)
    S.check_value("MASK", mask)
    assert image.shape == edited.shape and mask.shape == edited.shape[:3] and len(note.splitlines()) == 2
    for k in range(2):
        keep = mask[k] == 0
        assert torch.equal(image[k][keep], src[keep])
    with pytest.raises(Exception, match="source"):
        node.preserve(edited, torch.stack([src] * 3), 2, "fit")


def test_morphology_torch_path_equals_scipy(monkeypatch):
    from firered_core import mask_ops as O

    if O.ndimage is None:
        pytest.skip("SciPy not installed: only the torch path exists")
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(60, 70, generator=gen) > 0.55
    seed = torch.rand(60, 70, generator=gen) > 0.97
    fast = (O.reconstruct(seed, mask), O.fill_holes(mask), O.remove_small(mask, 5))
    monkeypatch.setattr(O, "FORCE_TORCH", True)
    slow = (O.reconstruct(seed, mask), O.fill_holes(mask), O.remove_small(mask, 5))
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
    assert not torch.equal(fast[2], mask)  # some small components were removed


def _corner_error(reg: R.Registration, p: dict, height: int, width: int) -> float:
    """Largest misplacement (px) over the picture of a registration against the planted shift and zoom."""
    half_diag = 0.5 * float(np.hypot(height, width))
    return float(np.hypot(reg.dx - p["dx"], reg.dy - p["dy"])) + abs(reg.scale - p["zoom"]) * half_diag


def test_shift_search_recovers_what_a_large_paste_hides_from_phase_correlation(monkeypatch):
    """A 40 % paste of another photograph draws phase correlation's peak onto the paste; without the shift window,
    the misfit-chosen zoom and the ±3 px shift search it lands 1.9 px off at the corners (a 1.4 % zoom). With them:
    within 0.6 px everywhere (a tuning-half case: chelsea, seed 1)."""
    src, other = P.photo("chelsea", 192), P.photo("coffee", 192)
    case = P.plant("chelsea", src, other, seed=1074)
    p = case.params
    h, w = src.shape[:2]
    assert p["kind"] == "paste" and p["fraction"] >= 0.39 and p["zoom"] == 1.0, p
    reg = R.register(case.source, case.edited)
    assert _corner_error(reg, p, h, w) < 0.6, (reg, p)
    monkeypatch.setattr(R, "GRID_BELOW_PEAK", 0.0)  # no shift search ...
    monkeypatch.setattr(R, "SHIFT_RANGE", 0.5)  # ... and no window: phase correlation's peaks alone
    alone = R.register(case.source, case.edited)
    assert _corner_error(alone, p, h, w) > 1.5, (alone, p)


@pytest.mark.parametrize("kind, fraction", [("paste", 0.37), ("recolour", 0.30)])
def test_periodic_texture_is_registered_at_the_small_shift_not_one_period_away(kind, fraction, monkeypatch):
    """A tiled texture (a 64 px crop of coffee, a tuning photograph) correlates almost as well one period away: the
    highest phase-correlation peak lies at -65.5 px for a planted -1.5 px shift. The shift window (3 % of the side
    + 2 px) and the nearest strong peak register it, and the region is found."""
    src, other = P.tiled("coffee", 192), P.photo("grass", 192)
    case = P.plant("coffee-tiles", src, other, seed=101, fraction=fraction, kind=kind)
    p = case.params
    result = PV.preserve(case.source, case.edited)
    assert _corner_error(result.estimate.registration, p, *src.shape[:2]) < 0.6, (result.estimate.registration, p)
    assert not result.estimate.unsure and P.iou(result.estimate.region, case.region) >= 0.9
    keep = ~result.estimate.region.numpy()
    np.testing.assert_array_equal(P.to_8bit(result.image)[keep], P.to_8bit(case.source)[keep])
    monkeypatch.setattr(R, "ALIAS_RATIO", 1.0)  # the highest peak, anywhere: one period away (the luminances')
    monkeypatch.setattr(R, "SHIFT_RANGE", 0.5)
    lum = R._coarse(R.gray(case.source), R.gray(case.edited), R.SCALE_RANGE)
    assert abs(lum.dx - p["dx"]) > 32, (lum, p)
    if kind == "paste":
        assert abs(R.register(case.source, case.edited).dx - p["dx"]) > 32


def test_zoomed_periodic_texture_picks_its_zoom_by_misfit(monkeypatch):
    """A zoomed tiled texture (a 32 px crop of chelsea) under a 29 % paste: whitening spreads the correlation over
    the lattice, so the highest peak of any zoom lay a period away (-32.5, -32.5 px; IoU 0.49). Within the shift
    window, the zoom whose shift fits best, the shift search and the misfit polish find it (IoU 0.96) (a tuning-side analogue of brick and cell)."""
    src, other = P.tiled("chelsea", 192, crop=32), P.photo("astronaut", 192)
    case = P.plant("chelsea-tiles", src, other, seed=37)
    p = case.params
    assert p["geometry"] == "zoom" and p["kind"] == "paste" and p["fraction"] > 0.25, p
    result = PV.preserve(case.source, case.edited)
    # within a quarter period (measured: 2.0 px at the corners; the fine repeats of the crop leave the zoom loose)
    assert _corner_error(result.estimate.registration, p, 192, 192) < 8, (result.estimate.registration, p)
    assert P.iou(result.mask > 0, case.region) >= 0.9
    monkeypatch.setattr(R, "SHIFT_RANGE", 0.5)  # no window: both phase-correlation candidates lie a period away
    for a, b in ((R.gray(case.source), R.gray(case.edited)), (R.edges(case.source), R.edges(case.edited))):
        assert _corner_error(R._coarse(a, b, R.SCALE_RANGE), p, 192, 192) > 16


def test_zoom_beyond_the_search_is_returned_whole():
    """An 8 % zoom (the search covers 3 %) plus a local object: the registration stops at the search's last step and
    the object would be pasted misaligned by up to 6 px; the estimate says unsure instead. Measured on the tuning
    half: 8 of 9 photographs (hubble's sparse stars register at no zoom, confidence 0.6)."""
    unsure = 0
    for name in P.TUNING:
        src = P.photo(name, 192)
        case = P.plant(name, src, P.photo("coins", 192), seed=5, fraction=0.1, geometry="shift", kind="object")
        result = PV.preserve(src, P.move(case.edited, 0, 0, 1.08))
        unsure += result.estimate.unsure
        if result.estimate.unsure:
            assert bool((result.mask == 1).all()) and "returned whole" in result.note
    assert unsure >= 7


def _smoothed(src: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An edit that keeps an area's colour and removes its texture (12 % of the picture), through the VAE stand-in."""
    region = P.blob(*src.shape[:2], 0.12, np.random.default_rng(k))
    alpha = P._blur(region.float(), 0.7)[..., None]
    edited = src * (1 - alpha) + P._blur(src, 4.0) * alpha
    return P.quantize(P.vae_round_trip(edited, 34.0, 0.2)), region


def test_smoothing_a_texture_is_not_excused_by_the_texture_it_removed(monkeypatch):
    """The noise level scales with the texture both pictures show. Scaled by the input's texture alone (the planted
    defect), the grass (a tuning photograph) a smoothing edit removed excuses the change it made: measured mean IoU
    0.664 against 0.893 over these 6 placements, the smaller texture better in each."""
    src = P.photo("grass", SIDE)
    cases = [_smoothed(src, k) for k in range(6)]
    ours = [P.iou(PV.preserve(src, e).mask > 0, r) for e, r in cases]
    monkeypatch.setattr(PV, "texture", lambda image, sigma, _t=PV.texture, _src=src: _t(_src, sigma))
    input_only = [P.iou(PV.preserve(src, e).mask > 0, r) for e, r in cases]
    assert np.mean(ours) >= 0.8
    assert sum(o > i for o, i in zip(ours, input_only)) >= 5
    assert np.mean(ours) - np.mean(input_only) >= 0.06


def test_a_large_edit_is_left_out_when_registering_again(monkeypatch):
    """Five tuning-half cases with 34-39 % pastes and recolours where the edit held the misfit's best pixels and
    pulled the registration off (measured without the second search: 0.4-2.7 px of shift error plus 1.1-2.5 px of
    zoom error at the corner). Re-registered without the first region: within 0.15 px and 0.2 px, measured."""
    def case(seed: int, index: int) -> P.PlantedCase:  # P.cases(P.TUNING, 192, 3, seed)[index], drawn alone
        i, k = divmod(index, 3)
        names = P.TUNING
        return P.plant(names[i], P.photo(names[i], 192), P.photo(names[(i + 1) % len(names)], 192),
                       seed=seed * 1000 + i * 37 + k)

    cases = [case(4, 16), case(6, 21), case(6, 22), case(8, 5), case(8, 18)]
    assert all(c.params["fraction"] > 0.34 for c in cases)

    def errors() -> list[float]:
        out = []
        for c in cases:
            reg, q = PV.estimate_region(c.source, c.edited)[0].registration, c.params
            out.append(max(abs(reg.dx - q["dx"]), abs(reg.dy - q["dy"])) + abs(reg.scale - q["zoom"]) * 96)
        return out

    assert max(errors()) < 0.5
    monkeypatch.setattr(PV, "REFINE_FROM", 2.0)  # the planted defect: no second search
    assert min(errors()) > 1.0
