"""The anomaly map of the model-repository contract (models/README.md, "Anomaly maps"), written once: the
service (onnxruntime) and training (torch) compute a map from the same parts with these functions.

A map reads each pixel of an image against the version's validation pixels, in nats of surprise; its parts are
the pixel's expected NLL under the posterior and its residual against a reconstruction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from vae_contract.formulas import CALIBRATION_FPRS, FloatArray, quantile_table

MAP_UNITS = "nats"
MAP_DEFINITION = (
    "max over its parts (nll: E_q[-log p(x_p|z)], the pixel's expected NLL in nats under the posterior with the "
    "score's K importance samples; residual and residual_fine: |x_p - E[x_p|z = mu(x')]| over the level range, "
    "channels summed, where x' is x with the pixels a first pass flags (the map of nll and residual read with mu(x) "
    "itself, above refit's threshold) set to refit's fill) of -ln(the fraction of validation pixels whose part is at "
    "least as large), each part Gaussian-smoothed by its blur_px first (residual_fine: none): nats of surprise "
    "against normal pixels"
)
#: the definition of a block whose residual is read at one scale (calibrated before residual_fine)
TWO_PART_MAP_DEFINITION = (
    "max over its parts (nll: E_q[-log p(x_p|z)], the pixel's expected NLL in nats under the posterior with the "
    "score's K importance samples; residual: |x_p - E[x_p|z = mu(x')]| over the level range, channels summed, "
    "where x' is x with the pixels a first pass flags (the same map read with mu(x) itself, above refit's "
    "threshold) set to refit's fill) of -ln(the fraction of validation pixels whose part is at least as large), "
    "each part Gaussian-smoothed by its blur_px first: nats of surprise against normal pixels"
)
#: the definition of a block with parts and no refit (calibrated before the second pass): the residual reads mu(x)
ONE_PASS_MAP_DEFINITION = (
    "max over its parts (nll: E_q[-log p(x_p|z)], the pixel's expected NLL in nats under the posterior with the "
    "score's K importance samples; residual: |x_p - E[x_p|z = mu(x)]| over the level range, channels summed) of "
    "-ln(the fraction of validation pixels whose part is at least as large), each part Gaussian-smoothed by its "
    "blur_px first: nats of surprise against normal pixels"
)
LEGACY_MAP_DEFINITION = (
    "E_q[-log p(x_p|z)]: pixel p's expected NLL in nats (channels summed; given the rows above for a rows-context "
    "model) under the posterior, with the self-normalised importance weights of the score's K samples"
)
MAX_MAP_SAMPLES = 200_000  # validation pixel scores kept to tabulate the map's quantiles
#: the parts of a map and the per-pixel value each reads: the residual twice, smoothed and not. Blocks calibrated
#: before residual_fine have the first two (TWO_PARTS), and their maps read as they did
PART_SOURCES = {"nll": "nll", "residual": "residual", "residual_fine": "residual"}
MAP_PARTS = tuple(PART_SOURCES)
TWO_PARTS = ("nll", "residual")
TAIL_POINTS = 400  # a part's table: quantiles spaced evenly in log(1 - p), dense where the tail is read
TAIL_FIT = 10  # past the largest validation value, the tail goes on as the exponential through the last 1/TAIL_FIT
#: the fraction of validation pixels the first pass flags for refilling. Measured against 0.01 and 0.05 on 8-bit
#: MNIST and the 8x8 digits: 0.02 best or within 0.005 AUPRO of the best on every defect kind
REFIT_FPR = 0.02

Reconstruct = Callable[[np.ndarray], np.ndarray]  # images (B, D) in levels -> E[x|z = mu(x)] (B, D) in levels


def map_blur(height: int, width: int) -> dict[str, float]:
    """Each part's Gaussian smoothing, sigma in pixels: max(1, short side / 32) for the residual, half that for
    the NLL, none for residual_fine. Defects are regions and the residual is noisy pixel to pixel, so the
    smoothed residual finds regions; a thin scratch lives in the NLL part and the unsmoothed residual, which a
    wide blur would spread out. Measured on 8-bit MNIST, the 8x8 digits and 32x32 photo crops against sigma 0.5
    for the residual (every defect kind as well or better at 1, but grey crops' scratches) and no blur; then
    residual_fine beside the smoothed residual against that residual alone, on those data and three textures:
    scratches better on every default model and texture, no kind more than 0.004 AUPRO worse (docs/quality.md)."""
    sigma = max(1.0, min(height, width) / 32.0)
    return {"nll": sigma / 2.0, "residual": sigma, "residual_fine": 0.0}


def gaussian_blur(maps: np.ndarray, sigma: float) -> FloatArray:
    """Maps (B, H, W) smoothed by a Gaussian of `sigma` pixels, truncated at 4 sigma, edges repeated (as
    scipy.ndimage.gaussian_filter's mode "nearest"): two passes of a 1-D kernel."""
    out = np.asarray(maps, dtype=np.float64)
    if sigma <= 0:
        return out
    r = int(4.0 * sigma + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(kernel[i] * np.take(padded, np.arange(i, i + n), axis=axis) for i in range(2 * r + 1))
    return np.asarray(out, dtype=np.float64)


def residual_maps(x: np.ndarray, expected: np.ndarray, levels: int, channels: int) -> FloatArray:
    """|x - E[x|z]| / (levels - 1), channels summed: images x (B, D) and the decoder's expected values (B, D),
    channel fastest -> (B, P)."""
    r = np.abs(np.asarray(x, dtype=np.float64) - np.asarray(expected, dtype=np.float64)) / (levels - 1)
    return r.reshape(r.shape[0], -1, channels).sum(-1)


def tail_table(values: np.ndarray) -> dict[str, list[float]]:
    """A part's quantile table for reading its upper tail: probs 1 - q, q from 1 down to 1/n evenly in log q,
    then 1 (the largest value)."""
    s = np.sort(np.asarray(values, dtype=np.float64).ravel())
    q = np.geomspace(1.0, 1.0 / len(s), TAIL_POINTS)
    probs = np.r_[1.0 - q, 1.0]
    probs[0] = 0.0
    vals = np.quantile(s, probs)
    return {"probs": [float(p) for p in probs], "values": [float(v) for v in np.maximum.accumulate(vals)]}


@dataclass(frozen=True)
class MapPart:
    """One part of the anomaly map: its smoothing and its validation pixels' upper tail."""

    blur_px: float
    probs: FloatArray
    values: FloatArray

    @classmethod
    def from_block(cls, block: dict[str, Any]) -> MapPart:
        q = block["quantiles"]
        return cls(float(block["blur_px"]), np.asarray(q["probs"], float), np.asarray(q["values"], float))

    def surprise(self, v: np.ndarray) -> FloatArray:
        """-ln P(a validation pixel's part >= v), read off the table; past its largest value, an exponential
        tail through the last 1/TAIL_FIT of the table, so that larger values keep ranking higher."""
        v = np.asarray(v, dtype=np.float64)
        s_tab = -np.log(np.maximum(1.0 - self.probs, 0.0) + 1e-300)
        s_tab[-1] = s_tab[-2] + math.log(2.0)  # the largest value: half a pixel further into the tail
        inside = np.interp(v, self.values, s_tab)
        j = max(0, len(self.values) - 1 - len(self.values) // TAIL_FIT)
        dv = self.values[-1] - self.values[j]
        ds = s_tab[-1] - s_tab[j]
        span = max(dv, 1e-6 * max(self.values[-1] - self.values[0], 1e-12))
        past = s_tab[-1] + (v - self.values[-1]) * ds / span
        return np.asarray(np.where(v > self.values[-1], past, inside), dtype=np.float64)


def map_parts(
    expected_nll: np.ndarray, residual: np.ndarray, shape: tuple[int, int], blur: dict[str, float]
) -> dict[str, FloatArray]:
    """Each part's smoothed map (B, H, W) from the expected NLLs and residuals (B, P), for the parts `blur` names
    (PART_SOURCES says which value each reads)."""
    h, w = shape
    raw = {"nll": expected_nll, "residual": residual}
    return {name: gaussian_blur(np.asarray(raw[PART_SOURCES[name]]).reshape(-1, h, w), b) for name, b in blur.items()}


def anomaly_maps(
    expected_nll: np.ndarray,
    residual: np.ndarray | None,
    shape: tuple[int, int],
    block: dict[str, Any],
) -> FloatArray:
    """Anomaly maps (B, H, W) by the calibration block's definition, from each pixel's expected NLL (B, P) in
    nats and its residual (B, P) (`residual_maps` against `map_means`).

    A block with `parts` (MAP_DEFINITION, or TWO_PART_MAP_DEFINITION without residual_fine): the largest of
    its parts' surprises against the validation pixels. No part alone localises every defect: the NLL finds
    thin and colour defects (scratch pixel AUROC 0.985 on photo crops, colour spots 0.991) but reads a flat
    region as normal, and under the rows context predicts a flat defect's inside from the row above (missing
    regions 0.52 on grey photo crops, 0.86 on 8-bit MNIST); the smoothed residual finds regions (0.99 and 0.97)
    but not a colour spot the reconstruction copies (0.70), and spreads a thin line the unsmoothed residual
    keeps. A block without parts (versions calibrated before them): the expected NLL itself."""
    h, w = shape
    if "parts" not in block:
        return np.asarray(expected_nll, dtype=np.float64).reshape(-1, h, w)
    if residual is None:
        raise ValueError("this anomaly map's definition needs the residual part")
    blur = {name: float(part["blur_px"]) for name, part in block["parts"].items()}
    parts = map_parts(expected_nll, residual, shape, blur)
    tails = [MapPart.from_block(block["parts"][name]).surprise(parts[name]) for name in blur]
    return np.asarray(np.maximum.reduce(tails), dtype=np.float64)


def map_reconstructions(block: dict[str, Any]) -> int:
    """How many reconstructions (an encoder and a decoder row an image each) the block's map reads: 0 for the
    expected NLL alone, 1 for the residual against mu(x), 2 where the residual reads the refilled image's."""
    return 0 if "parts" not in block else 2 if "refit" in block else 1


def refilled_images(
    x: np.ndarray,
    expected_nll: np.ndarray,
    means: np.ndarray,
    shape: tuple[int, int],
    block: dict[str, Any],
    levels: int,
    channels: int,
) -> npt.NDArray[np.int64]:
    """Images x (B, D) with the pixels the first pass flags set to the block's refit fill: the first pass is
    the map read with the residual against `means` (E[x|z = mu(x)]) and refit's residual table, flagged above
    refit's threshold (REFIT_FPR of the validation pixels).

    Why: a reconstruction follows what it is shown, defects included (a white block on 8-bit MNIST, a scratch
    on the 8x8 digits), so the residual against mu(x) misses much of them. Encoding again with the flagged
    pixels replaced by the validation images' mean, the reconstruction no longer sees the defect's core and
    the residual against it lights more of the defect: missing regions on 8-bit MNIST from pixel AUROC /
    AUPRO 0.941 / 0.809 to 0.966 / 0.878 (K=100, 200 test images), and every other kind on the four default
    models better or within 0.004 (docs/quality.md)."""
    refit = block["refit"]
    first = {"parts": {"nll": block["parts"]["nll"], "residual": refit["residual"]}}
    first_map = anomaly_maps(expected_nll, residual_maps(x, means, levels, channels), shape, first)
    return _refilled(x, first_map > float(refit["threshold"]), refit["fill"], channels)


def _refilled(x: np.ndarray, flags: np.ndarray, fill: Any, channels: int) -> npt.NDArray[np.int64]:
    """Images x (B, D) with every value of the flagged pixels (B, H, W) set to fill (D,)."""
    flagged = np.repeat(flags.reshape(len(x), -1), channels, axis=1)
    return np.where(flagged, np.asarray(fill, dtype=np.int64), np.asarray(x, dtype=np.int64))


def map_means(
    x: np.ndarray,
    expected_nll: np.ndarray,
    reconstruct: Reconstruct,
    shape: tuple[int, int],
    block: dict[str, Any],
    levels: int,
    channels: int,
) -> np.ndarray | None:
    """The reconstruction (B, D) the map's residual part reads x against, by `reconstruct` (None where the
    block's map has no residual part): E[x|z = mu(x)], or with refit E[x|z = mu(x')] of the refilled images
    (`refilled_images`). The service's scheduler runs the same two steps as encode and decode jobs."""
    passes = map_reconstructions(block)
    if passes == 0:
        return None
    means = reconstruct(x)
    if passes == 2:
        means = reconstruct(refilled_images(x, expected_nll, means, shape, block, levels, channels))
    return means


def _subsample(values: np.ndarray, seed: int) -> FloatArray:
    v = np.asarray(values, dtype=np.float64).ravel()
    if len(v) > MAX_MAP_SAMPLES:  # quantiles of a seeded subsample: 200,000 values fix them to ~1e-3
        v = v[np.random.default_rng(seed).choice(len(v), MAX_MAP_SAMPLES, replace=False)]
    return v


def _part_block(smoothed: np.ndarray, blur_px: float) -> dict[str, Any]:
    return {"blur_px": blur_px, "n": int(smoothed.size), "quantiles": tail_table(smoothed)}


def map_calibration_block(
    expected_nll: np.ndarray,
    x: np.ndarray,
    reconstruct: Reconstruct,
    shape: tuple[int, int],
    levels: int,
    channels: int,
    k: int,
    seed: int,
) -> dict[str, Any]:
    """The manifest's calibration.anomaly_map from the validation images x (N, D) and their pixels' expected
    NLLs (N, P): the first pass's residual table and flag threshold (REFIT_FPR) and the fill (the images'
    mean, in levels); each final part's blur and tail table; then the quantiles of the maps they make and
    their thresholds at CALIBRATION_FPRS (a pixel's false-positive rate: the fraction of normal pixels above)."""
    e = np.asarray(expected_nll, dtype=np.float64)
    blur = map_blur(*shape)
    means = reconstruct(x)
    first_residual = residual_maps(x, means, levels, channels)
    smoothed = map_parts(e, first_residual, shape, {name: blur[name] for name in TWO_PARTS})
    nll_part = _part_block(smoothed["nll"], blur["nll"])
    first_part = _part_block(smoothed["residual"], blur["residual"])
    first = anomaly_maps(e, first_residual, shape, {"parts": {"nll": nll_part, "residual": first_part}})
    threshold = float(np.quantile(first, 1.0 - REFIT_FPR))
    fill = [int(v) for v in np.rint(np.asarray(x, dtype=np.float64).mean(0))]
    residual = residual_maps(x, reconstruct(_refilled(x, first > threshold, fill, channels)), levels, channels)
    final = map_parts(e, residual, shape, {name: blur[name] for name in MAP_PARTS if name != "nll"})
    block: dict[str, Any] = {
        "units": MAP_UNITS,
        "definition": MAP_DEFINITION,
        "parts": {"nll": nll_part, **{name: _part_block(v, blur[name]) for name, v in final.items()}},
        "refit": {"fpr": REFIT_FPR, "threshold": threshold, "residual": first_part, "fill": fill},
    }
    values = _subsample(anomaly_maps(e, residual, shape, block), seed)
    return {
        **block,
        "images": int(e.shape[0]),
        "K": k,
        "n": int(len(values)),
        "quantiles": quantile_table(values),
        "thresholds": {str(f): float(np.quantile(values, 1.0 - f)) for f in CALIBRATION_FPRS},
    }
