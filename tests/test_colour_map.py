"""The colour-drift map (``colour_map``): the bounded least squares is the constrained optimum (checked against
scipy's ``lsq_linear`` on the slope parametrisation), a free fit inside the bounds is untouched, every drift the
planted cases draw is removed, and a fold that absorbs a large edit (a tuning-half case that the unbounded fit loses
half of) is refused."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from firered_core import colour_map as CM
from firered_core import mask_ops as O
from firered_core import preserve as PV
from firered_core.evaluation import planted_edits as P


def _reference(x: np.ndarray, y: np.ndarray, lo: float, hi: float, slopes: tuple[float, float]) -> np.ndarray:
    """The same problem in (slope at lo, slope at hi, value at lo): box bounds on the first two, solved by scipy."""
    from scipy.optimize import lsq_linear

    # a = (hi * s_lo - lo * s_hi) / (hi - lo), b = (s_hi - s_lo) / (2 (hi - lo)), c = v - a lo - b lo^2
    t = np.array([[hi / (hi - lo), -lo / (hi - lo), 0.0], [-0.5 / (hi - lo), 0.5 / (hi - lo), 0.0], [0, 0, 1.0]])
    t[2, :2] = -lo * t[0, :2] - lo * lo * t[1, :2]
    feats = np.stack([x, x * x, np.ones_like(x)], 1)
    res = lsq_linear(feats @ t, y, bounds=([slopes[0], slopes[0], -np.inf], [slopes[1], slopes[1], np.inf]),
                     tol=1e-12, lsmr_tol="auto", method="bvls")
    return t @ res.x


@pytest.mark.parametrize("case", ["fold", "steep", "inside"])
def test_bounded_fit_is_the_constrained_optimum(case):
    gen = np.random.default_rng(3)
    x = gen.uniform(0.3, 0.7, 4000)
    y = {"fold": 0.45 + 0.6 * (x - 0.45) - 3.0 * (x - 0.45) ** 2, "steep": 0.1 + 2.6 * x ** 2,
         "inside": 0.02 + 0.95 * x ** 1.08}[case] + gen.normal(0, 0.01, x.size)
    feats = torch.from_numpy(np.stack([x, x * x, np.ones_like(x)], 1))
    gram, rhs = feats.T @ feats, feats.T @ torch.from_numpy(y)
    got = CM.bounded_least_squares(gram, rhs, 0.3, 0.7, CM.SLOPE_RANGE).numpy()
    ref = _reference(x, y, 0.3, 0.7, CM.SLOPE_RANGE)
    # Both solve one convex problem in float64 (condition ~1e4 here): agreement to 1e-6 is arithmetic, not luck.
    np.testing.assert_allclose(got, ref, atol=1e-6)
    slopes = [got[0] + 2 * got[1] * v for v in (0.3, 0.7)]
    assert all(CM.SLOPE_RANGE[0] - 1e-9 <= s <= CM.SLOPE_RANGE[1] + 1e-9 for s in slopes)
    if case == "inside":  # the free fit is kept as it is
        np.testing.assert_allclose(got, torch.linalg.solve(gram, rhs).numpy(), rtol=0, atol=1e-9)
    else:  # the free fit broke a bound, so the bounded one sits on it
        assert min(abs(s - b) for s, b in itertools.product(slopes, CM.SLOPE_RANGE)) < 1e-9


@pytest.mark.parametrize("gain,offset,gamma", itertools.product((0.92, 1.08), (-0.04, 0.04), (0.9, 1.1)))
def test_every_planted_drift_is_removed(gain, offset, gamma, monkeypatch):
    """The planted drift's extremes (``planted_edits.colour_drift`` draws within them) on a tuning photograph: the
    bounded map leaves a residual within the 8-bit step outside the darkest tones, and no region is found, also
    where a negative offset crushed the shadows to 0 (their detail is gone, and that is drift, not edit). Without
    :func:`preserve.clipped_change` (the planted defect) those crushed shadows read as a change."""
    src = P.photo("camera", 128)
    edited = P.quantize((gain * src ** gamma + offset).clamp(0, 1))
    coef = CM.fit_colour_map(edited, src, torch.ones(src.shape[:2], dtype=torch.bool))
    back = CM.apply_colour_map(edited, coef)
    lit = (edited > 0.1).all(-1) & (edited < 0.95).all(-1)
    assert float((back - src).abs()[lit].median()) < 1 / 255
    assert PV.preserve(src, edited).estimate.fraction == 0.0
    crushed = (edited <= 0).any(-1)
    if offset < 0 and gamma > 1:  # the two draws that crush more than 4 % of the picture
        assert float(crushed.float().mean()) > 0.04
        monkeypatch.setattr(PV, "clipped_change", lambda change, _edited: change)
        region = PV.preserve(src, edited).estimate.region
        assert float(region.float().mean()) > 0.02  # measured 0.031 and 0.038
        assert float((region & ~O.dilate(crushed, 2)).float().mean()) < 0.002  # ... all of it in the shadows


def _moon_recolour() -> P.PlantedCase:
    """A tuning-half case (seed 9: moon, a 34 % recolour over the moon's narrow greys, zoom 1.1 %)."""
    found = [c for c in P.cases(P.TUNING, 192, 3, seed=9) if c.name == "moon" and c.params["kind"] == "recolour"]
    return max(found, key=lambda c: c.params["fraction"])


def test_a_fold_that_absorbs_a_large_edit_is_refused(monkeypatch):
    case = _moon_recolour()
    assert math.isclose(case.params["fraction"], 0.342, abs_tol=0.001)
    bounded = PV.preserve(case.source, case.edited)
    assert P.iou(bounded.mask > 0, case.region) >= 0.9  # measured 0.979
    monkeypatch.setattr(CM, "SLOPE_RANGE", (-math.inf, math.inf))  # the planted defect: the unbounded fit
    free = PV.preserve(case.source, case.edited)
    # measured 0.49 (0.0 when the map was the input regressed on the edit): half the edit read as drift
    assert P.iou(free.mask > 0, case.region) < 0.7


def test_clipped_change_counts_only_what_clipping_cannot_explain():
    """At white, the input may be anything at least as bright as the map's image of white: only a darker input
    counts; at black the mirror; elsewhere the change is kept as it is."""
    edited = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.5, 0.5]]).T.expand(-1, 3)
    change = torch.tensor([[0.1, -0.1, 0.1, -0.1, 0.1, -0.1]]).T.expand(-1, 3)
    got = PV.clipped_change(change, edited)[:, 0].tolist()
    assert got == pytest.approx([0.1, 0.0, 0.0, -0.1, 0.1, -0.1])
