"""Global registration of an edit to its input: shift by phase correlation, and a small zoom by a scale search.

Shifts are searched within :func:`shift_window` (3 % of each side + 2 px): an editor's drift is small, and a
periodic texture (bricks, tiles, cells) correlates as well one period away. The zoom is the one whose shift leaves
the least robust :func:`misfit`, or the highest correlation peak's when the misfit has no minimum inside the search.

Convention: ``edited(c + s * (x - c) + d) ≈ source(x)``, with ``c`` the picture's centre, ``s`` the scale (> 1: the
edit shows the scene magnified) and ``d = (dx, dy)`` in pixels. :func:`warp` resamples the edit onto the source's
pixel grid by that map, so a 1-3 px shift or a 1-2 % zoom of the whole picture does not count as a change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

SCALE_RANGE = 0.03  # zooms searched: 1/1.03 .. 1.03
SCALE_STEP = 0.004
SEARCH_SIDE = 256  # the scale search runs on a copy at most this large
COST_SIDE = 384  # candidates are compared on a copy at most this large
GRID_BELOW_PEAK = 0.1  # a phase-correlation peak below this is not trusted: a shift search is tried too; it ...
GRID_RADIUS = 3  # ... covers ±3 px ...
GRID_MARGIN = 0.95  # ... and wins only with a misfit below this share of phase correlation's best
ALIAS_RATIO = 0.7  # a correlation peak this high relative to the highest, nearer to no shift, wins (periodic texture)
SHIFT_RANGE = 0.03  # shifts searched: up to this share of each side (+ SHIFT_SLACK px); a larger move is no drift
SHIFT_SLACK = 2
POLISH_EVALS = 90  # misfits the compass search may spend
COST_ROUNDS = 3  # the misfit's gain and offset: refitted this often over the 60 % of pixels that fit best
IDENTITY_EPS = 0.02  # shifts below this (pixels) and scale errors below this over the half-diagonal count as none


@dataclass(frozen=True)
class Registration:
    """The map from source pixels to edit pixels, and the phase-correlation peak (0..1) that found it."""

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    peak: float = 1.0

    def is_identity(self, height: int, width: int) -> bool:
        half_diag = 0.5 * math.hypot(height, width)
        return (abs(self.dx) < IDENTITY_EPS and abs(self.dy) < IDENTITY_EPS
                and abs(self.scale - 1.0) * half_diag < IDENTITY_EPS)


def gray(image: torch.Tensor) -> torch.Tensor:
    """[H, W, 3] in 0..1 -> [H, W] luminance (Rec. 601 weights)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype, device=image.device)
    return image[..., :3] @ w


def _hann(n: int, dtype) -> torch.Tensor:
    return torch.hann_window(n, periodic=False, dtype=dtype) if n > 2 else torch.ones(n, dtype=dtype)


def _refine(c_minus: float, c0: float, c_plus: float) -> float:
    den = c_minus - 2 * c0 + c_plus
    return 0.0 if abs(den) < 1e-12 else max(-0.5, min(0.5, 0.5 * (c_minus - c_plus) / den))


def _nearest_peak(corr: torch.Tensor, ratio: float, window: tuple[float, float] | None = None) -> int:
    """Flat index of the local maximum of ``corr`` nearest to no shift among those at least ``ratio`` times the
    highest, looking only at shifts within ``window`` (``(x, y)`` px, when given): a periodic texture (bricks,
    tiles) correlates almost as well one period away, and an editor's shift is small. (Whitening spreads a tiled
    texture's correlation over every lattice point, so beyond the window the lattice's copies of the true peak and
    the noise of a large paste can stand higher than the true peak itself.)"""
    h, w = corr.shape
    padded = F.pad(corr[None, None], (1, 1, 1, 1), mode="circular")
    local = corr >= F.max_pool2d(padded, 3, stride=1)[0, 0]
    ys, xs = torch.arange(h)[:, None], torch.arange(w)[None]
    ys, xs = torch.minimum(ys, h - ys), torch.minimum(xs, w - xs)
    inside = torch.ones_like(local) if window is None else (xs <= window[0]) & (ys <= window[1])
    dist = ys ** 2 + xs ** 2
    cand = local & inside & (corr >= ratio * corr[inside].max())
    if not bool(cand.any()):
        cand = inside & (corr >= corr[inside].max())
    return int(torch.where(cand, dist.double(), math.inf).argmin())


def shift_window(height: int, width: int) -> tuple[float, float]:
    """The largest shift (x, y; px) :func:`register` searches: :data:`SHIFT_RANGE` of each side plus
    :data:`SHIFT_SLACK` px. A picture moved further is a recomposition, not drift; the change then covers the
    picture and the estimate returns the edit whole."""
    return SHIFT_RANGE * width + SHIFT_SLACK, SHIFT_RANGE * height + SHIFT_SLACK


