"""/score: importance-sampled likelihood plus the OOD score, threshold, p-value and flag.

Each OOD score is a function of the importance statistics and the images; its formula and units are
in models/README.md. Higher always means more anomalous.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from service.errors import APIError
from service.repository import ModelVersion
from service.runtime import ImportanceStats, ModelRuntime

ScoreFn = Callable[[ModelRuntime, np.ndarray, ImportanceStats, dict[str, Any]], np.ndarray]


def nll_bits_per_dim(rt: ModelRuntime, x: np.ndarray, st: ImportanceStats, calib: dict[str, Any]) -> np.ndarray:
    return rt.bits_per_dim(-st.log_likelihood)


def compressed_bits(x: np.ndarray) -> np.ndarray:
    """Bits of each image (B, D) under zlib level 9 of its raw grey-level bytes (the contract's compressor)."""
    return np.array([8 * len(zlib.compress(row.astype(np.uint8).tobytes(), 9)) for row in x], dtype=np.float64)


def complexity_corrected(rt: ModelRuntime, x: np.ndarray, st: ImportanceStats, calib: dict[str, Any]) -> np.ndarray:
    return nll_bits_per_dim(rt, x, st, calib) - compressed_bits(x) / rt.dim


def typicality(rt: ModelRuntime, x: np.ndarray, st: ImportanceStats, calib: dict[str, Any]) -> np.ndarray:
    if "typicality_center_bpd" not in calib:
        raise APIError(422, "uncalibrated_score", "the typicality score needs a calibrated model", "score")
    return np.abs(nll_bits_per_dim(rt, x, st, calib) - calib["typicality_center_bpd"])


def combined(rt: ModelRuntime, x: np.ndarray, st: ImportanceStats, calib: dict[str, Any]) -> np.ndarray:
    if "standardize" not in calib:
        raise APIError(422, "uncalibrated_score", "the combined score needs a calibrated model", "score")
    parts = {"nll_bpd": nll_bits_per_dim, "complexity": complexity_corrected}
    z = [
        (fn(rt, x, st, calib) - calib["standardize"][name][0]) / calib["standardize"][name][1]
        for name, fn in parts.items()
    ]
    return np.maximum.reduce(z)


#: name -> (function, units). The manifest's calibration block says which of these a model calibrated.
SCORES: dict[str, tuple[ScoreFn, str]] = {
    "nll_bpd": (nll_bits_per_dim, "bits/dim"),
    "complexity": (complexity_corrected, "bits/dim"),
    "typicality": (typicality, "bits/dim"),
    "combined": (combined, "std units"),
}
DEFAULT_FPR = 0.01


def score_images(
    mv: ModelVersion, x: np.ndarray, k: int, seed: int, score: str | None, fpr: float | None, chunk_elements: int
) -> dict[str, Any]:
    """The /score response body for images x (B, D)."""
    rt = mv.runtime
    calib = mv.manifest.get("calibration") or {}
    calibrated = calib.get("scores", {})
    name = score or calib.get("default_score") or "nll_bpd"
    if name not in SCORES:
        raise APIError(422, "unknown_score", f"unknown score {name!r}; choose one of {sorted(SCORES)}", "score")
    if score is not None and calibrated and name not in calibrated:
        raise APIError(
            422,
            "uncalibrated_score",
            f"model {mv.name}/{mv.version} has no calibration for score {name!r} (calibrated: {sorted(calibrated)})",
            "score",
        )
    fpr = fpr if fpr is not None else calib.get("default_fpr", DEFAULT_FPR)
    stats = rt.importance_stats(x, k, seed, chunk_elements)
    fn, units = SCORES[name]
    values = fn(rt, x, stats, calib)
    cal = mv.calibrations.get(name)
    threshold = cal.threshold(fpr) if cal else None
    p_values = cal.p_values(values) if cal else [None] * len(x)
    nll = -stats.log_likelihood
    results = []
    for i in range(len(x)):
        results.append(
            {
                "log_likelihood_nats": float(stats.log_likelihood[i]),
                "nll_nats": float(nll[i]),
                "nll_bits_per_dim": float(nll[i] / (rt.dim * math.log(2.0))),
                "elbo_nats": float(stats.elbo[i]),
                "ess": float(stats.ess[i]),
                "score": float(values[i]),
                "threshold": threshold,
                "p_value": None if p_values[i] is None else float(p_values[i]),
                "is_ood": None if cal is None else bool(values[i] > threshold),
            }
        )
    return {
        "model": mv.name,
        "version": mv.version,
        "num_samples": k,
        "seed": seed,
        "score_name": name,
        "score_units": units,
        "fpr": fpr if cal else None,
        "results": results,
    }
