"""OOD scores and their calibration on the held-out validation split.

Every score is "higher = more anomalous"; the formulas live once in vae_contract.formulas (and in
prose in models/README.md); the service computes the same ones from the exported graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.evaluate import Processes, expected_images, importance_pass, llr_log_likelihoods
from training.model import VAE
from vae_contract.formulas import (
    bits_per_dim,
    calibration_block,
    compressed_bits,
    elbo_gap_bits_per_dim,
    llr_bits_per_dim,
    scores_from_nll,
)
from vae_contract.maps import anomaly_maps, map_calibration_block, map_means, residual_maps

DEFAULT_FPR = 0.01


@dataclass(frozen=True)
class ImageStatistics:
    """What the scores of images (N, D) are made of, at one K: NLL, log p(x) - ELBO and LLR>k (None for a
    one-layer model) in bits/dim, and where asked for the anomaly map's nll part: each pixel's expected NLL
    in nats (N, H*W)."""

    nll_bpd: np.ndarray
    elbo_gap_bpd: np.ndarray
    llr_bpd: np.ndarray | None
    expected_nll: np.ndarray | None = None

    def anomaly_maps(self, model: VAE, x: np.ndarray, block: dict[str, Any]) -> np.ndarray:
        """The anomaly maps (N, H, W) of the images x (N, D) these are the statistics of, by the calibration
        block's definition (vae_contract.maps), their residual part read off the model's reconstructions."""
        assert self.expected_nll is not None, "computed without maps=True"
        shape, levels, channels = map_shape(model), model.levels, model.decoder.channels
        means = map_means(x, self.expected_nll, reconstructor(model), shape, block, levels, channels)
        residual = residual_maps(x, means, levels, channels) if means is not None else None
        return anomaly_maps(self.expected_nll, residual, shape, block)


def map_shape(model: VAE) -> tuple[int, int]:
    """The anomaly map's (H, W): the image's, or for a checkpoint written before shapes were recorded (grey,
    square: 8x8 digits, 28x28 MNIST) the square of its D pixels."""
    if model.shape is not None:
        return model.shape[0], model.shape[1]
    side = int(round(model.dim**0.5))
    if side * side != model.dim:
        raise ValueError(f"the model records no image shape and its {model.dim} pixels are not a square")
    return side, side


def reconstructor(model: VAE) -> Callable[[np.ndarray], np.ndarray]:
    """Images (N, D) -> E[x|z = mu(x)] (N, D) in levels: what the anomaly map's residual part reads."""
    return lambda x: expected_images(model, torch.from_numpy(np.asarray(x, dtype=np.int64)))


def map_calibration(model: VAE, x_val: np.ndarray, expected_nll: np.ndarray, k: int, seed: int) -> dict[str, Any]:
    """calibration.anomaly_map from the validation images x_val (N, D) and their pixels' expected NLLs."""
    levels, channels = model.levels, model.decoder.channels
    return map_calibration_block(expected_nll, x_val, reconstructor(model), map_shape(model), levels, channels, k, seed)


def image_statistics(
    model: VAE,
    x: np.ndarray,
    k: int,
    seed: int,
    maps: bool = False,
    progress: str | None = None,
    procs: Processes | None = None,
) -> ImageStatistics:
    """`ImageStatistics` of images x (N, D) at K = k, as the service computes them: one importance pass (and
    LLR>k's for a model of several latent layers) with the seed's noise; shared among `procs` where given."""
    xt = torch.from_numpy(x.astype(np.int64))
    run = importance_pass(model, xt, k, seed=seed, progress=progress, maps=maps, procs=procs)
    llr = None
    if model.layers:
        desc = progress and f"{progress}, LLR>k"
        ll, ll_k = llr_log_likelihoods(model, xt, k, seed=seed, progress=desc, procs=procs)
        llr = llr_bits_per_dim(ll, ll_k, x.shape[1])
    return ImageStatistics(
        bits_per_dim(-run.log_likelihood, x.shape[1]),
        elbo_gap_bits_per_dim(run.log_likelihood, run.elbo, x.shape[1]),
        llr,
        run.expected_nll,
    )


def model_images(model: VAE, x: np.ndarray) -> np.ndarray:
    """Images x (N, ...) as the model's (N, H, W, C), or as rows (N, D) where it was built without a shape."""
    return x.reshape((len(x), *model.shape) if model.shape is not None else (len(x), -1))