def phase_correlate(a: torch.Tensor, b: torch.Tensor, alias_ratio: float = 1.0,
                    window: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """(dx, dy, peak) with ``b(x) ≈ a(x - d)`` for two [H, W] pictures: Hann window, whitened cross-power
    spectrum, parabolic sub-pixel peak. ``peak`` (0..1) is the correlation peak's height: near 1 for a pure shift,
    near 0 for unrelated pictures. ``alias_ratio`` < 1 or a ``window``: the peak nearest to no shift among those
    within the window and at least that share of the highest there (:func:`_nearest_peak`), not the highest."""
    h, w = a.shape
    hann = _hann(h, torch.float64)[:, None] * _hann(w, torch.float64)[None]
    a, b = a.double(), b.double()
    fa, fb = torch.fft.fft2((a - a.mean()) * hann), torch.fft.fft2((b - b.mean()) * hann)
    cross = fb * fa.conj()
    cross = cross / cross.abs().clamp_min(1e-12)
    corr = torch.fft.ifft2(cross).real
    idx = (int(torch.argmax(corr)) if alias_ratio >= 1 and window is None
           else _nearest_peak(corr, min(alias_ratio, 1.0), window))
    py, px = divmod(idx, w)
    c = corr
    dy = py + _refine(float(c[(py - 1) % h, px]), float(c[py, px]), float(c[(py + 1) % h, px]))
    dx = px + _refine(float(c[py, (px - 1) % w]), float(c[py, px]), float(c[py, (px + 1) % w]))
    dy = dy - h if dy > h / 2 else dy
    dx = dx - w if dx > w / 2 else dx
    return float(dx), float(dy), float(c[py, px])


def _grid(height: int, width: int, reg: Registration, src_h: int, src_w: int, dtype) -> torch.Tensor:
    """grid_sample coordinates (align_corners=False) of the edit pixel each source pixel maps to."""
    ys = torch.arange(src_h, dtype=torch.float64)
    xs = torch.arange(src_w, dtype=torch.float64)
    cy, cx = (src_h - 1) / 2, (src_w - 1) / 2
    u = cx + reg.scale * (xs - cx) + reg.dx
    v = cy + reg.scale * (ys - cy) + reg.dy
    gx = (2 * u + 1) / width - 1
    gy = (2 * v + 1) / height - 1
    return torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None].to(dtype)


