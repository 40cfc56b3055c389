"""OOD scores and their calibration on the held-out validation split.

Every score is "higher = more anomalous"; the formulas are the contract in models/README.md and the
service computes the same ones from the exported graphs:
  nll_bpd      NLL in bits/dim, -log2 p(x) / D, importance-sampled with K samples.
  complexity   NLL in bits/dim minus the image's length under a generic lossless compressor, in
               bits/dim: (-log2 p(x) - 8 len(deflate(x))) / D, deflate = zlib level 9 on the raw
               grey-level bytes (the compressor inside PNG). Serra et al. (2020).
  typicality   |NLL bits/dim - c|, c the mean NLL bits/dim of the validation split: flags images
               that are less likely *and* images that are more likely than typical data
               (a one-image version of Nalisnick et al.'s 2019 typicality test).
  combined     max over {nll_bpd, complexity} of (score - mean) / std, mean and std of that score on
               the validation split (unitless, "std units"): an image is as anomalous as the worse
               of the two says, so it catches both simple images (complexity) and unlikely ones (NLL).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import torch

from training.evaluate import log_likelihood
from training.model import VAE

SCORE_UNITS = {"nll_bpd": "bits/dim", "complexity": "bits/dim", "typicality": "bits/dim", "combined": "std units"}
COMBINED_PARTS = ("nll_bpd", "complexity")
CALIBRATION_FPRS = (0.01, 0.05)
MAX_QUANTILES = 1001  # store every calibration score up to this many, else this many quantiles


def compressed_bits(x: np.ndarray) -> np.ndarray:
    """Length in bits of each image (N, D) of grey levels under zlib level 9 of its raw bytes."""
    return np.array([8 * len(zlib.compress(row.astype(np.uint8).tobytes(), 9)) for row in x], dtype=np.float64)


def nll_bits_per_dim(model: VAE, x: np.ndarray, k: int, seed: int) -> np.ndarray:
    ll = log_likelihood(model, torch.from_numpy(x.astype(np.int64)), k, seed=seed).numpy()
    return -ll / (x.shape[1] * math.log(2.0))


def scores_from_nll(
    nll_bpd: np.ndarray, x: np.ndarray, typical_center: float, standardize: dict[str, list[float]]
) -> dict[str, np.ndarray]:
    """Every score, given each image's NLL in bits/dim and the validation statistics."""
    scores = {
        "nll_bpd": nll_bpd,
        "complexity": nll_bpd - compressed_bits(x) / x.shape[1],
        "typicality": np.abs(nll_bpd - typical_center),
    }
    z = [(scores[name] - standardize[name][0]) / standardize[name][1] for name in COMBINED_PARTS]
    scores["combined"] = np.maximum.reduce(z)
    return scores


def validation_statistics(nll_bpd: np.ndarray, x: np.ndarray) -> tuple[float, dict[str, list[float]]]:
    """The typicality center and the (mean, std) of each part of the combined score, on validation data."""
    complexity = nll_bpd - compressed_bits(x) / x.shape[1]
    parts = {"nll_bpd": nll_bpd, "complexity": complexity}
    return float(nll_bpd.mean()), {k: [float(v.mean()), float(v.std() + 1e-12)] for k, v in parts.items()}


def quantile_table(scores: np.ndarray) -> dict[str, list[float]]:
    """Every score sorted (probs i/(n-1)) when n <= MAX_QUANTILES, else MAX_QUANTILES evenly spaced quantiles."""
    s = np.sort(scores)
    if len(s) <= MAX_QUANTILES:
        probs = np.linspace(0.0, 1.0, len(s))
        values = s
    else:
        probs = np.linspace(0.0, 1.0, MAX_QUANTILES)
        values = np.quantile(s, probs)
    return {"probs": [round(float(p), 8) for p in probs], "values": [float(v) for v in values]}


def calibrate(
    model: VAE, x_val: np.ndarray, k: int = 1000, seed: int = 0, default_score: str = "combined"
) -> dict[str, Any]:
    """The manifest's calibration block: each score's distribution on the validation split."""
    nll = nll_bits_per_dim(model, x_val, k, seed)
    center, standardize = validation_statistics(nll, x_val)
    table = scores_from_nll(nll, x_val, center, standardize)
    scores = {}
    for name, values in table.items():
        scores[name] = {
            "units": SCORE_UNITS[name],
            "n": int(len(values)),
            "quantiles": quantile_table(values),
            "thresholds": {str(f): float(np.quantile(values, 1.0 - f)) for f in CALIBRATION_FPRS},
        }
    return {
        "split": "val",
        "images": int(len(x_val)),
        "K": k,
        "seed": seed,
        "default_score": default_score,
        "default_fpr": 0.01,
        "typicality_center_bpd": center,
        "standardize": standardize,
        "compressor": "zlib level 9 on the raw grey-level bytes (8 bits per pixel)",
        "scores": scores,
    }
