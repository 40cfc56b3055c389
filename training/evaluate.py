"""Evaluation: -ELBO and importance-sampled NLL (nats and bits/dim), active units, plots."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from training.model import VAE
from vae_contract.formulas import (
    ImportanceAccumulator,
    PixelNllAccumulator,
    bits_per_dim,
    images_from_probs,
)

LogWeightsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, D), eps (K, B, L)) -> (K, B)
MAX_ROWS = 1 << 16  # images x samples per forward pass while evaluating
MAX_ELEMENTS = 1 << 25  # decoder outputs and feature maps per forward pass while evaluating (128 MB of float32)


class Processes(Protocol):
    """The processes that share an evaluation (training.train.Distributed under torchrun): each computes its
    `rank`-th of `world` contiguous slices of every batch, and `gather` gives every process all their results."""

    rank: int
    world: int

    def gather(self, obj: Any) -> list[Any]: ...


def _part_slices(rows: int, count: int) -> list[slice]:
    """torch.tensor_split's contiguous slices of `rows` rows among `count` processes."""
    q, r = divmod(rows, count)
    bounds = [i * q + min(i, r) for i in range(count + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(count)]


def _joined(procs: Processes | None, n: int, batch: int, pieces: list[tuple[np.ndarray, ...]]) -> list[np.ndarray]:
    """Per-image results of images 0..n-1: each process's per-batch pieces (this process's slices, in batch
    order; `_noise_chunks` with its part) put back in image order, on every process."""
    if procs is not None and procs.world > 1:
        parts = [iter(p) for p in procs.gather(pieces)]
        ordered = []
        for i in range(0, n, batch):
            for rank, s in enumerate(_part_slices(min(batch, n - i), procs.world)):
                if s.stop > s.start:
                    ordered.append(next(parts[rank]))
        pieces = ordered
    return [np.concatenate(column) for column in zip(*pieces, strict=True)]


def _noise_chunks(
    x: torch.Tensor,
    latent_dim: int,
    k: int,
    chunk: int,
    seed: int,
    batch: int,
    dtype: torch.dtype,
    progress: str | None,
    procs: Processes | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(batch of images, eps (n, B, L)) for every chunk of every batch, then (batch, None) when a batch is
    done; the noise is one seeded stream, so the chunking decides nothing but memory. Among several processes
    (`procs`), each gets its slice of every batch and the same slice of the batch's noise, drawn whole as one
    process draws it, so each image meets the noise it meets in a single process (as in training)."""
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=len(x), desc=progress, unit="image", disable=progress is None, file=sys.stderr, dynamic_ncols=True)
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        mine = slice(0, len(xb)) if procs is None else _part_slices(len(xb), procs.world)[procs.rank]
        for done in range(0, k, chunk):
            eps = torch.randn(min(chunk, k - done), len(xb), latent_dim, generator=gen, dtype=dtype)
            if mine.stop > mine.start:
                yield xb[mine], eps[:, mine].contiguous()
        if mine.stop > mine.start:
            yield xb[mine], None
        bar.update(len(xb))
    bar.close()


@torch.inference_mode()
def importance_log_likelihood(
    log_weights: LogWeightsFn,
    x: torch.Tensor,
    latent_dim: int,
    k: int,
    chunk: int = 250,
    seed: int = 0,
    batch: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: str | None = None,
    procs: Processes | None = None,
) -> torch.Tensor:
    """Importance-sampled log p(x) in nats per image: log (1/K) sum_k w_k, with K split in chunks.

    `log_weights(x, eps)` gives log p(x, z) - log q(z|x) at z = reparameterised eps. Memory holds at
    most `chunk` x `batch` samples at once (batch from MAX_ROWS by default), whatever K is; the sum is
    accumulated in float64. `progress` names a progress bar of images (on stderr); None shows none.
    `procs` shares the work among processes (each a slice of every batch); every one gets all images' values.
    """
    chunk = min(chunk, k)
    batch = batch or max(1, MAX_ROWS // chunk)
    out: list[tuple[np.ndarray, ...]] = []
    acc = None
    for xb, eps in _noise_chunks(x, latent_dim, k, chunk, seed, batch, dtype, progress, procs):
        if acc is None:
            acc = torch.full((len(xb),), -math.inf, dtype=torch.float64)
        if eps is None:
            out.append(((acc - math.log(k)).numpy(),))
            acc = None
        else:
            acc = torch.logaddexp(acc, torch.logsumexp(log_weights(xb, eps).double(), dim=0))
    return torch.from_numpy(_joined(procs, len(x), batch, out)[0])


@dataclass(frozen=True)
class ImportancePass:
    """One image set's importance-sampling results, from the same K samples an image: log p(x) and the ELBO
    (N,) in nats, and each pixel's expected NLL under the posterior (N, H*W) in nats (channels summed;
    vae_contract.formulas.PixelNllAccumulator) where asked for."""

    log_likelihood: np.ndarray
    elbo: np.ndarray
    expected_nll: np.ndarray | None


@torch.inference_mode()
def importance_pass(
    model: VAE,
    x: torch.Tensor,
    k: int,
    chunk: int = 250,
    seed: int = 0,
    progress: str | None = None,
    maps: bool = True,
    procs: Processes | None = None,
) -> ImportancePass:
    """log p(x), the ELBO and (maps=True) each pixel's expected NLL of images x (N, D), K = k: the numbers the
    service's log_weights (or pixel_log_weights) graph gives, accumulated as the service does. `procs` shares
    the work among processes; every one gets all images' values."""
    model.eval()
    chunk = min(chunk, k)
    batch = max(1, rows_per_pass(model) // chunk)
    done: list[tuple[np.ndarray, ...]] = []
    acc: ImportanceAccumulator | None = None
    pix: PixelNllAccumulator | None = None
    for xb, eps in _noise_chunks(x, model.noise_dim, k, chunk, seed, batch, torch.float32, progress, procs):
        if eps is None:
            assert acc is not None
            done.append((acc.log_likelihood(), acc.elbo(), *([pix.expected_nll()] if pix is not None else [])))
            acc = pix = None
            continue
        if maps:
            log_w, pixels = model.pixel_terms(xb, eps)
            if pix is None:
                pix = PixelNllAccumulator.empty(len(xb), pixels.shape[-1])
            pix.add(log_w.numpy(), pixels.numpy())
        else:
            log_w = model.log_weights(xb, eps)
        if acc is None:
            acc = ImportanceAccumulator.empty(len(xb))
        acc.add(log_w.numpy())
    joined = _joined(procs, len(x), batch, done)
    return ImportancePass(joined[0], joined[1], joined[2] if maps else None)


@torch.inference_mode()
def expected_images(model: VAE, x: torch.Tensor) -> np.ndarray:
    """E[x|z] (N, D) in levels at the posterior mean's z, top layer mu(x), by the decoder graph's per-level
    probabilities (the residual part of an anomaly map: vae_contract.formulas.residual_maps)."""
    model.eval()
    per_image = model.dim * model.levels * (getattr(model.decoder, "components", 1) + 2)
    batch = max(1, MAX_ELEMENTS // per_image)
    levels = torch.arange(model.levels, dtype=torch.float32)
    out = [model.probs(model.encoder(x[i : i + batch])[0]) @ levels for i in range(0, len(x), batch)]
    return torch.cat(out).double().numpy()


@torch.inference_mode()
def llr_log_likelihoods(
    model: VAE,
    x: torch.Tensor,
    k: int,
    chunk: int = 250,
    seed: int = 0,
    progress: str | None = None,
    procs: Processes | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Importance-sampled log p(x) and log p>k(x) (N,) each in nats, from the same K samples an image (the
    llr_log_weights graph's numbers; `VAE.llr_terms`). A model of several latent layers only. `procs` shares
    the work among processes."""
    model.eval()
    chunk = min(chunk, k)
    batch = max(1, rows_per_pass(model) // (2 * chunk))  # two top-down passes and decoder passes a sample
    done: list[tuple[np.ndarray, ...]] = []
    accs: tuple[ImportanceAccumulator, ImportanceAccumulator] | None = None
    for xb, eps in _noise_chunks(x, model.noise_dim, k, chunk, seed, batch, torch.float32, progress, procs):
        if eps is None:
            assert accs is not None
            done.append((accs[0].log_likelihood(), accs[1].log_likelihood()))
            accs = None
            continue
        if accs is None:
            accs = ImportanceAccumulator.empty(len(xb)), ImportanceAccumulator.empty(len(xb))
        for acc, log_w in zip(accs, model.llr_terms(xb, eps), strict=True):
            acc.add(log_w.numpy())
    full, part = _joined(procs, len(x), batch, done)
    return full, part


def rows_per_pass(model: VAE, elements: int | None = None) -> int:
    """(image, sample) rows of one decoder pass within `elements` floats of outputs and feature maps (default
    MAX_ELEMENTS, read at each call)."""
    return max(1, (elements or MAX_ELEMENTS) // model.decoder.floats_per_sample)


def log_likelihood(
    model: VAE,
    x: torch.Tensor,
    k: int,
    chunk: int = 250,
    seed: int = 0,
    progress: str | None = None,
    procs: Processes | None = None,
) -> torch.Tensor:
    """A VAE's importance-sampled log p(x) per image in nats, K = k (`procs`: shared among processes)."""
    model.eval()
    batch = max(1, rows_per_pass(model) // min(chunk, k))
    return importance_log_likelihood(
        model.log_weights, x, model.noise_dim, k, chunk, seed, batch=batch, progress=progress, procs=procs
    )


@torch.inference_mode()
def elbo(model: VAE, x: torch.Tensor, seed: int = 0, batch: int = 512) -> torch.Tensor:
    """One-sample ELBO per image in nats (the number the seed text reports, negated)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        parts.append(model.log_weights(xb, torch.randn(1, len(xb), model.noise_dim, generator=gen))[0])
    return torch.cat(parts).double()


@torch.inference_mode()
def active_units(model: VAE, x: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent units whose posterior mean varies across the data: Cov_x(E_q[z_u]) > threshold (Burda et al.)."""
    mu, _ = model.encoder(x)
    return int((mu.var(dim=0) > threshold).sum())


def evaluate(
    model: VAE,
    x_test: torch.Tensor,
    k: int = 1000,
    chunk: int = 250,
    seed: int = 0,
    progress: bool = False,
    procs: Processes | None = None,
) -> dict[str, Any]:
    """Test metrics with units and K spelled out; what the manifest records. The NLL's importance sampling, the
    costly part, is shared among `procs` where given; every process gets the same metrics."""
    dim = x_test.shape[1]
    neg_elbo = -elbo(model, x_test, seed=seed).mean().item()
    desc = f"test NLL (K={k})" if progress else None
    nll = -log_likelihood(model, x_test, k, chunk, seed=seed, progress=desc, procs=procs).mean().item()
    return {
        "split": "test",
        "images": int(len(x_test)),
        "neg_elbo": {"nats": round(neg_elbo, 4), "bits_per_dim": round(bits_per_dim(neg_elbo, dim), 5), "K": 1},
        "nll": {"nats": round(nll, 4), "bits_per_dim": round(bits_per_dim(nll, dim), 5), "K": k},
        "active_units": active_units(model, x_test),
        "seed": seed,
    }


def save_plots(
    model: VAE, images: np.ndarray, out_dir: Path, seed: int = 0, n: int = 64, sample_mode: str = "mean"
) -> list[str]:
    """real.png, samples.png (prior samples shown as `sample_mode`, as /sample does), reconstructions.png and
    learning_curve.png; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = images.shape[1:]  # (H, W, C)
    levels = model.levels
    gen = torch.Generator().manual_seed(seed)
    real = images[:n]
    with torch.inference_mode():
        z = model.prior.sample(n, gen)
        rng = np.random.default_rng(seed)
        samples = images_from_probs(model.probs(z).numpy(), sample_mode, rng).reshape(n, *shape)
        mu, _ = model.encoder(torch.from_numpy(real.reshape(len(real), -1).astype(np.int64)))
        # the mean, as /reconstruct gives by default: a mixture's mode jumps between its components
        recon = images_from_probs(model.probs(mu).numpy(), "mean").reshape(len(real), *shape)

    def grid(batch: np.ndarray, path: Path, title: str) -> None:
        cols = 8
        rows = math.ceil(len(batch) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols, rows))
        for ax, i in zip(np.ravel(axes), range(rows * cols)):
            ax.axis("off")
            if i < len(batch):
                if batch.shape[-1] == 1:
                    ax.imshow(batch[i, ..., 0], cmap="gray", vmin=0, vmax=levels - 1)
                else:  # colour: levels onto [0, 1], as the RGB image the levels stand for
                    ax.imshow(batch[i] / (levels - 1))
        fig.suptitle(title)
        fig.savefig(path, dpi=80, metadata={"Software": None})
        plt.close(fig)

    names = ["real.png", "samples.png", "reconstructions.png"]
    grid(real, out_dir / names[0], "test images")
    grid(samples, out_dir / names[1], f"samples from the prior ({sample_mode} of p(x|z))")
    grid(recon, out_dir / names[2], "reconstructions (mean of p(x|mu))")
    metrics_file = out_dir / "metrics.jsonl"
    if metrics_file.exists():
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["epoch"] for r in rows], [r["train_loss"] for r in rows], label="train")
        ax.plot([r["epoch"] for r in rows], [r["val_loss"] for r in rows], label="validation (best of raw/average)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (nats)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "learning_curve.png", dpi=80, metadata={"Software": None})
        plt.close(fig)
        names.append("learning_curve.png")
    return names