def warp(edited: torch.Tensor, reg: Registration, height: int, width: int, mode: str = "bicubic"
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``edited`` [h, w, C] onto the source's ``height`` x ``width`` grid by ``reg``.

    Returns the warped picture [height, width, C] (clamped to 0..1) and a bool map of the pixels that fell inside
    the edit (those outside have no data: border values are repeated there). The identity map returns the edit
    itself, untouched.
    """
    h, w = edited.shape[:2]
    if (h, w) == (height, width) and reg.is_identity(height, width):
        return edited, torch.ones(height, width, dtype=torch.bool)
    grid = _grid(h, w, reg, height, width, torch.float32)
    chw = edited.permute(2, 0, 1)[None].float()
    out = F.grid_sample(chw, grid, mode=mode, padding_mode="border", align_corners=False)
    inside = (grid[0].abs() <= 1 + 1e-6).all(-1)
    return out[0].permute(1, 2, 0).clamp(0, 1).to(edited.dtype), inside


def _small(image: torch.Tensor, side: int) -> torch.Tensor:
    h, w = image.shape
    f = side / max(h, w)
    if f >= 1:
        return image
    size = (max(8, round(h * f)), max(8, round(w * f)))
    return F.interpolate(image[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]


def _zoom_peak(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[float, float, float]:
    """Phase correlation of ``a`` against ``b`` un-zoomed by ``scale``, within :func:`shift_window`; shift
    returned in ``b``'s frame."""
    h, w = a.shape
    unzoomed, _ = warp(b[..., None], Registration(0.0, 0.0, scale), h, w, mode="bilinear")
    dx, dy, peak = phase_correlate(a, unzoomed[..., 0], ALIAS_RATIO, shift_window(h, w))
    return dx * scale, dy * scale, peak


def edges(image: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of the luminance ([H, W]): blind to colour drift and to a recolouring's inversion."""
    g = F.pad(gray(image.float())[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
    return torch.hypot(g[1:-1, 2:] - g[1:-1, :-2], g[2:, 1:-1] - g[:-2, 1:-1])


def _blur2(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.conv2d(F.pad(x[None, None], (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))[0, 0]


def cost(a: torch.Tensor, b: torch.Tensor, reg: Registration, textured: torch.Tensor) -> float:
    """Robust misfit of ``b`` warped by ``reg`` against ``a`` (luminances, same size) over the ``textured``
    pixels (flat areas say nothing about alignment): the 60 % quantile of the absolute residuals after a gain and
    offset fitted over the 60 % that fit best, starting from gain 1 (a changed region under 40 % of those pixels
    does not count; a least-squares gain over all of them let a large inverted recolour pull it, and then the
    misfit preferred a periodic texture's alias one period away)."""
    h, w = a.shape
    wb, _ = warp(b[..., None], reg, h, w, mode="bilinear")
    x, y = a[textured].double(), wb[..., 0][textured].double()
    if not len(x):
        return 0.0
    k = max(1, int(0.6 * len(x)))
    r = (y - x - (y - x).median()).abs()  # gain 1 first: a colour drift moves it little, a large edit a lot
    fit = r <= r.kthvalue(k)[0]
    for _ in range(COST_ROUNDS):
        xm, ym = x[fit].mean(), y[fit].mean()
        gain = ((x - xm) * (y - ym))[fit].sum() / ((x - xm) ** 2)[fit].sum().clamp_min(1e-12)
        r = (y - ym - gain * (x - xm)).abs()
        fit = r <= r.kthvalue(k)[0]
    return float(r.kthvalue(k)[0])


def misfit_of(a: torch.Tensor, b: torch.Tensor, exclude: torch.Tensor | None = None
              ) -> Callable[[Registration], float]:
    """:func:`misfit` of ``a`` and ``b`` as a function of the registration: the blurred copies and the textured
    mask are prepared once (a search evaluates a hundred or more registrations of the same pair). ``exclude``
    (bool, ``a``'s size): pixels left out (a changed region already found)."""
    f = min(1.0, COST_SIDE / max(a.shape))
    sa, sb = _blur2(_small(a, COST_SIDE), 0.7), _blur2(_small(b, COST_SIDE), 0.7)
    h, w = sa.shape
    m = max(2, int(0.03 * max(h, w)))
    mag = edges(sa[..., None].expand(-1, -1, 3))
    textured = torch.zeros_like(sa, dtype=torch.bool)
    textured[m:h - m, m:w - m] = True
    textured &= mag >= mag[textured].quantile(0.5)
    if exclude is not None:
        small = F.interpolate(exclude.float()[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        textured &= small < 0.01
    return lambda reg: cost(sa, sb, Registration(reg.dx * f, reg.dy * f, reg.scale), textured)


def misfit(a: torch.Tensor, b: torch.Tensor, reg: Registration) -> float:
    """:func:`cost` of ``reg`` on slightly blurred copies at most 384 px large, over their more textured half."""
    return misfit_of(a, b)(reg)


def register(source: torch.Tensor, edited: torch.Tensor, scale_range: float = SCALE_RANGE) -> Registration:
    """The global shift and zoom that map ``source`` [H, W, 3] onto ``edited`` (same size; resize it first).

    Phase correlation, once of the gradient-magnitude maps (blind to colour drift and inverted recolourings) and
    once of the luminances: the zoom is searched on a copy at most 256 px large (steps of 0.4 %), the shift
    measured at full size with that zoom undone; the candidate with the smaller robust :func:`misfit` wins. (A
    pattern search and a Gauss-Newton refinement from there were tried on the tuning half: no better.)
    """
    ga, gb = gray(source.float()), gray(edited.float())
    found = [_coarse(edges(source), edges(edited), scale_range), _coarse(ga, gb, scale_range)]
    fit = misfit_of(ga, gb)
    cost_best, best = min(((fit(reg), reg) for reg in found), key=lambda cr: cr[0])
    if best.peak >= GRID_BELOW_PEAK:
        return best
    return _search_from(fit, best, cost_best)


def _search_from(fit: Callable[[Registration], float], reg: Registration, cost_reg: float) -> Registration:
    """The ±3 px shift search at no zoom and at ``reg``'s, kept when its misfit is below :data:`GRID_MARGIN` of
    ``cost_reg`` (``reg``'s), then the compass search from the better one."""
    found, cost_found = min((_shift_search(fit, s) for s in {1.0, reg.scale}), key=lambda rc: rc[1])
    if cost_found < GRID_MARGIN * cost_reg:
        reg = replace(found, peak=reg.peak)  # how related the two pictures are, as phase correlation saw it
    return _polish(fit, reg)


def refine(source: torch.Tensor, edited: torch.Tensor, reg: Registration, exclude: torch.Tensor) -> Registration:
    """``reg`` re-searched with the pixels ``exclude`` left out of the misfit (a large changed region found with
    ``reg``: a 35-40 % paste or recolour can hold the misfit's best 60 % and pull the registration 2-5 px off):
    the ±3 px shift search at no zoom and at ``reg``'s zoom, kept when it lowers the misfit below
    :data:`GRID_MARGIN` of ``reg``'s, then the compass search (:func:`_search_from`, as :func:`register` ends)."""
    fit = misfit_of(gray(source.float()), gray(edited.float()), exclude)
    return _search_from(fit, reg, fit(reg))


def _polish(fit: Callable[[Registration], float], reg: Registration) -> Registration:
    """Compass search on :func:`misfit` over (dx, dy, zoom) from ``reg``, steps halved from 0.5 px and half a zoom
    step down to an eighth of that: where the correlation peak is weak (a periodic texture, a large paste), the
    candidates above are whole-pixel or a zoom step apart, and a fine texture shows a 0.4 % zoom error as change.
    Kept only when it lowers the misfit below :data:`GRID_MARGIN` of the start."""
    steps = [0.5, 0.5, SCALE_STEP / 2]
    x = [reg.dx, reg.dy, math.log(reg.scale)]
    best = start = fit(reg)
    for _ in range(POLISH_EVALS // 6):
        moves = [(i, sign) for i in range(3) for sign in (-1, 1)]
        tried = []
        for i, sign in moves:
            y = list(x)
            y[i] += sign * steps[i]
            tried.append((fit(Registration(y[0], y[1], math.exp(y[2]))), y))
        cost_, y = min(tried, key=lambda t: t[0])
        if cost_ < best:
            best, x = cost_, y
        else:
            steps = [v / 2 for v in steps]
            if steps[0] < 0.5 / 8:
                break
    if best >= GRID_MARGIN * start:  # a large paste biases the misfit by a few per cent: no clear gain, no move
        return reg
    return replace(reg, dx=x[0], dy=x[1], scale=math.exp(x[2]))


def _shift_search(fit: Callable[[Registration], float], scale: float = 1.0) -> tuple[Registration, float]:
    """The whole-pixel shift within ±GRID_RADIUS (at zoom ``scale``) of least :func:`misfit`, refined by a parabola
    through its neighbours, and that misfit: the fallback when a large pasted edit misleads phase correlation (its
    peak then lands on the paste's own structure). It runs at no zoom and at the zoom phase correlation found."""
    r = GRID_RADIUS
    costs = torch.tensor([[fit(Registration(float(dx), float(dy), scale)) for dx in range(-r, r + 1)]
                          for dy in range(-r, r + 1)])
    iy, ix = divmod(int(costs.argmin()), 2 * r + 1)
    c = costs.tolist()
    dx = ix - r + (_refine(c[iy][ix - 1], c[iy][ix], c[iy][ix + 1]) if 0 < ix < 2 * r else 0.0)
    dy = iy - r + (_refine(c[iy - 1][ix], c[iy][ix], c[iy + 1][ix]) if 0 < iy < 2 * r else 0.0)
    reg = Registration(float(dx), float(dy), scale, 0.0)
    return reg, fit(reg)


def at_zoom_edge(reg: Registration, scale_range: float = SCALE_RANGE) -> bool:
    """Whether the zoom found is the search's last step: the edit may be zoomed beyond the search."""
    return abs(math.log(reg.scale)) >= round(scale_range / SCALE_STEP) * SCALE_STEP - 1e-9


def _coarse(a: torch.Tensor, b: torch.Tensor, scale_range: float) -> Registration:
    """The zoom (steps of :data:`SCALE_STEP`, parabola-refined) whose windowed phase-correlation shift, on a copy
    at most :data:`SEARCH_SIDE` large, leaves the least :func:`misfit`; when that least misfit lies at the search's
    edge (no minimum inside: a large change dominates the misfit), the zoom of the highest peak instead. (The
    peak's height alone chose the zoom before: whitening spreads a periodic texture's peak over its lattice, and a
    large paste's noise then decides the heights.) Then the shift at full size with that zoom undone."""
    sa, sb = _small(a, SEARCH_SIDE), _small(b, SEARCH_SIDE)
    f = max(a.shape) / max(sa.shape)
    steps = int(round(scale_range / SCALE_STEP))
    scales = [math.exp(k * SCALE_STEP) for k in range(-steps, steps + 1)]
    found = [_zoom_peak(sa, sb, s) for s in scales]
    fit = misfit_of(a, b)
    score = [-fit(Registration(dx * f, dy * f, s)) for s, (dx, dy, _) in zip(scales, found)]
    if max(range(len(scales)), key=score.__getitem__) in (0, len(scales) - 1):
        score = [p for _, _, p in found]
    best = max(range(len(scales)), key=score.__getitem__)
    scale = scales[best]
    if 0 < best < len(scales) - 1:
        scale = math.exp((best - steps + _refine(score[best - 1], score[best], score[best + 1])) * SCALE_STEP)
    if abs(scale - 1.0) < 0.1 * SCALE_STEP:
        scale = 1.0
    dx, dy, peak = _zoom_peak(a, b, scale)
    return Registration(dx, dy, scale, peak)
