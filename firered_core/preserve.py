"""Automatic preservation of unedited pixels: where did an edit really change the picture, and keep the rest.

No model and no instruction: a function of (input, output) pictures only.

1. **Registration** (:mod:`registration`): the output's global shift (phase correlation, within 3 % of each side)
   and zoom (searched within ±3 %) are measured and undone, so a 1-3 px shift or a 1-2 % zoom does not mark the
   whole picture as changed. When the first pass finds a region of 20 % or more, the registration is searched again
   with that region left out of the misfit (:func:`registration.refine`).
2. **Colour drift** (:mod:`colour_map`): a per-channel quadratic tone curve (``out = a x + b x^2 + c``) from the
   registered output to the input, fitted by trimmed least squares on the pixels outside the changed region
   (re-fitted as the region is found) with its slope bounded to 0.5-2 (a drift does not fold), is undone before
   comparing. It is fitted forwards, input to output, and inverted: the output's noise would flatten a map fitted
   the other way on a low-contrast picture, and with it the edit. The forward fit has the input's fine detail
   (input minus its 1-px blur) as a free term: a VAE loses a share of it, which would otherwise flatten the forward
   fit on a textured picture and make the inverse amplify (grass smoothed by an edit: IoU 0.75 without the term).
3. **Change mask**: the RGB distance of the corrected output to the input, blurred over ~1 px, is divided by the
   picture's own noise level, modelled as ``a + b * texture`` (``a``, ``b`` fitted on the unchanged pixels' median
   distance per texture bin): a real VAE round trip loses more on edges than on flat areas. The texture is the
   gradient magnitude both pictures show (the smaller of the two): an edit that smooths a textured area (or
   paints texture onto a flat one) is not excused by the texture only one side has. Where a channel of the edit
   is clipped at white or black, only a change the clipping cannot explain counts (:func:`clipped_change`).
   Pixels ``k_high`` times above the noise seed the region, which grows over pixels
   ``k_low`` times above it (hysteresis) and, in the last pass, over pixels whose local mean colour change (the
   region's own pixels left out) is ``k_mean`` times above its noise (a weak but consistent tint or shade); the
   outer lines of pixels (5 % of the longer side) get their own noise level (a VAE's padding); then closing, hole
   filling, a rim trimmed to where the change is at least half the change just inside (an edit blended over a pixel or two
   otherwise spills past every noise-relative threshold), opening and a minimum area. Steps 2-3 run three times;
   the first noise fit reads the lower quartile per texture bin (a 40 % edit can hold the median of a bin), the
   later ones skip the last region and every pixel above ``k_low``.
4. **Confidence**: 1 when the region is a minority of the picture, the noise after the colour fit is small and the
   registration is trusted (a clear phase-correlation peak, edge maps that correlate outside the region -- a
   periodic texture's whitened peak is low even where it is right -- or an output that keeps the input's edges
   there, :func:`edge_agreement`: on a hazy picture both the others are low); it falls to 0 for a global change (a restyle,
   a new picture, a colour change too large to be drift) and for a zoom found at the search's last step (it may
   lie beyond). Below 0.5 the estimate is "unsure" and the edit is returned whole, with a one-line note.
5. **Auto composite** (:func:`preserve`): the registered (and, by default, colour-corrected) output is pasted onto
   the input inside the region through :func:`masks.composite` (feather ramp inside the region's border), so every
   pixel outside the region is the input's own, bit for bit.

Pictures larger than ``work_side`` are estimated on a reduced copy; the region is scaled back up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from . import mask_ops as O
from . import masks as M
from .colour_map import apply_colour_map, fit_colour_map
from .registration import Registration, at_zoom_edge, edges, refine, register, warp

PRESERVE_MODES = ("off", "auto")
PRESERVE_COLOR = ("fit", "off", "mean-std", "histogram")
REFINE_FROM = 0.2  # a first region this large (up to 40 % of the misfit's textured half) re-registers without it
NOISE_QUANTILE = 0.5  # the noise level per texture bin is this quantile of the distances there
FIRST_QUANTILE = 0.25  # the first pass (no region known yet) reads this quantile, robust to a 40 % edit ...
LOW_TO_MEDIAN = 1.4  # ... times this: median / lower quartile of the length of a 3-channel Gaussian (chi, 3 dof)
EDGE_PASSES = 2  # rim trims: the second reaches a rim up to twice the band wide
NOISE_FLOOR = 0.008  # the smallest noise level assumed (RGB distance): 8-bit rounding and a VAE's least loss
DETAIL_BLUR = 1.0  # px: the input's fine detail (input minus this blur) is a free term of the colour fit


@dataclass(frozen=True)
class PreserveSettings:
    """Thresholds of the change mask; tuned on the tuning half of the photographs (``benchmarks/preserve.py``)."""

    k_high: float = 6.0  # seeds: this many times the picture's noise level
    k_low: float = 4.0  # the region grows over pixels this many times above it
    blur: float = 0.7  # Gaussian sigma (px) of the difference before thresholding
    close_radius: int = 3
    open_radius: int = 2
    grow: int = 0  # final dilation (px)
    k_mean: float = 4.0  # then over pixels whose local mean colour change is this many times its noise (0: off)
    mean_blur: float = 2.0
    edge_ratio: float = 0.5  # the rim keeps pixels whose change is at least this share of the change just inside
    edge_band: int = 2  # ... the rim's width and how far inside "just inside" reaches (px)
    border: float = 0.05  # noise measured apart in each outer line of pixels, out to this share of the longer side
    # (at least 4 px; 0: off)
    min_area: float = 0.002  # smallest region kept, as a fraction of the picture (at least 16 px)
    max_fraction: float = 0.6  # confidence falls from 1 at this changed fraction to 0 at 0.85
    noise_cap: float = 0.08  # ... from 1 at this median residual outside the region (RGB distance) to 0 at twice it
    max_drift: float = 0.15  # ... from 1 at this mean colour correction (RGB distance) to 0 at twice it
    min_peak: float = 0.06  # ... and from 1 at this registration peak to 0 at a third of it, unless ...
    min_related: float = 0.5  # ... the edge maps outside the region correlate: 1 at this, 0 at min_related - 0.2,
    min_edge_gain: float = 0.5  # ... or the edit keeps this share of the input's edges there (1 at this, 0 at -0.2)
    work_side: int = 768  # estimate on a copy at most this large


DEFAULT = PreserveSettings()


@dataclass
class Estimate:
    """The edit region (bool [H, W], at the input's size), how sure the estimate is, and what it measured."""

    region: torch.Tensor
    confidence: float
    registration: Registration
    fraction: float  # of the picture inside the region
    noise: float  # median residual outside the region after the colour fit (RGB distance, 0..1 scale)
    drift: float  # mean RGB distance the colour fit moved the unchanged pixels by
    colour_map: torch.Tensor = field(repr=False)  # [3, 3] coefficients of the fitted colour map
    unsure: bool = False
    related: float = 1.0  # correlation of the two pictures' edge maps outside the region (0: unrelated)
    edge_gain: float = 1.0  # the edit's edges regressed on the input's there (0: unrelated; :func:`edge_agreement`)


@dataclass
class PreserveResult:
    image: torch.Tensor  # [H, W, 3], the input's size
    mask: torch.Tensor  # [H, W] float: 1 = taken from the edit
    estimate: Estimate
    note: str


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.conv2d(F.pad(x[None, None], (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return y[0, 0]


def texture(source: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gradient magnitude of a picture's luminance, blurred like the difference."""
    return _blur(edges(source) / 2, max(sigma, 1.0))


def fit_noise(diff: torch.Tensor, tex: torch.Tensor, where: torch.Tensor, bins: int = 8,
              quantile: float = NOISE_QUANTILE) -> tuple[float, float]:
    """``(a, b)`` of the noise level ``a + b * texture``: a line through the median difference per texture bin
    (or through its ``quantile``, scaled to the median by :data:`LOW_TO_MEDIAN`)."""
    scale = 1.0 if quantile == NOISE_QUANTILE else LOW_TO_MEDIAN
    d, t = diff[where], tex[where]
    if d.numel() < 64:
        d, t = diff.reshape(-1), tex.reshape(-1)
    order = torch.argsort(t)
    chunks = [c for c in torch.tensor_split(order, bins) if len(c)]
    tm = torch.stack([t[c].median() for c in chunks]).double()
    dm = torch.stack([d[c].quantile(quantile) for c in chunks]).double() * scale
    a_mat = torch.stack([torch.ones_like(tm), tm], 1)
    a, b = torch.linalg.lstsq(a_mat, dm[:, None]).solution[:, 0].tolist()
    if b < 0:
        a, b = float(dm.median()), 0.0
    return max(a, float(dm.min()) * 0.5, NOISE_FLOOR), b


def border_width(shape: tuple[int, ...], s: PreserveSettings) -> int:
    """The lines of pixels along each side whose noise is measured apart: a VAE's padding error reaches further
    in pixels on a larger picture (the tiny VAE's: 2-6x the inner noise out to ~4 px at 192 px, ~12 at 384)."""
    return 0 if s.border <= 0 else max(4, round(s.border * max(shape)))


def border_scaled(z: torch.Tensor, where: torch.Tensor, width: int) -> torch.Tensor:
    """``z`` divided, in each line of pixels ``k`` < ``width`` px from each side of the picture, by how much larger
    its median over ``where`` is there than inside (when it is): a VAE's padding and a warp's edge leave more error
    along the border (2.5x in the outer 3 px, 1.4x out to ~12 px on the tuning half at 192 px). The width is
    :func:`border_width`: 2-8 % of the longer side were tried on the tuning half at 192 and 384 px; 4-6 % tie."""
    h, w = z.shape
    if width <= 0 or min(h, w) <= 4 * width:
        return z
    ys, xs = torch.arange(h)[:, None].expand(h, w), torch.arange(w)[None].expand(h, w)
    dist = torch.stack([ys, h - 1 - ys, xs, w - 1 - xs])  # to the top, bottom, left, right side
    near, side = dist.min(0)
    inner = where & (near >= width)
    if int(inner.sum()) < 64:
        return z
    level = z[inner].median()
    scale = torch.ones_like(z)
    for j in range(4):
        for k in range(width):
            line = (side == j) & (near == k)
            sel = z[line & where]
            if sel.numel() >= 8:
                scale[line] = (sel.median() / level).clamp_min(1.0)
    return z / scale


def clipped_change(change: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """``change`` (corrected edit minus input) where a channel of the edit is clipped at white (black) counted only
    when the input is darker (brighter) than the colour map says that white (black) came from: a drift that blows
    out highlights or crushes shadows loses them beyond any map, and that loss is drift, not edit."""
    top, bottom = edited >= 1 - 0.5 / 255, edited <= 0.5 / 255
    return torch.where(top, change.clamp_min(0), torch.where(bottom, change.clamp_max(0), change))


def _ramp(value: float, one: float, zero: float) -> float:
    """1 at or before ``one``, 0 at or past ``zero``, linear between."""
    return float(min(1.0, max(0.0, (zero - value) / (zero - one))))


def _to_work(image: torch.Tensor, side: int) -> tuple[torch.Tensor, float]:
    h, w = image.shape[:2]
    f = min(1.0, side / max(h, w))
    if f == 1.0:
        return image, 1.0
    size = (max(16, round(h * f)), max(16, round(w * f)))
    return M.resize_image(image[None], size[1], size[0])[0], h / size[0]


def _blur_rgb(image: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.stack([_blur(c, sigma) for c in image.unbind(-1)], -1)


def _half_edge(region: torch.Tensor, diff: torch.Tensor, s: PreserveSettings) -> torch.Tensor:
    """Trim the region's rim to where the change reaches half its size just inside: an edit blended over a pixel or
    two (and blurred by the difference filter) crosses every noise-relative threshold well outside its true edge."""
    if s.edge_ratio <= 0 or not bool(region.any()):
        return region
    for _ in range(EDGE_PASSES):  # a rim wider than the band keeps its outer pixels in the core the first time
        core = O.erode(region, s.edge_band)
        ref = F.max_pool2d((diff * core)[None, None], 2 * s.edge_band + 1, stride=1, padding=s.edge_band)[0, 0]
        trimmed = region & ~(~core & (diff < s.edge_ratio * ref))
        if torch.equal(trimmed, region):
            break
        region = trimmed
    return region


def _mean_z(change: torch.Tensor, region: torch.Tensor, tex: torch.Tensor, keep: torch.Tensor,
            s: PreserveSettings) -> torch.Tensor:
    """The local mean colour change around each pixel outside ``region`` (Gaussian, ``mean_blur`` px; the region's
    own pixels left out so a strong edit does not spill into its surround), over its noise level fitted like the
    per-pixel one: a weak but consistent tint or shade that single pixels hide in the noise."""
    out = (~region).float()
    weight = _blur(out, s.mean_blur).clamp_min(1e-3)
    mean = torch.stack([_blur(c * out, s.mean_blur) / weight for c in change.unbind(-1)], -1).norm(dim=-1) * out
    a, b = fit_noise(mean, tex, keep)
    return border_scaled(mean / (a + b * tex), keep, border_width(keep.shape, s))


def _region(z: torch.Tensor, diff: torch.Tensor, valid: torch.Tensor, s: PreserveSettings,
            zm: torch.Tensor | None = None) -> torch.Tensor:
    """Hysteresis on ``z`` (seeds above ``k_high``, grown over ``k_low``), then, given ``zm``, grown over pixels whose
    local mean change is above ``k_mean``; rim trimmed, closed, holes filled, opened, small parts dropped."""
    region = O.reconstruct(z > s.k_high, (z > s.k_low) & valid)
    if zm is not None:
        region = O.reconstruct(region, ((zm > s.k_mean) | region) & valid)
    region = _half_edge(O.fill_holes(O.close(region, s.close_radius)), diff, s)
    region = O.fill_holes(O.close(region, s.close_radius))
    region = O.open_(region, s.open_radius)
    region = O.remove_small(region, max(16, int(s.min_area * region.numel())))
    return O.dilate(region, s.grow) & valid


def _align(edited: torch.Tensor, reg: Registration, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The edit warped onto the input's grid, and where it has data (2 px in from a warped edge)."""
    aligned, valid = warp(edited, reg, *shape)
    return aligned, (O.erode(valid, 2) if not bool(valid.all()) else valid)


def estimate_region(source: torch.Tensor, edited: torch.Tensor, settings: PreserveSettings = DEFAULT,
                    iterations: int = 3) -> tuple[Estimate, torch.Tensor]:
    """Where ``edited`` [h, w, 3] really differs from ``source`` [H, W, 3] (both 0..1; the edit is resized to the
    source's size first).

    Returns the :class:`Estimate` and the registered edit [H, W, 3] (the edit on the source's pixel grid).
    """
    s = settings
    source = source[..., :3].float()
    height, width = source.shape[:2]
    edited = M.resize_image(edited[None, ..., :3].float(), width, height)[0]
    src, f = _to_work(source, s.work_side)
    ed, _ = _to_work(edited, s.work_side)
    reg = register(src, ed)
    aligned, valid = _align(ed, reg, src.shape[:2])
    tex_src = texture(src, s.blur)
    detail = src - _blur_rgb(src, DETAIL_BLUR)
    region = suspect = torch.zeros_like(valid)
    coef = None
    for it in range(iterations):
        keep = valid & ~O.dilate(region, 4) & ~suspect
        coef = fit_colour_map(aligned, src, keep, seed=it, detail=detail)
        corrected = apply_colour_map(aligned, coef)
        change = clipped_change(corrected - src, aligned)
        diff = _blur(change.norm(dim=-1), s.blur)
        tex = torch.minimum(tex_src, texture(corrected, s.blur))  # texture both pictures show
        a, b = fit_noise(diff, tex, keep, quantile=FIRST_QUANTILE if it == 0 else NOISE_QUANTILE)
        z = border_scaled(diff / (a + b * tex), keep, border_width(keep.shape, s))
        region = _region(z, diff, valid, s)
        if s.k_mean > 0 and it == iterations - 1:
            region = _region(z, diff, valid, s, _mean_z(change, region, tex, keep, s))
        suspect = z > s.k_low
        if it == 0 and float(region.float().mean()) >= REFINE_FROM:
            moved = refine(src, ed, reg, O.dilate(region, 4))
            if moved != reg:
                reg = moved
                aligned, valid = _align(ed, reg, src.shape[:2])
    keep = valid & ~region
    if not bool(keep.any()):
        keep = valid
    drift = float((corrected - aligned).norm(dim=-1)[keep].mean())
    related, gain = edge_agreement(src, aligned, corrected, keep)
    noise = float(diff[keep].median())
    fraction = float(region.float().mean())
    # A periodic texture's whitened correlation peak is low even where it is right (it is spread over the lattice),
    # and on a picture with little structure (a blurred or hazy photograph) both the peak and the edge correlation
    # are low (the edit's noise outweighs the input's faint edges), so a registration is trusted when its peak is
    # clear, the edge maps outside the region correlate, or the edit keeps the input's edges there; a zoom found at
    # the search's last step may lie beyond it (the misfit then hides in the texture-scaled noise).
    registered = max(_ramp(-reg.peak, -s.min_peak, -s.min_peak / 3),
                     _ramp(-related, -s.min_related, 0.2 - s.min_related),
                     _ramp(-gain, -s.min_edge_gain, 0.2 - s.min_edge_gain)) * (not at_zoom_edge(reg))
    confidence = min(_ramp(fraction, s.max_fraction, 0.85), _ramp(noise, s.noise_cap, 2 * s.noise_cap),
                     _ramp(drift, s.max_drift, 2 * s.max_drift), registered)
    if f != 1.0:
        region = F.interpolate(region.float()[None, None], size=(height, width), mode="bilinear",
                               align_corners=False)[0, 0] > 0.5
        reg = replace(reg, dx=reg.dx * f, dy=reg.dy * f)
    aligned_full, _ = warp(edited, reg, height, width)
    est = Estimate(region, confidence, reg, fraction, noise, drift, coef, unsure=confidence < 0.5, related=related,
                   edge_gain=gain)
    return est, aligned_full


def edge_agreement(source: torch.Tensor, aligned: torch.Tensor, corrected: torch.Tensor,
                   where: torch.Tensor) -> tuple[float, float]:
    """How much of the input's structure the registered edit shows over ``where``, from the edge maps (blurred over
    1 px) of the input, the registered edit (``aligned``) and the colour-corrected one (``corrected``):

    - ``related``: the Pearson correlation of the input's and ``aligned``'s, near 1 where the edit shows the input's
      structure, near 0 for another picture;
    - ``gain``: the slope of ``corrected``'s regressed on the input's, the share of the input's edge contrast the
      edit keeps. The edit's own noise adds edges that do not covary with the input's, so unlike the correlation it
      does not pull this towards 0 on a picture with faint structure. A shifted (beyond the search), flipped or other
      picture keeps at most 0.33 of them (hazy tuning pictures); a registered edit keeps 0.5-1 on most planted
      cases, less where a VAE's lost detail was most of the structure."""
    ea = _blur(edges(source), 1.0)[where].double()
    if ea.numel() < 64:
        return 0.0, 0.0
    ea = ea - ea.mean()
    eb, ec = (_blur(edges(x), 1.0)[where].double() for x in (aligned, corrected))
    eb, ec = eb - eb.mean(), ec - ec.mean()
    related = float((ea * eb).sum() / (ea.norm() * eb.norm()).clamp_min(1e-12))
    gain = float((ea * ec).sum() / (ea * ea).sum().clamp_min(1e-12))
    return related, gain


def _note(est: Estimate) -> str:
    r = est.registration
    where = f"shift {r.dx:+.1f},{r.dy:+.1f} px, zoom {100 * (r.scale - 1):+.1f} %"
    if est.unsure:
        return (f"preserve auto: unsure (confidence {est.confidence:.2f}: {100 * est.fraction:.0f} % of the picture "
                f"changed, residual noise {est.noise:.3f}, registration peak {r.peak:.2f}): the change looks "
                "global, so the edit is returned whole")
    if not bool(est.region.any()):
        return f"preserve auto: no change beyond the picture's noise ({where}); the input is returned"
    return (f"preserve auto: {100 * est.fraction:.1f} % of the picture edited (confidence {est.confidence:.2f}; "
            f"{where}; colour drift {est.drift:.3f} removed outside); every other pixel is the input's")


def preserve(source: torch.Tensor, edited: torch.Tensor, feather: int = 2, color: str = "fit",
             settings: PreserveSettings = DEFAULT) -> PreserveResult:
    """Paste the part of ``edited`` that really changed onto ``source`` (both [H, W, 3] in 0..1).

    ``color``: ``fit`` (the estimate's colour map, which removes the global drift, default), ``off``, or
    ``mean-std`` / ``histogram`` (:func:`masks.color_match`, measured outside the region). When the estimate is
    unsure, the edit (resized to the source's size) is returned whole and the mask is all ones.
    """
    if color not in PRESERVE_COLOR:
        raise M.MaskError(f"preserve colour {color!r} is not one of {PRESERVE_COLOR}")
    if feather < 0:
        raise M.MaskError(f"feather={feather} must be >= 0 pixels")
    source = source[..., :3].float()
    est, aligned = estimate_region(source, edited, settings)
    height, width = source.shape[:2]
    if est.unsure:
        whole = M.resize_image(edited[None, ..., :3].float(), width, height)[0]
        return PreserveResult(whole, torch.ones(height, width), est, _note(est))
    mask = est.region.float()
    if color == "fit":
        content = apply_colour_map(aligned, est.colour_map)
    elif color == "off":
        content = aligned
    else:
        content = M.color_match(aligned[None], source[None], mask[None], color)[0]
    image = M.composite(content[None], source[None], mask[None], feather)[0]
    return PreserveResult(image, mask, est, _note(est))


def preserve_batch(sources: torch.Tensor, edited: torch.Tensor, feather: int = 2, color: str = "fit",
                   settings: PreserveSettings = DEFAULT) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """:func:`preserve` for IMAGE batches: ``edited`` [B, h, w, C] against ``sources`` [1 or B, H, W, C].
    Returns images [B, H, W, 3], masks [B, H, W] and one note per image."""
    sources = M.fit_batch(sources, edited.shape[0], "source")
    results = [preserve(sources[k], edited[k], feather, color, settings) for k in range(edited.shape[0])]
    return (torch.stack([r.image for r in results]), torch.stack([r.mask for r in results]),
            [r.note for r in results])
