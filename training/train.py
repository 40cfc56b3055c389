"""The training loop: Adamax, early stopping on the validation loss, best state kept, seeded."""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.config import TrainConfig
from training.data import ImageData
from training.model import VAE


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    model: VAE  # the best state (the weight average when ema > 0)
    best_epoch: int
    best_val_loss: float  # nats
    epochs_run: int
    seconds: float
    stopped_because: str


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


@torch.no_grad()
def validation_loss(model: VAE, x: torch.Tensor, k: int, seed: int, batch: int = 512) -> float:
    """Mean negative bound (K=k, beta=1) in nats, with noise fixed by `seed` so epochs compare fairly."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        total += model.loss(xb, k, 1.0, gen).item() * len(xb)
    return total / len(x)


def train(
    cfg: TrainConfig,
    data: ImageData,
    out_dir: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a VAE on `data` and return the best state by validation loss."""
    seed_everything(cfg.seed)
    model = VAE(cfg, data.dim, data.levels)
    ema_model: VAE | None = None
    if cfg.ema > 0:  # Polyak averaging: validate, keep and export the averaged weights
        ema_model = VAE(cfg, data.dim, data.levels)
        ema_model.load_state_dict(model.state_dict())
    opt = torch.optim.Adamax(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_train = torch.from_numpy(data.flat("train"))
    x_val = torch.from_numpy(data.flat("val"))
    gen = torch.Generator().manual_seed(cfg.seed)

    log_file = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_file = (out_dir / "metrics.jsonl").open("w")

    best_loss, best_epoch, best_state = math.inf, -1, None
    stale = 0
    start = time.monotonic()
    stopped = "max epochs"
    bar = tqdm(range(cfg.epochs), desc="training", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    epoch = -1
    try:
        for epoch in bar:
            beta = cfg.beta if cfg.warmup == 0 else cfg.beta * min(1.0, (epoch + 1) / cfg.warmup)
            model.train()
            perm = torch.randperm(len(x_train), generator=gen)
            total = 0.0
            for i in range(0, len(x_train), cfg.batch_size):
                xb = x_train[perm[i : i + cfg.batch_size]]
                loss = model.loss(xb, cfg.iw_train, beta, gen)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at epoch {epoch + 1}; lower --lr or check the data"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ema_model is not None:
                    with torch.no_grad():
                        for pe, pm in zip(ema_model.parameters(), model.parameters()):
                            pe.lerp_(pm, 1.0 - cfg.ema)
                total += loss.item() * len(xb)
            train_loss = total / len(x_train)
            evaluated = ema_model if ema_model is not None else model
            val_loss = validation_loss(evaluated, x_val, cfg.iw_train, seed=cfg.seed + 1)
            if not math.isfinite(val_loss):
                raise TrainingDiverged(f"validation loss became {val_loss} at epoch {epoch + 1}")
            improved = val_loss < best_loss
            if improved:
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = copy.deepcopy(evaluated.state_dict())
            else:
                stale += 1
            elapsed = time.monotonic() - start
            bar.set_postfix(train=f"{train_loss:.2f}", val=f"{val_loss:.2f}", best=f"{best_loss:.2f}")
            if log_file is not None:
                row = {
                    "epoch": epoch + 1,
                    "beta": beta,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "best": improved,
                    "seconds": round(elapsed, 3),
                }
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
            if stale >= cfg.patience:
                stopped = f"early stopping (no validation improvement in {cfg.patience} epochs)"
                break
            if cfg.max_minutes is not None and elapsed >= 60 * cfg.max_minutes:
                stopped = f"time budget of {cfg.max_minutes} min"
                break
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    best = VAE(cfg, data.dim, data.levels)
    best.load_state_dict(best_state)
    best.eval()
    return TrainResult(best, best_epoch + 1, best_loss, epoch + 1, time.monotonic() - start, stopped)
