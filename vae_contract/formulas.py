"""Every formula of the model-repository contract, written once (see models/README.md).

Units: log-likelihoods in nats; `bits_per_dim` converts; OOD scores carry the units in SCORE_UNITS.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

LN2 = math.log(2.0)
FloatArray = npt.NDArray[np.float64]

# --- grey levels ------------------------------------------------------------------------------


def requantize(images: np.ndarray, levels_in: int, levels_out: int) -> npt.NDArray[np.uint8]:
    """Grey levels [0, levels_in) -> the nearest level of [0, levels_out) on the [0, 1] scale:
    floor(x (levels_out - 1) / (levels_in - 1) + 1/2)."""
    if levels_in == levels_out:
        return images.astype(np.uint8)
    out = np.floor(images.astype(np.float64) * (levels_out - 1) / (levels_in - 1) + 0.5)
    return out.astype(np.uint8)


def pixels_to_levels(pixels: np.ndarray, levels: int) -> npt.NDArray[np.int64]:
    """8-bit pixels -> the model's grey levels (the nearest one); exact inverse of `levels_to_pixels`."""
    return np.floor(pixels.astype(np.float64) * (levels - 1) / 255.0 + 0.5).astype(np.int64)


def levels_to_pixels(images: np.ndarray, levels: int) -> npt.NDArray[np.uint8]:
    """Grey levels -> 8-bit pixels, floor(l 255 / (levels - 1) + 1/2)."""
    return np.floor(images.astype(np.float64) * 255.0 / (levels - 1) + 0.5).astype(np.uint8)


def rgb_to_grey(pixels: np.ndarray) -> npt.NDArray[np.uint8]:
    """8-bit RGB (..., 3) -> 8-bit grey (...), ITU-R 601-2 luma exactly as Pillow's convert("L") rounds it,
    so arrays converted in training and files converted by the service give the same levels."""
    rgb = pixels.astype(np.uint32)
    return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


PARITY_ABS_NATS = 1e-3
PARITY_REL = 2e-6


def fp32_parity_tolerance(log_likelihood_nats: np.ndarray | float) -> FloatArray:
    """How far two fp32 computations of the same log-likelihood may differ, in nats, per image.

    1e-3 nats plus 2e-6 of its magnitude: summing D per-pixel terms in another order (other kernels,
    threads or batch sizes) moves the total by a few fp32 ulps of it, and an 8-bit 28x28 image has a
    log-likelihood of thousands of nats, where one ulp alone is 2.4e-4.
    """
    return PARITY_ABS_NATS + PARITY_REL * np.abs(np.asarray(log_likelihood_nats, dtype=np.float64))


def bits_per_dim(nats: Any, dim: int) -> Any:
    """Nats per image -> bits per dimension (pixel)."""
    return nats / (dim * LN2)


# --- importance sampling ----------------------------------------------------------------------


NOISE_BLOCK = 250  # samples per independently seeded block of importance noise
# blocks of noise kept for reuse: K=32,000 of one seed, or K=10,000 of three; at most 128 x 250 x latent_dim
# float32 (2 MB at the default latent_dim of 16)
NOISE_CACHE_BLOCKS = 128
# the largest integer every JSON parser reads exactly (a float64 holds it), so the schema's bound means what it says
MAX_SEED = 2**53 - 1


def importance_noise(seed: int, k: int, latent_dim: int, start: int = 0) -> npt.NDArray[np.float32]:
    """The standard-normal noise eps of samples [start, start + k) of one image's importance samples.

    Sample i comes from block i // NOISE_BLOCK, drawn by numpy's default_rng([seed, block]); `start`
    must be a multiple of NOISE_BLOCK. The noise depends on the seed and the sample index only, never
    on the image's position or the other images of a request, so an image's score is the same alone,
    in a batch, or batched by the server, and chunks of K can be drawn one at a time.
    """
    if seed < 0 or start % NOISE_BLOCK:
        raise ValueError("seed must be >= 0 and start a multiple of NOISE_BLOCK")
    first, last = start // NOISE_BLOCK, (start + k - 1) // NOISE_BLOCK
    blocks = [_noise_block(seed, b, latent_dim) for b in range(first, last + 1)]
    return np.concatenate(blocks)[:k] if k > 0 else np.zeros((0, latent_dim), np.float32)


