"""OOD scores and their calibration on the held-out validation split.

Every score is "higher = more anomalous"; the formulas live once in vae_contract.formulas (and in
prose in models/README.md); the service computes the same ones from the exported graphs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from training.evaluate import log_likelihood
from training.model import VAE
from vae_contract.formulas import bits_per_dim, calibration_block

DEFAULT_FPR = 0.01


def nll_bits_per_dim(model: VAE, x: np.ndarray, k: int, seed: int, progress: str | None = None) -> np.ndarray:
    """Importance-sampled NLL in bits/dim of images x (N, D), K = k."""
    ll = log_likelihood(model, torch.from_numpy(x.astype(np.int64)), k, seed=seed, progress=progress).numpy()
    return bits_per_dim(-ll, x.shape[1])


def calibrate(
    model: VAE,
    x_val: np.ndarray,
    k: int = 1000,
    seed: int = 0,
    default_score: str = "combined",
    progress: bool = False,
) -> dict[str, Any]:
    """The manifest's calibration block: each score's distribution on the validation split."""
    nll = nll_bits_per_dim(model, x_val, k, seed, progress=f"calibration (K={k})" if progress else None)
    return {
        "split": "val",
        "images": int(len(x_val)),
        "K": k,
        "seed": seed,
        "default_score": default_score,
        "default_fpr": DEFAULT_FPR,
        **calibration_block(nll, x_val),
    }
