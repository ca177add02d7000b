"""Pair-aware quality: the target judged against its own source, outside the edited region.

In an edit pair the source is the reference: a target that is darker, brighter, blurrier, noisier, more blocky or
colour-cast *than its source*, where the edit did not touch it, was damaged on the way. The edited region is
estimated from the pair's difference: both images are cut into small cells, each channel's cell means of the target
are fitted to the source's by a robust per-channel line (gain and offset: exposure and white-balance changes are
global, so they fit the line), and the cells that stay off the line (an object added, removed, recoloured) are the
edit. Every measurement below uses only the other cells. Pure numpy, float64: identical in every engine.

Scores (all 0 for a clean, unedited-elsewhere pair):

- ``exposure``: mean linear-light change outside the edit in stops; > 0 brighter.
- ``clip_high`` / ``clip_low``: share of outside pixels blown (any channel >= 250) / crushed (all <= 5) in the
  target minus that share in the source.
- ``cast``: CIELAB a*/b* shift of the outside mean, Euclidean (Lab units; ~2.3 is a just-noticeable difference).
- ``wb``: white-balance error: the largest per-channel log gain (linear light) off the mean gain.
- ``detail``: median over the source's textured cells of log(target / source high-pass energy) at half
  resolution, the target's contrast gain divided out: < 0 blurred (or smoothed by heavy compression).
- ``noise``: added noise, levels (luma): per cell, the part of the target's fine detail (Laplacian) that the
  source's fine detail does not explain (the residual of a least-squares fit of one on the other, so the pair's
  contrast change and a photograph's own texture drop out: texture is in both images, added noise only in the
  target), as a Gaussian sigma; median over the cells outside the edit. Blur lowers it, re-encoding adds ~1-2.
- ``blocky``: JPEG 8x8 grid ratio of the target minus the source's (full resolution): > 0 compressed harder.
- ``edit_share``: share of the picture estimated as edited (too large a share: the pair is judged globally).
"""

from __future__ import annotations

import numpy as np

from .imageops import edge_profile, gray, periodic_ratio, resize_to

PAIR_SCORES = ("exposure", "clip_high", "clip_low", "cast", "wb", "detail", "noise", "blocky")