@functools.lru_cache(maxsize=NOISE_CACHE_BLOCKS)
def _noise_block(seed: int, block: int, latent_dim: int) -> npt.NDArray[np.float32]:
    """One block of noise, kept for the next image with the same seed (most requests use the default seed):
    drawing K=1000's four blocks took ~280 us an image, ~3% of scoring one on digits; from the cache ~18 us."""
    out = np.random.default_rng([seed, block]).standard_normal((NOISE_BLOCK, latent_dim), dtype=np.float32)
    out.flags.writeable = False  # shared by every caller: importance_noise hands out copies
    return out


def _logsumexp0(a: FloatArray) -> FloatArray:
    m = a.max(axis=0)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.asarray(m + np.log(np.exp(a - m).sum(axis=0)))


@dataclass
class ImportanceAccumulator:
    """Combines log importance weights log_w (chunk, B), chunk after chunk, in float64.

    log p(x) ~ log (1/K) sum_k w_k (the IWAE estimate); ELBO = mean_k log w_k;
    ESS = (sum w)^2 / sum w^2, in [1, K].
    """

    lse: FloatArray
    lse2: FloatArray
    total: FloatArray
    k: int = 0

    @classmethod
    def empty(cls, batch: int) -> ImportanceAccumulator:
        return cls(np.full(batch, -np.inf), np.full(batch, -np.inf), np.zeros(batch))

    def add(self, log_w: np.ndarray) -> None:
        lw = np.asarray(log_w, dtype=np.float64)
        self.lse = np.logaddexp(self.lse, _logsumexp0(lw))
        self.lse2 = np.logaddexp(self.lse2, _logsumexp0(2.0 * lw))
        self.total = self.total + lw.sum(axis=0)
        self.k += lw.shape[0]

    def log_likelihood(self) -> FloatArray:
        return self.lse - math.log(self.k)

    def elbo(self) -> FloatArray:
        return self.total / self.k

    def ess(self) -> FloatArray:
        return np.asarray(np.exp(2.0 * self.lse - self.lse2))


@dataclass
class PixelNllAccumulator:
    """Each pixel's expected NLL under the posterior, E_p(z|x)[-log p(x_p|z)], chunk after chunk, in float64.

    Estimated with the self-normalised importance weights of the score's own samples:
    sum_k w_k (-log p(x_p|z_k)) / sum_k w_k, w_k = exp(log_w_k) (the weights the NLL sums). Kept as
    sums scaled by exp(-m), m the largest log_w so far, so that no weight overflows.
    """

    log_scale: FloatArray  # (B,)
    weight: FloatArray  # (B,)
    nll: FloatArray  # (B, P)

    @classmethod
    def empty(cls, batch: int, pixels: int) -> PixelNllAccumulator:
        return cls(np.full(batch, -np.inf), np.zeros(batch), np.zeros((batch, pixels)))

    def add(self, log_w: np.ndarray, pixel_log_px: np.ndarray) -> None:
        """log_w (n, B) and per-pixel log p(x_p|z) (n, B, P) of n more samples."""
        lw = np.asarray(log_w, dtype=np.float64)
        scale = np.maximum(self.log_scale, lw.max(axis=0))
        old = np.where(np.isfinite(self.log_scale), np.exp(self.log_scale - scale), 0.0)
        w = np.exp(lw - scale)  # (n, B)
        self.weight = self.weight * old + w.sum(axis=0)
        self.nll = self.nll * old[:, None] - np.einsum("kb,kbp->bp", w, np.asarray(pixel_log_px, dtype=np.float64))
        self.log_scale = scale

    def expected_nll(self) -> FloatArray:
        return self.nll / self.weight[:, None]


# --- OOD scores -------------------------------------------------------------------------------

