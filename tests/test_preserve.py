"""Automatic preservation (``preserve``): on held-out real photographs with planted edits (local change, colour
drift, shift / zoom, tiny-VAE noise) the estimated region matches the planted one and every pixel outside it is the
input's own; a global change is returned whole with a note; the node does the same on IMAGE batches.

The thresholds were tuned on ``planted_edits.TUNING``; these cases use only ``HELD_OUT`` photographs (smaller than
the benchmark's, ``benchmarks/preserve.py`` prints the full held-out table)."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def held_out_cases():
    return P.cases(P.HELD_OUT[1:9:2], SIDE, 1, seed=7)


def test_held_out_regions_match_and_outside_is_bit_exact(held_out_cases):
    ious = []
    for case in held_out_cases:
        result = PV.preserve(case.source, case.edited)
        region = result.estimate.region
        assert not result.estimate.unsure, (case.name, case.params, result.note)
        out, src = P.to_8bit(result.image), P.to_8bit(case.source)
        np.testing.assert_array_equal(out[~region.numpy()], src[~region.numpy()])
        assert torch.equal(result.mask > 0, region)
        ious.append(P.iou(region, case.region))
    # held-out benchmark (192 px, 18 cases): see docs/benchmarks.md; the floor is the measured minimum minus margin
    assert np.mean(ious) >= 0.85 and min(ious) >= 0.7, ious


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
