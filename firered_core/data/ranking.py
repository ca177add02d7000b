"""Which member of a near-duplicate group to keep: the one the quality measures rate best.

Every member shows the same content, so each defect is judged relative to the group: a member is worse on a defect
when its value exceeds the group's best by more than that defect's tolerance (overlay text, a mosaic, noise, a JPEG
block grid, clipped pixels: the measures of the artefact and quality stages). Members are ordered by how many
defects they are worse on, then resolution, then sharpness, then input order: sharpness only breaks ties (overlay
text and noise raise it, so it must never decide alone).
"""

from __future__ import annotations

import numpy as np

from .artefacts import mosaic_score, text_find
from .config import ArtefactConfig
from .extras import available
from .imageops import gray, resize_to
from .pairquality import blockiness, noise_level

DEFECTS = ("text", "mosaic", "noise", "blocky", "clip")
MEASURES = DEFECTS + ("contrast",)  # contrast is no defect: it says which members a member's clipping is judged by
# how far above the group's best a member must be to count as worse (units of each measure): the artefact and
# quality stages' default limits where they measure the same thing (text, mosaic, JPEG blocks); noise a 1.5x sigma;
# clipping a tenth of the picture, judged only against members of at least the row's contrast: a copy whose
# contrast was cut clips less without the original being damaged.
_LIMITS = ArtefactConfig.model_fields  # one place for the shipped limits (tuned by benchmarks/tune_filters.py)
TOLERANCE = {"text": _LIMITS["text"].default, "mosaic": _LIMITS["mosaic"].default, "noise": 0.4, "blocky": 0.3,
             "clip": 0.1}
WHAT = {"text": "overlay text", "mosaic": "mosaic", "noise": "noise", "blocky": "JPEG blocks",
        "clip": "clipped pixels"}


def defect_values(images: list[np.ndarray]) -> dict[str, float]:
    """The row's defect measures (``images``: its sources, then its target), summed over its images (a sum keeps a
    difference in any one image); overlay text is the target's strokes its first source lacks (as the artefact
    stage measures it in a pair); noise is log1p of the no-reference sigma, at a common scale; contrast is log1p
    of the luma's standard deviation."""
    *sources, target = images
    ref = resize_to(sources[0], (target.shape[1], target.shape[0])) if sources else None
    out = {k: 0.0 for k in MEASURES}
    out["text"] = round(text_find(target, ref)[0], 6) if available("cv2") else 0.0
    for arr in images:
        got = {"mosaic": mosaic_score(arr), "noise": float(np.log1p(noise_level(_common_scale(arr)))),
               "blocky": blockiness(arr), "clip": float(((arr.max(axis=-1) >= 250) | (arr.max(axis=-1) <= 5)).mean()),
               "contrast": float(np.log1p(gray(arr).std()))}
        out.update({k: round(out[k] + float(v), 6) for k, v in got.items()})
    return out


def _common_scale(arr: np.ndarray, side: int = 64) -> np.ndarray:
    """The picture with its short side at ``side`` (area-averaged): members of different resolution then carry
    comparable noise (a downscaled copy has averaged its noise away, which is not the original's fault)."""
    from PIL import Image

    h, w = arr.shape[:2]
    s = side / min(h, w)
    if s >= 1:
        return arr
    return np.asarray(Image.fromarray(arr).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BOX))


def worse(values: dict[str, np.ndarray], labels: np.ndarray, alive: np.ndarray,
          pixels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per defect, a boolean per row: worse than its group's best alive member by more than the tolerance. With
    ``pixels``, a JPEG block grid is judged only against members of at least the row's resolution (resampling a
    copy down erases its original's grid, which is no credit to the smaller copy), and clipping only against
    members of at least the row's contrast (cutting a copy's contrast un-clips it)."""
    n = len(labels)
    out = {}
    for k in DEFECTS:
        v = np.asarray(values[k], dtype=np.float64)
        best = np.full(n, np.inf)
        np.minimum.at(best, labels[alive], v[alive])
        key = None if pixels is None else {"blocky": pixels, "clip": values.get("contrast")}.get(k)
        ref = best[labels] if key is None else _best_at_least(v, labels, alive, np.asarray(key))
        out[k] = alive & (v - ref > TOLERANCE[k])
    return out


def _best_at_least(v: np.ndarray, labels: np.ndarray, alive: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Per row: the smallest value among its group's alive members (itself included) with at least its ``key``."""
    n = len(labels)
    out = np.full(n, np.inf)
    by = np.lexsort((np.arange(n), -key, labels))  # per group, largest key first
    run, last, i = np.inf, None, 0
    while i < n:
        j = i  # members of one group with one key share their running minimum
        while j < n and labels[by[j]] == labels[by[i]] and key[by[j]] == key[by[i]]:
            j += 1
        if labels[by[i]] != last:
            run, last = np.inf, labels[by[i]]
        tie = [int(r) for r in by[i:j] if alive[r]]
        run = min([run, *(float(v[r]) for r in tie)])
        out[by[i:j]] = run
        i = j
    return out


def order(labels: np.ndarray, penalty: np.ndarray, pixels: np.ndarray, sharp: np.ndarray) -> np.ndarray:
    """Row indices sorted by group, then the best member first."""
    n = len(labels)
    return np.lexsort((np.arange(n), -sharp, -pixels, penalty, labels))


def keep_reason(i: int, best: int, flags: dict[str, np.ndarray], values: dict[str, np.ndarray],
                pixels: np.ndarray, sharp: np.ndarray) -> str:
    """Why ``best`` was kept rather than ``i``, from the first criterion that tells them apart."""
    if sum(f[i] for f in flags.values()) > sum(f[best] for f in flags.values()):
        mine = [k for k in DEFECTS if flags[k][i] and not flags[k][best]]
        return "fewer defects" + ("; this row has more " + ", ".join(
            f"{WHAT[k]} ({values[k][i]:.3g} vs {values[k][best]:.3g})" for k in mine) if mine else "")
    if pixels[best] != pixels[i]:
        return f"higher resolution ({int(pixels[best])} vs {int(pixels[i])} px)"
    if sharp[best] != sharp[i]:
        return f"as clean and sharper ({sharp[best]:.3g} vs {sharp[i]:.3g})"
    return "the same quality, earlier in the input"