def _linear(arr: np.ndarray) -> np.ndarray:
    """uint8 sRGB -> linear light 0..1 (float64)."""
    c = arr.astype(np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def srgb_to_lab(arr: np.ndarray) -> np.ndarray:
    """uint8 sRGB [H, W, 3] -> CIELAB (D65) float64 [H, W, 3]."""
    lin = _linear(arr)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def grey_world_cast(arr: np.ndarray) -> float:
    """Unpaired colour cast: the CIELAB a*/b* distance of the picture's mean from neutral grey (grey world)."""
    lab = srgb_to_lab(arr)
    return float(np.hypot(lab[..., 1].mean(), lab[..., 2].mean()))


def cell_means(x: np.ndarray, cells: int) -> np.ndarray:
    """Mean of each of cells x cells blocks of x [H, W(, C)] (the ragged border is left out)."""
    h, w = x.shape[0] // cells * cells, x.shape[1] // cells * cells
    x = x[:h, :w]
    return x.reshape(cells, h // cells, cells, w // cells, *x.shape[2:]).mean(axis=(1, 3))


def _robust_line(s: np.ndarray, t: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Residuals of t against a least-squares line in s fitted on ``keep`` (at least 2 points, else offset only)."""
    if keep.sum() >= 2 and np.ptp(s[keep]) > 16.0:  # a slope needs cells that differ (a flat wall fixes none)
        a, b = np.polyfit(s[keep], t[keep], 1)
    else:
        a, b = 1.0, float(np.median(t[keep] - s[keep])) if keep.any() else 0.0
    return t - (a * s + b)


def edit_region(src: np.ndarray, tgt: np.ndarray, cells: int = 16, floor: float = 6.0) -> np.ndarray:
    """Boolean [cells, cells]: the cells of an equal-size pair that the edit changed (see the module docstring).
    A cell is edited when some channel's mean is off the fitted line by more than ``floor`` levels and more than
    4 robust deviations of the residuals. When a fifth of the cells is unchanged (a clean edit leaves the rest
    identical, even when the edit covers most of the picture; "unchanged" allows the re-rendering drift: below 2
    levels or twice the 20th-percentile cell change) those cells are the reference; otherwise the first
    pass fits an offset or a gain (medians: an edit cannot pull them). Later passes fit a line on the cells not
    yet marked; the mark is then grown by one cell (soft edges)."""
    s, t = cell_means(src.astype(np.float64), cells), cell_means(tgt.astype(np.float64), cells)
    off = np.zeros((cells, cells), dtype=bool)
    d = np.abs(t - s).max(axis=-1)
    same = d < max(2.0, 2 * float(np.quantile(d, 0.2)))  # cells the pair shares untouched (up to re-rendering)
    start = 0
    if same.mean() >= 0.2:  # a clean edit leaves the rest identical: that rest is the reference, however small
        off, start = ~same, 1
    for it in range(start, 4):
        worst = np.zeros((cells, cells))
        for c in range(3):
            sc, tc = s[..., c].ravel(), t[..., c].ravel()
            if it == 0:  # an offset or a gain, whichever fits the median cell better: an edit cannot pull either
                r_off, r_gain = tc - sc - np.median(tc - sc), tc - sc * np.median((tc + 1) / (sc + 1))
                r = r_off if np.median(np.abs(r_off)) <= np.median(np.abs(r_gain)) else r_gain
            else:
                r = _robust_line(sc, tc, ~off.ravel())
            r = r.reshape(cells, cells)
            inl = r[~off] if (~off).any() else r.ravel()
            mad = 1.4826 * np.median(np.abs(inl - np.median(inl)))
            worst = np.maximum(worst, np.abs(r) / max(floor, 4 * mad))
        new = worst > 1
        if (new == off).all():
            break
        off = new
    grown = off.copy()
    grown[1:] |= off[:-1]
    grown[:-1] |= off[1:]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    if grown.mean() > 0.9:  # most of the picture changed: a global edit; judge it as a whole
        grown[:] = False
    return grown


def _upsample(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    cells = mask.shape[0]
    h, w = shape[0] // cells * cells, shape[1] // cells * cells
    full = np.ones(shape, dtype=bool)  # the ragged border counts as edited (left out)
    full[:h, :w] = mask.repeat(h // cells, axis=0).repeat(w // cells, axis=1)
    return full


def highpass_energy(g: np.ndarray, cells: int) -> np.ndarray:
    """Mean |4-neighbour Laplacian| per cell of a luma image: the fine detail (and the noise) in each cell."""
    lap = np.zeros_like(g)
    lap[1:-1, 1:-1] = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])
    return cell_means(lap, cells)


def _laplacian(g: np.ndarray) -> np.ndarray:
    lap = np.zeros_like(g)
    lap[1:-1, 1:-1] = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return lap


def added_noise(ls: np.ndarray, lt: np.ndarray, outside: np.ndarray, cells: int) -> float:
    """The ``noise`` score (module docstring) of luma ``ls`` / ``lt`` (float64, equal size), measured on the
    ``outside`` pixels of each of cells x cells cells that has at least a third of its pixels outside."""
    hs, ht = _laplacian(ls), _laplacian(lt)
    inner = np.zeros(ls.shape, dtype=bool)
    inner[1:-1, 1:-1] = True
    w = (outside & inner).astype(np.float64)
    n = cell_means(w, cells)
    ok = n > 1 / 3
    if not ok.any():
        return 0.0
    n = np.where(ok, n, 1.0)
    m = lambda x: cell_means(w * x, cells) / n  # noqa: E731  (mean over the cell's outside pixels)
    ms, mt = m(hs), m(ht)
    vs, vt, cov = m(hs * hs) - ms ** 2, m(ht * ht) - mt ** 2, m(hs * ht) - ms * mt
    resid = np.clip(vt - cov ** 2 / np.maximum(vs, 1e-9), 0, None)
    return float(np.sqrt(np.median(resid[ok]) / 20.0))  # a 4-neighbour Laplacian multiplies a variance by 20


def _half(g: np.ndarray) -> np.ndarray:
    """2 x 2 box average (the ragged edge dropped)."""
    h, w = g.shape[0] // 2 * 2, g.shape[1] // 2 * 2
    return g[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def blockiness(arr: np.ndarray) -> float:
    """JPEG 8x8 grid edge ratio (grid at the origin), both axes, on a crop of at most 512 px."""
    g = gray(arr[:512, :512]).astype(np.float64)
    return 0.5 * (periodic_ratio(edge_profile(g, 1), 8, 7) + periodic_ratio(edge_profile(g, 0), 8, 7))


def pair_quality(src: np.ndarray, tgt: np.ndarray, tgt_full: np.ndarray | None = None,
                 src_full: np.ndarray | None = None) -> dict[str, float]:
    """The scores of the module docstring for one (source, target) pair of uint8 RGB arrays; the target is resized
    to the source's size. ``*_full``: the images at full resolution, for the block-grid measure."""
    tgt = resize_to(tgt, (src.shape[1], src.shape[0]))
    side = min(src.shape[:2])
    cells = int(np.clip(side // 6, 4, 16))
    edited = edit_region(src, tgt, cells)
    outside = ~_upsample(edited, src.shape[:2])
    if outside.sum() < 16:
        outside[:] = True
    sf, tf = src.astype(np.float64), tgt.astype(np.float64)
    ls, lt = gray(sf).astype(np.float64), gray(tf).astype(np.float64)
    lin_s, lin_t = _linear(src[outside]).mean(axis=0), _linear(tgt[outside]).mean(axis=0)  # per channel
    exposure = float(np.log2((lin_t.mean() + 0.005) / (lin_s.mean() + 0.005)))
    balance = np.log((lin_t + 0.005) / (lin_s + 0.005))
    gain_cast = float(np.abs(balance - balance.mean()).max())
    blown = lambda a: (a[outside].max(axis=-1) >= 250).mean()  # noqa: E731
    crushed = lambda a: (a[outside].max(axis=-1) <= 5).mean()  # noqa: E731
    lab_s, lab_t = srgb_to_lab(src)[outside], srgb_to_lab(tgt)[outside]
    cast = float(np.hypot(*(lab_t[:, 1:].mean(axis=0) - lab_s[:, 1:].mean(axis=0))))
    stat_cells = int(np.clip(side // 12, 2, 8))
    keep = (cell_means((~outside).astype(np.float64), stat_cells) < 0.25).ravel()  # cells mostly outside
    # the target's contrast gain (exposure scales every difference): the spread of luma outside the edit
    gain = (lt[outside].std() + 1.0) / (ls[outside].std() + 1.0)
    es = highpass_energy(ls, stat_cells).ravel()[keep]
    # detail at half resolution: blur removes it there too, high-quality JPEG of fine texture hardly does
    hs, ht = highpass_energy(_half(ls), stat_cells).ravel()[keep], highpass_energy(_half(lt), stat_cells).ravel()[keep]
    coarse = np.log((ht + 0.5) / (gain * hs + 0.5))
    order = np.argsort(es, kind="stable")
    detail = float(np.median(coarse[order[-max(1, len(order) // 2):]])) if len(order) else 0.0
    noise = added_noise(ls, lt, outside, stat_cells)
    blocky = blockiness(tgt_full if tgt_full is not None else tgt) - \
        blockiness(src_full if src_full is not None else src)
    return {"exposure": exposure, "clip_high": float(blown(tf) - blown(sf)),
            "clip_low": float(crushed(tf) - crushed(sf)), "cast": cast, "wb": gain_cast, "detail": detail,
            "noise": noise,
            "blocky": float(blocky), "edit_share": float(edited.mean())}


def noise_level(arr: np.ndarray) -> float:
    """No-reference noise estimate (luma levels): median |Laplacian| over the flattest quarter of 8 px cells,
    scaled to a Gaussian sigma. Ranks near-duplicate copies of one picture by how noisy each is."""
    g = gray(arr).astype(np.float64)
    cells = max(1, min(g.shape) // 8)
    e = np.sort(highpass_energy(g, cells).ravel())
    return float(e[: max(1, len(e) // 4)].mean() / (np.sqrt(20) * np.sqrt(2 / np.pi)))