SCORE_NAMES = ("nll_bpd", "complexity", "typicality", "combined", "llr", "elbo_gap", "dose")
SCORE_UNITS = {
    "nll_bpd": "bits/dim",
    "complexity": "bits/dim",
    "typicality": "bits/dim",
    "combined": "std units",
    "llr": "bits/dim",
    "elbo_gap": "bits/dim",
    "dose": "nats (-sum log p-value)",
}
COMBINED_PARTS = ("nll_bpd", "complexity")
LLR_SCORE = "llr"
ELBO_GAP_SCORE = "elbo_gap"
#: the statistics the dose score combines, where calibrated; "llr" joins them on models of several latent layers.
#: elbo_gap sees what complexity misses: images the encoder was never shown get a posterior far from the true
#: one; nll_bpd's upper tail, the plain "too unlikely" test, sees images that are foreign yet as complex as
#: the data (shuffled pixels). Photo-crop models, 1 layer, K=100 (docs/quality.md): complexity alone left
#: smooth blobs at 0.750 (grey) and shuffled 8-bit MNIST digits at 0.613; with these parts every simple set
#: is >= 0.99 and shuffled crops 0.976-0.983. nll_bpd enters by its upper tail only: both tails lowered every
#: AUROC they moved (smooth blobs 0.750 -> 0.599), as a simple image's high likelihood is complexity's job.
DOSE_PARTS = ("nll_bpd", "complexity", ELBO_GAP_SCORE)
#: dose's parts in calibrations that do not record them (written before elbo_gap joined)
LEGACY_DOSE_PARTS = ("complexity",)
#: the scores every version gives, calibrated or not (`raw_scores`); the others only where calibrated
ALWAYS_SCORES = ("nll_bpd", "complexity")
ZLIB_RAW = "zlib level 9 on the raw grey-level bytes (8 bits per pixel)"
PNG_FILTERS = (
    "zlib level 9 on the grey-level bytes under the best of PNG's five filters (none, sub, up, average, Paeth; "
    "one filter for the whole image, each channel predicted from its own neighbours)"
)
#: the coder whose length `complexity` subtracts, as calibrations name it; new calibrations use COMPRESSOR
COMPRESSOR = PNG_FILTERS
CALIBRATION_FPRS = (0.01, 0.05)
MAX_QUANTILES = 1001  # store every calibration score up to this many, else this many quantiles


def _as_images(x: np.ndarray) -> np.ndarray:
    """(N, H, W, C) from images given as (N, H, W, C), (N, H, W) or flat rows (N, D), a row read as 1 x D x 1."""
    x = np.asarray(x)
    if x.ndim == 2:
        return x.reshape(len(x), 1, -1, 1)
    return x[..., None] if x.ndim == 3 else x


