"""The numerics of one model version on onnxruntime: encode, decode, sample, score.

Each method takes a batch. Densities come only from the exported graphs; this module draws the noise
and combines graph outputs (log-sum-exp over chunks of importance samples, means, ESS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

LN2 = math.log(2.0)


@dataclass
class ImportanceStats:
    """Per image, in nats: log p(x) estimated with K samples, the ELBO (mean log weight), and the ESS."""

    log_likelihood: np.ndarray  # (B,)
    elbo: np.ndarray  # (B,)
    ess: np.ndarray  # (B,) effective sample size (sum w)^2 / sum w^2, in [1, K]
    k: int


class ModelRuntime:
    """onnxruntime sessions of one model version plus the manifest facts the numerics need."""

    def __init__(self, path: Path, manifest: dict[str, Any], threads: int, inter_threads: int = 1):
        self.path, self.manifest = path, manifest
        img = manifest["image"]
        self.height, self.width, self.dim, self.levels = img["height"], img["width"], img["dim"], img["levels"]
        self.latent_dim = int(manifest["latent_dim"])
        prior = manifest["prior"]
        self.prior_log_weights = np.asarray(prior["log_weights"], dtype=np.float64)
        self.prior_means = np.asarray(prior["means"], dtype=np.float64)
        self.prior_log_vars = np.asarray(prior["log_vars"], dtype=np.float64)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = inter_threads
        opts.log_severity_level = 3
        self.sessions = {
            name: ort.InferenceSession(str(path / graph["file"]), opts, providers=["CPUExecutionProvider"])
            for name, graph in manifest["graphs"].items()
        }

    # --- graphs ---------------------------------------------------------------------------
    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (B, D) int64 -> mu (B, L), log_var (B, L)."""
        mu, log_var = self.sessions["encoder"].run(None, {"x": x})
        return mu, log_var

    def decode(self, z: np.ndarray) -> np.ndarray:
        """z (B, L) -> probs (B, D, levels)."""
        return self.sessions["decoder"].run(None, {"z": z.astype(np.float32)})[0]

    def log_weights(self, x: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """x (B, D) int64, eps (K, B, L) -> log importance weights (K, B) in nats."""
        return self.sessions["log_weights"].run(None, {"x": x, "eps": eps})[0]

    def warm_up(self) -> None:
        """Run every graph once so the first request pays no initialisation cost."""
        x = np.zeros((2, self.dim), dtype=np.int64)
        mu, _ = self.encode(x)
        self.decode(mu)
        lw = self.log_weights(x, np.zeros((2, 2, self.latent_dim), dtype=np.float32))
        if not np.all(np.isfinite(lw)):
            raise RuntimeError(f"{self.path}: warm-up produced non-finite log weights")

    # --- combinations ---------------------------------------------------------------------
    def sample_prior(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n latents from the manifest's Gaussian mixture prior -> (n, L) float32."""
        w = np.exp(self.prior_log_weights - self.prior_log_weights.max())
        comp = rng.choice(len(w), size=n, p=w / w.sum())
        eps = rng.standard_normal((n, self.latent_dim))
        z = self.prior_means[comp] + np.exp(0.5 * self.prior_log_vars[comp]) * eps
        return z.astype(np.float32)

    @staticmethod
    def images_from_probs(probs: np.ndarray, mode: str, rng: np.random.Generator | None = None) -> np.ndarray:
        """Per-pixel distributions (B, D, levels) -> integer images (B, D) by mean, mode or sampling."""
        levels = probs.shape[-1]
        if mode == "mean":
            return np.rint(probs @ np.arange(levels, dtype=probs.dtype)).astype(np.int64)
        if mode == "sample":
            assert rng is not None
            u = rng.random(probs.shape[:-1] + (1,))
            cdf = np.cumsum(probs, axis=-1)
            return np.minimum((cdf < u * cdf[..., -1:]).sum(-1), levels - 1).astype(np.int64)
        return probs.argmax(-1).astype(np.int64)

    def importance_stats(self, x: np.ndarray, k: int, seed: int, chunk_elements: int) -> ImportanceStats:
        """Importance-sampled log p(x), ELBO and ESS with K samples, drawn in chunks.

        At most `chunk_elements` (samples x images) go through the graph at once, so memory is
        bounded for any K. The noise comes from one generator seeded by `seed`, drawn chunk after
        chunk, so the same request with the same seed gives the same numbers.
        """
        b = len(x)
        rng = np.random.default_rng(seed)
        per_run = max(1, chunk_elements // b)
        lse = np.full(b, -np.inf)
        lse2 = np.full(b, -np.inf)
        total = np.zeros(b)
        done = 0
        while done < k:
            n = min(per_run, k - done)
            eps = rng.standard_normal((n, b, self.latent_dim), dtype=np.float32)
            lw = self.log_weights(x, eps).astype(np.float64)  # (n, B)
            lse = np.logaddexp(lse, _logsumexp(lw))
            lse2 = np.logaddexp(lse2, _logsumexp(2.0 * lw))
            total += lw.sum(0)
            done += n
        log_likelihood = lse - math.log(k)
        ess = np.exp(2.0 * lse - lse2)
        return ImportanceStats(log_likelihood, total / k, ess, k)

    def bits_per_dim(self, nats: np.ndarray) -> np.ndarray:
        return nats / (self.dim * LN2)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=0)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.exp(a - m).sum(axis=0))
