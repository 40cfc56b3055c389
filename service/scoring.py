"""Per-image importance sampling on an engine: the one scoring algorithm, shared by the scheduler and checks.

An image's K samples are processed in chunks of a fixed size C (a multiple of the contract's noise
block). Each engine call takes the next chunk of several images: x (B, D), eps (C', B, L) with each
image's own noise. Every row of the graph is computed independently of the other rows, so an
image's numbers depend on (model version, image, K, seed, engine, C) only: not on its neighbours,
its position, or how requests were batched. Tests check this on every engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vae_contract.formulas import NOISE_BLOCK, ImportanceAccumulator, importance_noise


class LogWeightsEngine(Protocol):
    def log_weights(self, x: np.ndarray, eps: np.ndarray) -> np.ndarray: ...


def chunk_size(rows_budget: int, k_max: int = 1000) -> int:
    """Samples per chunk: a multiple of the noise block, at most 1000 and at most the rows one call may hold."""
    return int(max(NOISE_BLOCK, min(k_max, rows_budget) // NOISE_BLOCK * NOISE_BLOCK))


@dataclass
class ImageTask:
    """One image's importance sampling in progress."""

    x: np.ndarray  # (D,) int64
    k: int
    seed: int
    chunk: int
    done: int = 0
    acc: ImportanceAccumulator = field(default_factory=lambda: ImportanceAccumulator.empty(1))

    @property
    def finished(self) -> bool:
        return self.done >= self.k

    def next_len(self) -> int:
        return min(self.chunk, self.k - self.done)


def run_call(engine: LogWeightsEngine, tasks: list[ImageTask], latent_dim: int) -> int:
    """Advance every task by its next chunk (all of the same length) with one engine call; return rows run."""
    n = tasks[0].next_len()
    x = np.stack([t.x for t in tasks])
    eps = np.empty((n, len(tasks), latent_dim), dtype=np.float32)
    for j, t in enumerate(tasks):
        eps[:, j, :] = importance_noise(t.seed, n, latent_dim, start=t.done)
    log_w = np.asarray(engine.log_weights(x, eps), dtype=np.float64)  # (n, B)
    for j, t in enumerate(tasks):
        t.acc.add(log_w[:, j : j + 1])
        t.done += n
    return n * len(tasks)


def pick_group(tasks: list[ImageTask], max_images: int) -> list[ImageTask]:
    """The next call's images: unfinished tasks in order whose next chunk has the first one's length."""
    pending = [t for t in tasks if not t.finished]
    if not pending:
        return []
    n = pending[0].next_len()
    return [t for t in pending if t.next_len() == n][:max_images]


def score_direct(
    engine: LogWeightsEngine, x: np.ndarray, k: int, seeds: list[int], latent_dim: int, chunk: int, max_images: int
) -> list[ImageTask]:
    """Score images x (B, D) to completion on one engine, outside the scheduler (load-time checks, benchmarks)."""
    tasks = [ImageTask(row, k, seed, chunk) for row, seed in zip(x, seeds)]
    while group := pick_group(tasks, max_images):
        run_call(engine, group, latent_dim)
    return tasks
