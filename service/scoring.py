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

from vae_contract.formulas import NOISE_BLOCK, ImportanceAccumulator, PixelNllAccumulator, importance_noise


class LogWeightsEngine(Protocol):
    def log_weights(self, x: np.ndarray, eps: np.ndarray) -> np.ndarray: ...


class PixelLogWeightsEngine(Protocol):
    def pixel_log_weights(self, x: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class LlrLogWeightsEngine(Protocol):
    def llr_log_weights(self, x: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


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
    pixels: PixelNllAccumulator | None = None  # each pixel's expected NLL, when an anomaly map is asked for
    llr: ImportanceAccumulator | None = None  # L>k's log weights, when the score needs LLR>k

    @property
    def finished(self) -> bool:
        return self.done >= self.k

    def next_len(self) -> int:
        return min(self.chunk, self.k - self.done)

    def next_call(self) -> tuple[int, bool, bool]:
        """What an engine call must share with this task's next chunk: its length, and the graphs (with maps or
        not, with LLR>k or not)."""
        return self.next_len(), self.pixels is not None, self.llr is not None


def run_call(
    engine: LogWeightsEngine,
    tasks: list[ImageTask],
    noise_dim: int,
    pixel_engine: PixelLogWeightsEngine | None = None,
    llr_engine: LlrLogWeightsEngine | None = None,
) -> int:
    """Advance every task by its next chunk with one engine call; return rows run. The tasks share their
    `next_call()`: with anomaly maps, `pixel_engine`'s pixel_log_weights graph gives the same log weights and
    each pixel's log p(x_p|z) in the same pass; with LLR>k, `llr_engine`'s llr_log_weights graph gives the log
    weights and L>k's, on one engine so that their difference is exact (with maps too, the llr graph's log
    weights make the score and the pixel graph's weigh the map)."""
    n = tasks[0].next_len()
    x = np.stack([t.x for t in tasks])
    eps = np.empty((n, len(tasks), noise_dim), dtype=np.float32)
    for j, t in enumerate(tasks):
        eps[:, j, :] = importance_noise(t.seed, n, noise_dim, start=t.done)
    log_w: np.ndarray | None = None  # the score's log weights (n, B)
    if tasks[0].llr is not None:
        if llr_engine is None:
            raise ValueError("LLR>k needs an engine with the llr_log_weights graph")
        log_w, log_w_llr = (np.asarray(a, dtype=np.float64) for a in llr_engine.llr_log_weights(x, eps))
    if tasks[0].pixels is not None:
        if pixel_engine is None:
            raise ValueError("anomaly maps need an engine with the pixel_log_weights graph")
        lw, px = pixel_engine.pixel_log_weights(x, eps)
        map_log_w, pixel_log_px = np.asarray(lw, dtype=np.float64), np.asarray(px)  # (n, B), (n, B, P)
        log_w = map_log_w if log_w is None else log_w
    if log_w is None:
        log_w = np.asarray(engine.log_weights(x, eps), dtype=np.float64)
    for j, t in enumerate(tasks):
        t.acc.add(log_w[:, j : j + 1])
        if t.llr is not None:
            t.llr.add(log_w_llr[:, j : j + 1])
        if t.pixels is not None:
            t.pixels.add(map_log_w[:, j : j + 1], pixel_log_px[:, j : j + 1])
        t.done += n
    return n * len(tasks)


def pick_group(tasks: list[ImageTask], max_images: int) -> list[ImageTask]:
    """The next call's images: unfinished tasks in order whose next chunk has the first one's length."""
    pending = [t for t in tasks if not t.finished]
    if not pending:
        return []
    call = pending[0].next_call()
    return [t for t in pending if t.next_call() == call][:max_images]


def score_direct(
    engine: LogWeightsEngine,
    x: np.ndarray,
    k: int,
    seeds: list[int],
    noise_dim: int,
    chunk: int,
    max_images: int,
    pixel_engine: PixelLogWeightsEngine | None = None,
    pixels: int = 0,
    llr_engine: LlrLogWeightsEngine | None = None,
) -> list[ImageTask]:
    """Score images x (B, D) to completion on one engine, outside the scheduler (load-time checks, benchmarks,
    vae-score); with `pixel_engine` and the image's `pixels` (H x W), each task's anomaly map too; with
    `llr_engine`, each task's L>k too."""
    maps = pixel_engine is not None
    tasks = [
        ImageTask(
            row,
            k,
            seed,
            chunk,
            pixels=PixelNllAccumulator.empty(1, pixels) if maps else None,
            llr=ImportanceAccumulator.empty(1) if llr_engine is not None else None,
        )
        for row, seed in zip(x, seeds)
    ]
    while group := pick_group(tasks, max_images):
        run_call(engine, group, noise_dim, pixel_engine=pixel_engine, llr_engine=llr_engine)
    return tasks
