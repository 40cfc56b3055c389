"""/score: importance-sampled likelihood plus the OOD score, threshold, p-value and flag.

Each OOD score is a function of the importance statistics and the images; its formula and units are
in models/README.md. Higher always means more anomalous.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from service.calibration import ScoreCalibration
from service.errors import APIError
from service.repository import ModelVersion
from service.runtime import ImportanceStats, ModelRuntime

ScoreFn = Callable[[ModelRuntime, np.ndarray, ImportanceStats], np.ndarray]


def nll_bits_per_dim(rt: ModelRuntime, x: np.ndarray, st: ImportanceStats) -> np.ndarray:
    return rt.bits_per_dim(-st.log_likelihood)


#: name -> (function, units). The manifest's calibration block says which of these a model calibrated.
SCORES: dict[str, tuple[ScoreFn, str]] = {
    "nll_bpd": (nll_bits_per_dim, "bits/dim"),
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
    values = fn(rt, x, stats)
    cal = ScoreCalibration.from_manifest(name, calibrated[name]) if name in calibrated else None
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