def scores_of(stats: ImageStatistics, images: np.ndarray, calib: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every score `calib` (the manifest's calibration block) allows, of images (N, H, W, C) with statistics
    `stats`."""
    return scores_from_nll(
        stats.nll_bpd,
        images,
        calib["typicality_center_bpd"],
        calib["standardize"],
        stats.llr_bpd,
        calib.get("scores"),
        elbo_gap_bpd=stats.elbo_gap_bpd,
        compressor=calib["compressor"],
    )


def model_scores(model: VAE, x: np.ndarray, k: int, seed: int, calib: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every calibrated score of images x (N, H, W, C) under a model, as the service computes them (K = k)."""
    stats = image_statistics(model, x.reshape(len(x), -1).astype(np.int64), k, seed)
    return scores_of(stats, model_images(model, x), calib)


#: the validation images' correlation between NLL and the complexity coder's bits/dim from which likelihood is
#: taken to measure complexity more than typicality (see choose_default_score). Measured: the 8x8 digits 0.52-0.53
#: and their 0-4 model 0.60, where nll_bpd finds held-out classes best (0.952 against dose's 0.907); binarised
#: MNIST 0.69, where nll_bpd passes constant images (AUROC 0.536, dose 0.988); 8-bit MNIST 0.86; photo crops
#: 0.95-0.97. Halfway between 0.60 and 0.69: a thin margin (the estimate's standard error on 300 images is ~0.03)
COMPLEXITY_CORRELATION = 0.65
COMPLEXITY_AWARE_SCORE = "dose"


def choose_default_score(nll_bpd: np.ndarray, x: np.ndarray) -> tuple[str, dict[str, Any]]:
    """The default OOD score for a model, from its validation images x (N, H, W, C): nll_bpd where their NLL
    (bits/dim) and the length of the same images under COMPRESSOR, the coder complexity subtracts
    (bits/dim), correlate below COMPLEXITY_CORRELATION, else
    COMPLEXITY_AWARE_SCORE. Where an image's likelihood mostly says how compressible it is (natural images:
    a flat crop is cheap for any coder), likelihood rates simple foreign images as normal (Nalisnick et al.
    2019) and a score that corrects for complexity must decide; where it does not (digits: r = 0.52-0.60), the
    NLL itself finds held-out classes best (AUROC 0.952 against 0.84-0.90 for the complexity-aware scores).
    Returns the score and the rule's record for the manifest."""
    coded_bpd = compressed_bits(x) / int(np.prod(x.shape[1:]))
    nll = np.asarray(nll_bpd, dtype=np.float64)
    flat = nll.std() < 1e-12 or coded_bpd.std() < 1e-12
    r = 0.0 if flat else float(np.corrcoef(nll, coded_bpd)[0, 1])
    name = COMPLEXITY_AWARE_SCORE if r >= COMPLEXITY_CORRELATION else "nll_bpd"
    return name, {
        "nll_zlib_correlation": round(r, 4),
        "threshold": COMPLEXITY_CORRELATION,
        "rule": f"{COMPLEXITY_AWARE_SCORE} where the validation images' NLL and their compressed length (bits/dim, "
        f"the calibration's compressor) correlate at >= {COMPLEXITY_CORRELATION}, else nll_bpd",
    }


def calibrate(
    model: VAE,
    x_val: np.ndarray,
    k: int = 1000,
    seed: int = 0,
    default_score: str = "auto",
    progress: bool = False,
    procs: Processes | None = None,
) -> dict[str, Any]:
    """The manifest's calibration block: each score's distribution on the validation split, and the anomaly
    map's per-pixel statistics, from one importance-sampling pass (shared among `procs` where given; every
    process gets the same block); "auto" chooses the default score from the same validation images
    (`choose_default_score`)."""
    desc = f"calibration (K={k})" if progress else None
    stats = image_statistics(model, x_val, k, seed, maps=True, progress=desc, procs=procs)
    nll, images = stats.nll_bpd, model_images(model, x_val)
    assert stats.expected_nll is not None
    rule = None
    if default_score == "auto":
        default_score, rule = choose_default_score(nll, images)
    return {
        "split": "val",
        "images": int(len(x_val)),
        "K": k,
        "seed": seed,
        "default_score": default_score,
        **({"default_score_rule": rule} if rule else {}),
        "default_fpr": DEFAULT_FPR,
        **calibration_block(nll, images, stats.llr_bpd, stats.elbo_gap_bpd),
        "anomaly_map": map_calibration(model, x_val, stats.expected_nll, k, seed),
    }


def validation_images_for(model: VAE, calibration: dict[str, Any], log: Callable[[str], None] = print) -> np.ndarray:
    """The validation images (N, D) a version was calibrated on, read again: the training config's source,
    split and subsample seed. Raises DataError when the training data cannot be read again."""
    from training.data import prepare_config
    from training.pipeline import subsample

    cfg = model.cfg
    data = prepare_config(cfg)
    x_val = subsample(data.flat("val"), cfg.calibration_images or 0, int(calibration["seed"]))
    log(f"calibration images: {len(x_val)} validation images of {cfg.dataset}, K={calibration['K']}")
    return x_val


def map_calibration_for(model: VAE, calibration: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """calibration.anomaly_map for a version calibrated before anomaly maps, on the same validation images
    (`validation_images_for`) at the calibration's K and seed."""
    x_val = validation_images_for(model, calibration, log)
    k, seed = int(calibration["K"]), int(calibration["seed"])
    run = importance_pass(model, torch.from_numpy(x_val.astype(np.int64)), k, seed=seed)
    assert run.expected_nll is not None
    return map_calibration(model, x_val, run.expected_nll, k, seed)


def recalibrate(model: VAE, calibration: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """A version's calibration block computed anew by this version of the code, on the same validation images
    (`validation_images_for`), K and seed, so that it gains the scores added since (elbo_gap, dose). The
    default score is chosen again where it was chosen by the rule ("auto"), else kept."""
    x_val = validation_images_for(model, calibration, log)
    default = "auto" if calibration.get("default_score_rule") else str(calibration["default_score"])
    fresh = calibrate(model, x_val, int(calibration["K"]), int(calibration["seed"]), default, progress=True)
    return {**fresh, **({"of_images": calibration["of_images"]} if "of_images" in calibration else {})}
