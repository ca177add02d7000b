"""The global colour drift an editor adds, as a per-channel tone curve ``source ≈ a x + b x^2 + c`` of the edit's
value ``x``, fitted robustly on pixels believed unchanged and undone before comparing. The drift is fitted forwards
(the edit's value as a curve of the clean input's) and that curve inverted, so the edit's noise does not flatten
the map (:func:`fit_colour_map`).

A drift is a monotone tone curve: the inverse of a ±8 % gain, a ±0.04 offset and a 0.9-1.1 gamma has slopes of
0.6-1.5 over 0.05..0.95. A quadratic fitted over a narrow tonal range (a grey moon) can instead fold: on a tuning
case with a 34 % recolour it fitted slope 0.7 at the moon's grey and -0.2 at the edit's colours, mapping the edit
back onto the input's greys, so the edit read as drift and was lost. Each fit is therefore bounded: over the values
the map is applied to (the edit's 0.5th to 99.5th percentile, all pixels), its slope stays within
:data:`SLOPE_RANGE`, a margin around the drift's own slopes.
"""

from __future__ import annotations

import itertools

import torch

FIT_SAMPLES = 60_000  # pixels used for the fit
SLOPE_RANGE = (0.5, 2.0)  # the tone curve's slope over the values it is applied to
IDENTITY_MAP = torch.tensor([[1.0, 0.0, 0.0]] * 3, dtype=torch.float64)


def _features(image: torch.Tensor) -> torch.Tensor:
    """[..., 3] -> [N, 3, 3]: per pixel and channel (x, x^2, 1)."""
    x = image.reshape(-1, 3).double()
    return torch.stack([x, x * x, torch.ones_like(x)], -1)


