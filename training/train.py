"""The training loop: Adamax, a warmed-up weight average, early stopping on the validation loss, seeded.

What the loop produces depends on the data, the (resolved) config and the seed only: it stops by its
epoch cap and early stopping, never by the clock, unless `max_minutes` is set explicitly (and then it
says so). Both the raw weights and their running average are validated every epoch; the best of
either, by validation loss, is what is kept.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
    model: VAE  # the best state by validation loss, raw or averaged (see `weights`)
    weights: str  # "ema" or "raw": which weights `model` holds
    best_epoch: int
    best_val_loss: float  # nats, K = iw_train
    epochs_run: int
    steps: int
    seconds: float
    stopped_because: str
    time_limited: bool  # max_minutes cut training short
    val_loss_at_best: dict[str, float] = field(default_factory=dict)  # "raw"/"ema" -> nats at best_epoch


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


@torch.no_grad()
def validation_loss(model: VAE, x: torch.Tensor, k: int, seed: int, batch: int = 1024) -> float:
    """Mean negative bound (K=k, beta=1) in nats, with noise fixed by `seed` so epochs compare fairly."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        total += model.loss(xb, k, 1.0, gen).double() * len(xb)
    model.train(was_training)
    return total.item() / len(x)


class WeightAverage:
    """An exponential moving average of the weights whose decay warms up: min(decay, (1 + t) / (10 + t)).

    Early on the average follows the weights closely instead of staying near the initial ones, so it
    never lags far behind (the bias of a plain EMA started at the initial weights).
    """

    def __init__(self, model: VAE, decay: float):
        self.decay, self.steps = decay, 0
        self.model = copy.deepcopy(model)
        self.avg = list(self.model.parameters())
        self.src = list(model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        d = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        torch._foreach_lerp_(self.avg, self.src, 1.0 - d)


def train(
    cfg: TrainConfig,
    data: ImageData,
    out_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a VAE on `data` with a resolved `cfg`; return the best state by validation loss."""
    assert cfg.batch_size is not None and cfg.epochs is not None, "resolve the config first"
    seed_everything(cfg.seed)
    model = VAE(cfg, data.dim, data.levels, data.shape)
    average = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None
    opt = torch.optim.Adamax(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_train = torch.from_numpy(data.flat("train"))
    x_val = torch.from_numpy(data.flat("val"))
    gen = torch.Generator().manual_seed(cfg.seed)
    n, bs = len(x_train), cfg.batch_size

    log_file = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_file = (out_dir / "metrics.jsonl").open("w")

    best = {"loss": math.inf, "epoch": -1, "which": "raw", "state": None, "losses": {}}
    stale = steps = 0
    start = time.monotonic()
    stopped, time_limited = f"epoch cap of {cfg.epochs}", False
    bar = tqdm(
        total=cfg.epochs, desc="training", unit="epoch", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    epoch = 0
    try:
        for epoch in range(1, cfg.epochs + 1):
            beta = cfg.beta if cfg.warmup == 0 else cfg.beta * min(1.0, epoch / cfg.warmup)
            model.train()
            perm = torch.randperm(n, generator=gen)
            total = torch.zeros(())
            for i in range(0, n, bs):
                xb = x_train[perm[i : i + bs]]
                loss = model.loss(xb, cfg.iw_train, beta, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if average is not None:
                    average.update()
                total += loss.detach() * len(xb)
                steps += 1
            train_loss = total.item() / n  # one sync per epoch
            if not math.isfinite(train_loss):
                raise TrainingDiverged(
                    f"loss became {train_loss} at epoch {epoch}; lower --lr, or check the data and --input-scale"
                )
            candidates = {"raw": model}
            if average is not None:
                candidates["ema"] = average.model
            losses = {k: validation_loss(m, x_val, cfg.iw_train, seed=cfg.seed + 1) for k, m in candidates.items()}
            which = min(losses, key=losses.get)
            val_loss = losses[which]
            if not math.isfinite(val_loss):
                raise TrainingDiverged(f"validation loss became {val_loss} at epoch {epoch}")
            improved = val_loss < best["loss"]
            if improved:
                best = {"loss": val_loss, "epoch": epoch, "which": which, "losses": losses}
                best["state"] = copy.deepcopy(candidates[which].state_dict())
                stale = 0
            else:
                stale += 1
            bar.update(1)
            bar.set_postfix(train=f"{train_loss:.2f}", val=f"{val_loss:.2f}", best=f"{best['loss']:.2f}")
            if log_file is not None:
                row = {"epoch": epoch, "steps": steps, "beta": beta, "train_loss": train_loss}
                row.update({f"val_loss_{k}": v for k, v in losses.items()})
                row.update({"val_loss": val_loss, "best": improved})
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
            if stale >= cfg.patience:
                stopped = f"early stopping (no validation improvement in {cfg.patience} epochs)"
                break
            if cfg.max_minutes is not None and time.monotonic() - start >= 60 * cfg.max_minutes:
                stopped, time_limited = f"TIME LIMIT of {cfg.max_minutes} min (--max-minutes)", True
                break
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    if time_limited and log is not None:
        log(
            f"WARNING: --max-minutes {cfg.max_minutes} stopped training after {epoch} of {cfg.epochs} epochs: "
            "this model depends on the machine's speed and load, and is recorded as time-limited in its manifest"
        )
    chosen = VAE(cfg, data.dim, data.levels, data.shape)
    chosen.load_state_dict(best["state"])
    chosen.eval()
    return TrainResult(
        model=chosen,
        weights=best["which"],
        best_epoch=best["epoch"],
        best_val_loss=best["loss"],
        epochs_run=epoch,
        steps=steps,
        seconds=time.monotonic() - start,
        stopped_because=stopped,
        time_limited=time_limited,
        val_loss_at_best=best["losses"],
    )
