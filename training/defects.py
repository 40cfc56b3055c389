"""Synthetic defects with known masks, and the localisation metrics MVTec AD reports (pixel AUROC, AUPRO).

A defect's mask is the set of pixels it visibly changed (by at least `MIN_CHANGE` of the level range in some
channel), so a pasted patch that happens to match the image underneath does not count as a defect no map
could see. Every defect is sized from the image (a fraction of its short side), so the same suite runs on
8x8 digits and 64x64 photos. Everything is seeded.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MIN_CHANGE = 0.15  # of the level range: smaller changes are not marked (nor visible at a glance)
MIN_PIXELS = 2  # a defect changes at least this many pixels, else it is drawn again
MAX_FPR = 0.3  # AUPRO integrates the per-region overlap up to this false-positive rate, as MVTec AD does

Defect = Callable[[np.ndarray, np.ndarray, int, np.random.Generator], np.ndarray]


def _ellipse(h: int, w: int, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A filled ellipse of random centre and radii in [lo, hi] of the short side, as a boolean (h, w) mask."""
    side = min(h, w)
    ry, rx = rng.uniform(lo, hi, size=2) * side
    ry, rx = max(ry, 0.6), max(rx, 0.6)
    cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
    yy, xx = np.mgrid[0:h, 0:w]
    return np.asarray((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0)


def _rect(h: int, w: int, rng: np.random.Generator, lo: float, hi: float) -> tuple[slice, slice]:
    side = min(h, w)
    sh, sw = (max(1, int(round(f * side))) for f in rng.uniform(lo, hi, size=2))
    y, x = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
    return slice(y, y + sh), slice(x, x + sw)


def _far_level(img: np.ndarray, region: np.ndarray, top: int, rng: np.random.Generator) -> np.ndarray:
    """A level per channel at the far end of the range from the region's mean (a defect that contrasts)."""
    mean = img[region].mean(axis=0)  # (C,)
    far = np.where(mean < top / 2, rng.uniform(0.75, 1.0, size=mean.shape), rng.uniform(0.0, 0.25, size=mean.shape))
    return np.rint(far * top).astype(img.dtype)


def blob(img: np.ndarray, pool: np.ndarray, top: int, rng: np.random.Generator) -> np.ndarray:
    """A filled ellipse of one contrasting level (a stain, a dropped particle)."""
    out = img.copy()
    m = _ellipse(*img.shape[:2], rng, 0.08, 0.2)
    out[m] = _far_level(img, m, top, rng)
    return out


def scratch(img: np.ndarray, pool: np.ndarray, top: int, rng: np.random.Generator) -> np.ndarray:
    """A thin straight line of a contrasting level across part of the image."""
    h, w = img.shape[:2]
    side = min(h, w)
    length = rng.uniform(0.4, 0.8) * side
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.25 * h, 0.75 * h), rng.uniform(0.25 * w, 0.75 * w)
    t = np.linspace(-length / 2, length / 2, int(4 * length) + 2)
    width = max(1, int(round(side / 28)))
    m = np.zeros((h, w), dtype=bool)
    for off in range(width):
        ys = np.clip(np.rint(cy + t * np.sin(angle) + off * np.cos(angle)).astype(int), 0, h - 1)
        xs = np.clip(np.rint(cx + t * np.cos(angle) - off * np.sin(angle)).astype(int), 0, w - 1)
        m[ys, xs] = True
    out = img.copy()
    out[m] = _far_level(img, m, top, rng)
    return out


def patch(img: np.ndarray, pool: np.ndarray, top: int, rng: np.random.Generator) -> np.ndarray:
    """A rectangle pasted from another image of the pool at another place (CutPaste's defect)."""
    h, w = img.shape[:2]
    ys, xs = _rect(h, w, rng, 0.2, 0.4)
    src = pool[int(rng.integers(len(pool)))]
    sy = int(rng.integers(0, h - (ys.stop - ys.start) + 1))
    sx = int(rng.integers(0, w - (xs.stop - xs.start) + 1))
    out = img.copy()
    out[ys, xs] = src[sy : sy + ys.stop - ys.start, sx : sx + xs.stop - xs.start]
    return out


def missing(img: np.ndarray, pool: np.ndarray, top: int, rng: np.random.Generator) -> np.ndarray:
    """A rectangle gone to black or white, whichever contrasts more (a dead region, an occlusion)."""
    h, w = img.shape[:2]
    ys, xs = _rect(h, w, rng, 0.15, 0.35)
    out = img.copy()
    out[ys, xs] = 0 if img[ys, xs].mean() > top / 2 else top
    return out