def _png_filter_residuals(img: np.ndarray) -> list[bytes]:
    """An image (H, W, C)'s bytes under PNG's filters 0-4, each applied to every row: the value less its
    prediction from the left (a), upper (b) and upper-left (c) neighbour of the same channel, modulo 256."""
    x = img.astype(np.int16)
    a, b, c = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    a[:, 1:], b[1:], c[1:, 1:] = x[:, :-1], x[:-1], x[:-1, :-1]
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    return [((x - pred) % 256).astype(np.uint8).tobytes() for pred in (np.zeros_like(x), a, b, (a + b) // 2, paeth)]


def _zlib_raw_bits(img: np.ndarray) -> int:
    return 8 * len(zlib.compress(img.astype(np.uint8).tobytes(), 9))


def _png_filter_bits(img: np.ndarray) -> int:
    return 8 * min(len(zlib.compress(r, 9)) for r in _png_filter_residuals(img))


COMPRESSORS: dict[str, Callable[[np.ndarray], int]] = {ZLIB_RAW: _zlib_raw_bits, PNG_FILTERS: _png_filter_bits}


def compressed_bits(x: np.ndarray, compressor: str = COMPRESSOR) -> FloatArray:
    """Length in bits of each image of grey levels (N, H, W, C), (N, H, W) or (N, D) (a row) under a coder of
    COMPRESSORS. PNG_FILTERS (the default since its calibrations) codes smooth and predictable images the
    way PNG does, so that their complexity is not overstated: raw zlib sees a smooth gradient as many
    different bytes (photo crops, 1 layer: `complexity`'s AUROC on smooth blobs 0.215 with zlib, 1.000
    with the filters; validation r(NLL, coder's bits/dim) 0.937 -> 0.971)."""
    if compressor not in COMPRESSORS:
        raise ValueError(f"unknown compressor {compressor!r}; known: {list(COMPRESSORS)}")
    code = COMPRESSORS[compressor]
    return np.array([code(img) for img in _as_images(x)], dtype=np.float64)


def llr_bits_per_dim(log_likelihood: np.ndarray, log_likelihood_llr: np.ndarray, dim: int) -> FloatArray:
    """LLR>k in bits/dim (Havtorn et al. 2021): log p(x) - log p>k(x), both importance-sampled with the same
    K and noise, p>k with the bottom k latent layers drawn from their conditional priors. In-distribution
    images keep most of their likelihood when only the top layers see them; images whose likelihood comes
    from low-level statistics (simple images, other domains) lose more: higher = more anomalous."""
    diff = np.asarray(log_likelihood, np.float64) - np.asarray(log_likelihood_llr, np.float64)
    return np.asarray(bits_per_dim(diff, dim), dtype=np.float64)


def elbo_gap_bits_per_dim(log_likelihood: np.ndarray, elbo: np.ndarray, dim: int) -> FloatArray:
    """log p(x) - ELBO in bits/dim, both from the same K importance samples (nats in): how far the encoder's
    posterior q(z|x) is from the model's own p(z|x) on this image (the IWAE bound's gain over the ELBO). An
    encoder is accurate on images like its training data and can be far off on others, whatever their
    likelihood: higher = more anomalous. It grows with K (by at most log K nats), so compare it at the
    calibration's K."""
    gap = np.asarray(log_likelihood, np.float64) - np.asarray(elbo, np.float64)
    return np.asarray(bits_per_dim(gap, dim), dtype=np.float64)


def raw_scores(
    nll_bpd: np.ndarray,
    x: np.ndarray,
    llr_bpd: np.ndarray | None = None,
    elbo_gap_bpd: np.ndarray | None = None,
    compressor: str = COMPRESSOR,
) -> dict[str, FloatArray]:
    """The scores that need no calibration of images x ((N, H, W, C), or rows as `compressed_bits` reads
    them): nll_bpd, complexity (Serra et al., 2020) under `compressor` and, where given, llr (the LLR>k of a
    model of several latent layers) and elbo_gap."""
    nll = np.asarray(nll_bpd, dtype=np.float64)
    dim = int(np.prod(np.shape(x)[1:]))
    scores = {"nll_bpd": nll, "complexity": nll - compressed_bits(x, compressor) / dim}
    if llr_bpd is not None:
        scores[LLR_SCORE] = np.asarray(llr_bpd, dtype=np.float64)
    if elbo_gap_bpd is not None:
        scores[ELBO_GAP_SCORE] = np.asarray(elbo_gap_bpd, dtype=np.float64)
    return scores


def scores_from_nll(
    nll_bpd: np.ndarray,
    x: np.ndarray,
    typical_center: float,
    standardize: dict[str, list[float]],
    llr_bpd: np.ndarray | None = None,
    tables: dict[str, Any] | None = None,
    elbo_gap_bpd: np.ndarray | None = None,
    compressor: str = COMPRESSOR,
) -> dict[str, FloatArray]:
    """Every score of images x (N, H, W, C) that the statistics allow, given their NLL in bits/dim (and LLR>k
    and log p(x) - ELBO, bits/dim), the validation statistics, the calibration's compressor and, for dose,
    the validation score tables (calibration["scores"])."""
    scores = raw_scores(nll_bpd, x, llr_bpd, elbo_gap_bpd, compressor)
    scores["typicality"] = np.abs(scores["nll_bpd"] - typical_center)
    z = [(scores[name] - standardize[name][0]) / standardize[name][1] for name in COMBINED_PARTS]
    scores["combined"] = np.maximum.reduce(z)
    parts = calibrated_dose_parts(tables or {})
    if tables is not None and parts and all(p in scores and p in tables for p in parts):
        scores["dose"] = dose_scores(scores, tables, parts)
    return scores


def calibrated_dose_parts(tables: dict[str, Any]) -> tuple[str, ...]:
    """The parts of a calibrated dose (its block's "parts"; LEGACY_DOSE_PARTS and llr where the block names
    none); () where dose is not calibrated."""
    block = tables.get("dose")
    if block is None:
        return ()
    recorded = block.get("parts")
    return tuple(recorded) if recorded else LEGACY_DOSE_PARTS + ((LLR_SCORE,) if LLR_SCORE in tables else ())


def dose_parts(scores: dict[str, Any]) -> tuple[str, ...]:
    """The statistics dose combines for a model, as calibrated: those of DOSE_PARTS (nll_bpd, complexity,
    elbo_gap) and llr that the model gives."""
    return tuple(p for p in (*DOSE_PARTS, LLR_SCORE) if p in scores)


def _tail_log_p(values: np.ndarray, table: dict[str, Any], two_sided: bool) -> FloatArray:
    cal = ScoreCalibration.from_block("", table)
    probs, tab = cal.probs, cal.values
    v = np.asarray(values, np.float64)
    cdf = np.interp(v, tab, probs)
    tail = 2.0 * np.minimum(cdf, 1.0 - cdf) if two_sided else 1.0 - cdf
    log_p = np.log(np.clip(tail, 1.0 / (cal.n + 1), 1.0))
    spread = max(float(np.interp(0.99, probs, tab) - np.interp(0.01, probs, tab)) / 4.65, 1e-12)
    beyond = np.maximum(v - tab[-1], 0.0) + (np.maximum(tab[0] - v, 0.0) if two_sided else 0.0)
    return np.asarray(log_p - beyond / spread)


def two_sided_log_p(values: np.ndarray, table: dict[str, Any]) -> FloatArray:
    """log of the two-sided tail p-value of each value under one statistic's validation quantile table:
    p = min(1, 2 min(F(s), 1 - F(s))), F read off the table, floored at 1 / (n + 1) inside the table's range;
    beyond its ends the floor decays as exp(-distance / spread), spread the table's central 98% width over
    4.65 (a normal's sigma), so far-off images still rank by how far off they are."""
    return _tail_log_p(values, table, two_sided=True)


def upper_tail_log_p(values: np.ndarray, table: dict[str, Any]) -> FloatArray:
    """`two_sided_log_p` with the upper tail only: p = 1 - F(s), for a statistic whose low values are no sign
    of an anomaly (UPPER_TAIL_PARTS)."""
    return _tail_log_p(values, table, two_sided=False)


#: dose's parts whose low values are no sign of an anomaly, their upper tail only: an encoder more accurate
#: than usual, an image more likely than usual (complexity judges whether it is too simple)
UPPER_TAIL_PARTS = ("nll_bpd", ELBO_GAP_SCORE)


def dose_scores(scores: dict[str, FloatArray], tables: dict[str, Any], parts: tuple[str, ...]) -> FloatArray:
    """DoSE-style score (Morningstar et al. 2021), with empirical tails in place of kernel densities: the sum
    over the model's statistics (`parts`: nll_bpd, complexity, elbo_gap, and llr) of -log of each one's tail p-value
    against its validation distribution (Fisher's combination, halved): both tails, but the upper one only
    for UPPER_TAIL_PARTS. An image is flagged when any statistic is atypical: too simple for the model as
    much as too complex."""
    return np.asarray(
        -sum((upper_tail_log_p if p in UPPER_TAIL_PARTS else two_sided_log_p)(scores[p], tables[p]) for p in parts),
        dtype=np.float64,
    )


def validation_statistics(nll_bpd: np.ndarray, x: np.ndarray) -> tuple[float, dict[str, list[float]]]:
    """The typicality center and the (mean, std) of each part of the combined score, on validation data."""
    parts = raw_scores(nll_bpd, x)
    center = float(parts["nll_bpd"].mean())
    return center, {k: [float(parts[k].mean()), float(parts[k].std() + 1e-12)] for k in COMBINED_PARTS}


def quantile_table(scores: np.ndarray) -> dict[str, list[float]]:
    """Every score sorted (probs i/(n-1)) when n <= MAX_QUANTILES, else MAX_QUANTILES evenly spaced quantiles."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) <= MAX_QUANTILES:
        probs, values = np.linspace(0.0, 1.0, len(s)), s
    else:
        probs = np.linspace(0.0, 1.0, MAX_QUANTILES)
        values = np.quantile(s, probs)
    return {"probs": [round(float(p), 8) for p in probs], "values": [float(v) for v in values]}


@dataclass(frozen=True)
class ScoreCalibration:
    """One score's distribution on the validation split, as the manifest's quantile table.

    threshold(fpr) = Q(1 - fpr), Q the linear interpolation of the table (numpy's default quantile
    when the table holds every score); p_value(s) = (1 + #{calibration scores >= s}) / (n + 1), the
    count read off the table as n (1 - F(s)) when the table is a summary.
    """

    name: str
    units: str
    n: int
    probs: FloatArray  # ascending in [0, 1]
    values: FloatArray  # ascending

    @classmethod
    def from_block(cls, name: str, block: dict[str, Any]) -> ScoreCalibration:
        q = block["quantiles"]
        probs, values = np.asarray(q["probs"], float), np.asarray(q["values"], float)
        return cls(name, block["units"], int(block["n"]), probs, values)

    def threshold(self, fpr: float) -> float:
        return float(np.interp(1.0 - fpr, self.probs, self.values))

    def exceed_count(self, scores: np.ndarray) -> FloatArray:
        """#{calibration scores >= s} for each s."""
        if len(self.values) == self.n:  # every score is stored: count exactly
            return np.asarray(self.n - np.searchsorted(self.values, scores, side="left"), dtype=np.float64)
        cdf = np.interp(scores, self.values, self.probs, left=0.0, right=1.0)
        return np.asarray(np.rint(self.n * (1.0 - cdf)))

    def p_values(self, scores: np.ndarray) -> FloatArray:
        return (1.0 + self.exceed_count(np.asarray(scores, float))) / (self.n + 1.0)


def score_block(name: str, values: np.ndarray) -> dict[str, Any]:
    """One score's calibration: its units, the validation images' quantile table and thresholds."""
    return {
        "units": SCORE_UNITS[name],
        "n": int(len(values)),
        "quantiles": quantile_table(values),
        "thresholds": {str(f): float(np.quantile(values, 1.0 - f)) for f in CALIBRATION_FPRS},
    }


def calibration_block(
    nll_bpd: np.ndarray, x: np.ndarray, llr_bpd: np.ndarray | None = None, elbo_gap_bpd: np.ndarray | None = None
) -> dict[str, Any]:
    """The per-score part of the manifest's calibration block, from validation NLLs (and LLR>k and
    log p(x) - ELBO), bits/dim.

    dose reads the tables of its parts, which its block names, so it is calibrated after them, on the same
    images (each image's own value is in the tables it is scored against: its p-values lean high by at most
    1 / n)."""
    center, standardize = validation_statistics(nll_bpd, x)
    table = scores_from_nll(nll_bpd, x, center, standardize, llr_bpd, elbo_gap_bpd=elbo_gap_bpd)
    scores = {name: score_block(name, values) for name, values in table.items()}
    parts = dose_parts(table)
    scores["dose"] = {**score_block("dose", dose_scores(table, scores, parts)), "parts": list(parts)}
    return {"typicality_center_bpd": center, "standardize": standardize, "compressor": COMPRESSOR, "scores": scores}


def needs_llr(name: str, calibration: dict[str, Any]) -> bool:
    """Whether a score needs LLR>k (the llr_log_weights graph): llr, and dose where llr is one of its parts."""
    return name == LLR_SCORE or (name == "dose" and LLR_SCORE in calibrated_dose_parts(calibration.get("scores") or {}))


# --- images from per-pixel distributions -------------------------------------------------------


def expected_values(probs: np.ndarray) -> FloatArray:
    """E[x] of each value from its per-level probabilities (B, D, levels) -> (B, D), in levels."""
    return np.asarray(probs @ np.arange(probs.shape[-1], dtype=probs.dtype), dtype=np.float64)


DECODE_MODES = ("mean", "mode", "sample")


def images_from_probs(probs: np.ndarray, mode: str, rng: np.random.Generator | None = None) -> npt.NDArray[np.int64]:
    """Per-pixel distributions (B, D, levels) -> integer images (B, D).

    mean: the expected grey level, rounded; mode: the most likely level; sample: one seeded draw per
    pixel (independent pixels: noisy, but an exact sample of the model).
    """
    levels = probs.shape[-1]
    if mode == "mean":
        return np.rint(probs @ np.arange(levels, dtype=probs.dtype)).astype(np.int64)
    if mode == "sample":
        if rng is None:
            raise ValueError("mode 'sample' needs a random generator")
        u = rng.random(probs.shape[:-1] + (1,))
        cdf = np.cumsum(probs, axis=-1)
        return np.minimum((cdf < u * cdf[..., -1:]).sum(-1), levels - 1).astype(np.int64)
    if mode == "mode":
        return probs.argmax(-1).astype(np.int64)
    raise ValueError(f"unknown decode mode {mode!r}; choose one of {DECODE_MODES}")