def apply_colour_map(image: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The fitted colour map ([3 channels, 3 coefficients]) applied to [H, W, 3] in 0..1."""
    return (_features(image) * coef).sum(-1).reshape(image.shape).clamp(0, 1).to(image.dtype)


def bounded_least_squares(gram: torch.Tensor, rhs: torch.Tensor, lo: float, hi: float,
                          slopes: tuple[float, float]) -> torch.Tensor:
    """``argmin θ^T G θ - 2 r^T θ`` for ``θ = (a, b, c, ...)`` subject to ``slopes[0] <= a + 2 b x <= slopes[1]`` at
    ``x = lo`` and ``x = hi`` (the slope is linear in ``x``, so the two ends bound it everywhere between); unknowns
    past the third (a detail term) are free.

    Four linear constraints: every active set of at most two is tried and the best feasible solution kept (the slope
    at both ends pinned to the same bound is a straight line)."""
    k = gram.shape[0]
    rows = torch.zeros(2, k, dtype=torch.float64)
    rows[:, 0], rows[0, 1], rows[1, 1] = 1.0, 2 * lo, 2 * hi
    cons = [(rows[0], slopes[0], 1), (rows[1], slopes[0], 1), (rows[0], slopes[1], -1), (rows[1], slopes[1], -1)]

    def feasible(theta: torch.Tensor) -> bool:
        return all(sign * (float(g @ theta) - v) >= -1e-9 for g, v, sign in cons)

    best, best_cost = None, float("inf")
    for n in range(3):
        for active in itertools.combinations(cons, n):
            if n == 2 and torch.equal(active[0][0], active[1][0]):
                continue  # one slope cannot sit at both bounds
            e = torch.stack([g for g, _, _ in active]) if n else torch.zeros(0, k, dtype=torch.float64)
            f = torch.tensor([v for _, v, _ in active], dtype=torch.float64)
            kkt = torch.zeros(k + n, k + n, dtype=torch.float64)
            kkt[:k, :k], kkt[:k, k:], kkt[k:, :k] = gram, e.T, e
            try:
                theta = torch.linalg.solve(kkt, torch.cat([rhs, f]))[:k]
            except RuntimeError:  # singular: this active set does not pin a solution
                continue
            cost = float(theta @ gram @ theta - 2 * rhs @ theta)
            if feasible(theta) and cost < best_cost:
                best, best_cost = theta, cost
        if best is not None and n == 0:
            break  # the free fit is within the bounds
    return best if best is not None else torch.eye(k, dtype=torch.float64)[0]


def _trimmed_fit(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, span: torch.Tensor, rounds: int,
                 slopes: tuple[float, float]) -> torch.Tensor:
    """Per channel ``y ≈ a x + b x^2 + c (+ d detail)`` (``x`` features [N, 3, 3 or 4], ``y`` [N, 3], ``valid``
    [N, 3]): first over the 60 % of pixels closest to the identity, then ``rounds`` times over those within 2.5
    times the median residual of the last fit; each fit's slope bounded to ``slopes`` over ``span`` [2, 3]."""
    resid = (x[..., 0] - y).norm(dim=1)
    keep = resid <= resid.quantile(0.6)
    k = x.shape[-1]
    coef = torch.eye(k, dtype=torch.float64)[0].repeat(3, 1)
    ridge = 1e-6 * torch.eye(k, dtype=torch.float64)
    for _ in range(rounds):
        for c in range(3):
            rows = keep & valid[:, c]
            if int(rows.sum()) < 16:
                rows = keep
            xc = x[rows, c]
            coef[c] = bounded_least_squares(xc.T @ xc + ridge, xc.T @ y[rows, c], float(span[0, c]),
                                            float(span[1, c]), slopes)
        resid = ((x * coef).sum(-1) - y).norm(dim=1)
        keep = resid <= 2.5 * resid[keep].median().clamp_min(1e-6)
    return coef


def _span(values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The 0.5th and 99.5th percentile of each channel of ``values`` [N, 3] (on a sample), [2, 3]."""
    if len(values) > FIT_SAMPLES:
        values = values[torch.randperm(len(values), generator=gen)[:FIT_SAMPLES]]
    return torch.quantile(values.double(), torch.tensor([0.005, 0.995], dtype=torch.float64), dim=0)


def fit_colour_map(edited: torch.Tensor, source: torch.Tensor, where: torch.Tensor, seed: int = 0,
                   rounds: int = 3, slopes: tuple[float, float] | None = None,
                   detail: torch.Tensor | None = None) -> torch.Tensor:
    """The map ``source ≈ a x + b x^2 + c`` of the edit's value ``x`` (per channel), from the pixels ``where``.

    The drift is fitted forwards, the edit's value as a tone curve of the input's (``_trimmed_fit``): the input is
    the clean side, so its values are the regressor. Regressing the input on the edit instead lets the edit's
    noise flatten the slope by var(input) / (var(input) + var(noise)): on a hazy, low-contrast picture the map
    hit the slope bound 0.5 and halved every change it was applied to, an edit's included. ``detail`` (the input's
    fine detail, [H, W, 3], e.g. the input minus its 1-px blur) is a further, free regressor of the forward fit: a
    VAE keeps only part of it, and without the term that loss flattens the forward slope on a textured picture as
    noise flattens the backward one. Pixels whose edit is clipped at black or white are left out of the forward fit
    (their value says only that the curve passed the limit). The forward curve (the detail term dropped) is then
    inverted by a least-squares fit of the input's value on the curve's (no noise on either side), its slope bounded
    to ``slopes`` (default :data:`SLOPE_RANGE`) over the edit's values."""
    slopes = SLOPE_RANGE if slopes is None else slopes
    idx = where.reshape(-1).nonzero()[:, 0]
    if len(idx) < 64:
        return IDENTITY_MAP.clone()
    gen = torch.Generator().manual_seed(seed)
    if len(idx) > FIT_SAMPLES:
        idx = idx[torch.randperm(len(idx), generator=gen)[:FIT_SAMPLES]]
    flat_src, flat_ed = source.reshape(-1, 3), edited.reshape(-1, 3)
    span_src, span_ed = _span(flat_src, gen), _span(flat_ed, gen)
    s, y = flat_src[idx].double(), flat_ed[idx].double()
    unclipped = (y > 0.5 / 255) & (y < 1 - 0.5 / 255)
    x = _features(s)
    if detail is not None:  # the input's fine detail as a free regressor: a VAE loses a share of it
        x = torch.cat([x, detail.reshape(-1, 3)[idx].double()[..., None]], -1)
    forward = _trimmed_fit(x, y, unclipped, span_src, rounds, (1 / slopes[1], 1 / slopes[0]))
    curve = (x[..., :3] * forward[:, :3]).sum(-1)  # [N, 3]: the drifted value of each fitted pixel, noise-free
    inverse = IDENTITY_MAP.clone()
    ridge = 1e-6 * torch.eye(3, dtype=torch.float64)
    back = _features(curve)
    for c in range(3):
        xc = back[:, c]
        inverse[c] = bounded_least_squares(xc.T @ xc + ridge, xc.T @ s[:, c], float(span_ed[0, c]),
                                           float(span_ed[1, c]), slopes)
    return inverse