def colour_spot(img: np.ndarray, pool: np.ndarray, top: int, rng: np.random.Generator) -> np.ndarray:
    """An ellipse tinted towards a saturated colour (a colour cast, a wrong-coloured part): colour models only."""
    out = img.copy()
    m = _ellipse(*img.shape[:2], rng, 0.1, 0.22)
    hue = np.eye(3)[int(rng.integers(3))] if rng.random() < 0.5 else 1.0 - np.eye(3)[int(rng.integers(3))]
    tinted = 0.4 * img[m].astype(np.float64) + 0.6 * top * hue
    out[m] = np.rint(tinted).astype(img.dtype)
    return out


DEFECTS: dict[str, Defect] = {"blob": blob, "scratch": scratch, "patch": patch, "missing": missing}
COLOUR_DEFECTS: dict[str, Defect] = {"colour_spot": colour_spot}


def defect_kinds(channels: int) -> dict[str, Defect]:
    return {**DEFECTS, **(COLOUR_DEFECTS if channels == 3 else {})}


def make_defects(
    images: np.ndarray, levels: int, kind: str, seed: int, pool: np.ndarray | None = None, tries: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Defective copies of images (N, H, W, C) and their masks (N, H, W): the pixels the defect changed by at
    least MIN_CHANGE of the range. `pool` supplies pasted patches (default: the images themselves, shifted by one)."""
    fn = defect_kinds(images.shape[-1])[kind]
    rng = np.random.default_rng(seed)
    pool = np.roll(images, 1, axis=0) if pool is None else pool
    top = levels - 1
    out = np.empty_like(images)
    masks = np.zeros(images.shape[:3], dtype=bool)
    for i, img in enumerate(images):
        for _ in range(tries):
            bad = fn(img, pool, top, rng)
            changed = (np.abs(bad.astype(np.int64) - img.astype(np.int64)) >= MIN_CHANGE * top).any(-1)
            if changed.sum() >= MIN_PIXELS:
                break
        out[i], masks[i] = bad, changed
    return out, masks


# --- metrics ---------------------------------------------------------------------------------------


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve, positives the anomalous class; ties count one half (Mann-Whitney U)."""
    neg, pos = np.ravel(negatives).astype(np.float64), np.ravel(positives).astype(np.float64)
    allv = np.r_[neg, pos]
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[len(neg) :].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(neg) * len(pos)))


def aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = MAX_FPR, steps: int = 400) -> float:
    """The area under the per-region-overlap curve up to `max_fpr`, divided by max_fpr (MVTec AD's AUPRO).

    Regions are the 8-connected components of each image's mask; a threshold's FPR is the fraction of
    defect-free pixels (of every image) above it, its PRO the mean over regions of the fraction of the
    region above it. The curve runs over `steps` thresholds (quantiles of every pixel's value, and the
    extremes), from the highest down, and is cut at max_fpr by linear interpolation.
    """
    from scipy import ndimage

    maps = np.asarray(maps, dtype=np.float64)
    negatives = np.sort(maps[~masks])
    regions: list[np.ndarray] = []
    for m, mask in zip(maps, masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [np.sort(m[labels == r]) for r in range(1, n + 1)]
    if not regions:
        raise ValueError("no defect regions")
    inner = np.quantile(maps, np.linspace(0.0, 1.0, steps))
    thresholds = np.unique(np.r_[inner, np.inf, -np.inf])[::-1]  # from above every value to below every value

    def above(sorted_values: np.ndarray, t: float) -> float:  # the fraction of values strictly above t
        return 1.0 - np.searchsorted(sorted_values, t, side="right") / len(sorted_values)

    fpr = np.array([above(negatives, t) for t in thresholds])
    pro = np.array([np.mean([above(r, t) for r in regions]) for t in thresholds])
    cut = np.searchsorted(fpr, max_fpr, side="right")  # fpr is non-decreasing along the thresholds
    x, y = fpr[:cut], pro[:cut]
    if cut < len(fpr):  # the point at max_fpr, between the last point below it and the first above
        f0, f1, p0, p1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        x, y = np.r_[x, max_fpr], np.r_[y, p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0)]
    return float(np.trapezoid(y, x) / max_fpr)
