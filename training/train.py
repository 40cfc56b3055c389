"""The training loop: Adamax, a warmed-up weight average, early stopping on the validation loss, seeded.

What the loop produces depends on the data, the (resolved) config and the seed only: it stops by its
epoch cap and early stopping, never by the clock, unless `max_minutes` is set explicitly (and then it
says so). Both the raw weights and their running average are validated every epoch; the best of
either, by validation loss, is what is kept.

Resumable: with a work directory, the loop writes `checkpoint.pt` there every `checkpoint_every` steps, at
the end, and when SIGTERM or SIGINT arrives (it finishes the step, writes the checkpoint and raises
`TrainingInterrupted`). A checkpoint holds everything the rest of the run depends on: weights, optimizer,
weight average, best state, early-stopping counters, the epoch's data order and position, every random
generator's state and the length of the metrics log; resuming from it gives the same model, byte for byte,
as the run that was never interrupted (same machine, device and number of processes).

Several processes (`torchrun`, DistributedDataParallel) split every batch: the global batch stays
`batch_size`, each process takes a contiguous slice of it and the same slice of the batch's noise, so the
run follows the single-process one up to the order of floating-point sums (dropout masks aside: each process
draws its own). See `Distributed`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from training.config import ConfigError, TrainConfig
from training.data import ImageData, LazyRows
from training.evaluate import rows_per_pass
from training.model import VAE

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
DEFAULT_CHECKPOINT_EVERY = 500  # steps; a checkpoint of a 15 M-parameter mlp (~5 copies of the weights) ~0.5 s
DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # config.PRECISIONS


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped training after a step; the checkpoint to resume from was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"checkpoint written to {checkpoint}" if checkpoint else "no checkpoint (no work directory)"
        super().__init__(f"{signal.Signals(signum).name} received: stopped after step {step}; {where}")


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
    resumed_from_step: int | None = None  # the checkpoint's step where this run resumed one


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


# --- devices and processes -------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """auto: CUDA where available, else the CPU. A device asked for by name must be there."""
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: the Apple MPS backend is not available")
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 autocast on the CPU and CUDA; fp16 (with loss scaling) on CUDA only; fp32 everywhere."""
    if precision not in AMP_DTYPES:
        raise ConfigError(f"precision must be one of {', '.join(AMP_DTYPES)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"--precision fp16 needs --device cuda (its loss scaling is CUDA's); {device.type}: use bf16")
    if precision == "bf16" and device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--precision bf16 runs on cpu or cuda, not {device.type}")


@dataclass
class Distributed:
    """This process's place among `torchrun`'s: rank, world size, and the device it trains on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process without it."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self, device: torch.device) -> torch.device:
        """Join the process group (NCCL on CUDA, gloo otherwise); return this process's device."""
        if not self.active:
            return device
        if device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            device = torch.device("cuda", self.local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def shard(self, rows: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This process's contiguous slice of `rows` (all of it in a single process)."""
        return rows if not self.active else torch.tensor_split(rows, self.world, dim=dim)[self.rank]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.active:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def any(self, flag: bool) -> bool:
        """Whether any process raised `flag` (every process must call it at the same point)."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def autocast_trunks(model: VAE, device_type: str, dtype: torch.dtype) -> None:
    """Run the encoder's and the decoder's networks (`.net`) under autocast to `dtype`, except their last
    layer, which takes float32 inputs and gives float32 outputs; the likelihood, the prior and q(z|x) stay
    float32, and so does everything in eval mode (validation). Autocast over the whole bound rounds the
    logistic mixture's means and scales to bf16 (8 bits, about one of 256 levels) and diverged at once on
    8-bit MNIST. The modules' forwards are wrapped in place, so the state dict's names do not change."""
    for trunk in (model.encoder.net, model.decoder.net):
        layers = [m for m in trunk.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
        last = layers[-1]
        last_forward, trunk_forward = last.forward, trunk.forward

        def full(x: torch.Tensor, _forward: Callable[..., torch.Tensor] = last_forward) -> torch.Tensor:
            with torch.autocast(device_type, enabled=False):
                return _forward(x.float())

        def low(*args: Any, _forward: Callable[..., torch.Tensor] = trunk_forward, _trunk: nn.Module = trunk) -> Any:
            with torch.autocast(device_type, dtype=dtype, enabled=_trunk.training):  # validation: float32
                return _forward(*args).float()

        last.forward = full  # type: ignore[method-assign]
        trunk.forward = low  # type: ignore[method-assign]


class _LogWeights(nn.Module):
    """The VAE's log importance weights as `forward`, the call DistributedDataParallel synchronises."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.vae.training_terms(x, eps, beta)  # (K, B), the free-bits correction


# --- interruption ------------------------------------------------------------------------------


class StopSignals:
    """While active, SIGTERM and SIGINT only raise a flag that the loop reads after each step; a second
    signal acts at once (KeyboardInterrupt). Outside the main thread (no handlers possible) it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\nvae-train: {signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
            "(send it again to stop at once, without one)",
            file=sys.stderr,
            flush=True,
        )


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a checkpoint is either the old one or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def check_resumable(state: dict[str, Any], cfg: TrainConfig, data: ImageData, world: int, path: Path) -> None:
    """Refuse a checkpoint written by another configuration, data set or number of processes."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
    saved, now = state["config"], cfg.to_dict()
    keys = sorted(set(saved) | set(now))
    diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    if diff:
        raise ConfigError(f"{path} was written by another configuration ({'; '.join(diff)}); resume with the same one")
    sizes = [len(data.train), len(data.val), data.dim, data.levels]
    if state["data"] != sizes:
        raise ConfigError(f"{path}: the data differs (train, val, dim, levels {state['data']} -> {sizes})")
    if state["world"] != world:
        raise ConfigError(f"{path} was written by {state['world']} process(es); resume it with as many, not {world}")


# --- the loop ------------------------------------------------------------------------------------


class _Batches(torch.utils.data.Dataset):
    """The batches left in an epoch, as DataLoader workers read them: batch j is the rows perm[start + j bs:]
    (this process's slice of them), the same rows the main process would read."""

    def __init__(self, rows: Rows, perm: torch.Tensor, start: int, bs: int, procs: Distributed):
        self.rows, self.perm, self.start, self.bs, self.procs = rows, perm, start, bs, procs

    def __len__(self) -> int:
        return max(0, math.ceil((len(self.perm) - self.start) / self.bs))

    def __getitem__(self, j: int) -> torch.Tensor:
        i = self.start + j * self.bs
        return self.rows[self.procs.shard(self.perm[i : i + self.bs])]


def epoch_batches(
    rows: Rows, perm: torch.Tensor, start: int, bs: int, procs: Distributed, workers: int
) -> Iterator[torch.Tensor]:
    """The epoch's batches from `start` on: read in this process, or by `workers` DataLoader processes ahead
    of the step that needs them (decoding a streamed folder's images while the step runs)."""
    batches = _Batches(rows, perm, start, bs, procs)
    if workers == 0:
        return (batches[j] for j in range(len(batches)))
    # its own generator: a DataLoader seeds its workers from the global one, which the dropout masks draw from
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, num_workers=workers, prefetch_factor=2, generator=torch.Generator().manual_seed(0)
    )
    return iter(loader)


class Rows:
    """Images (N, H, W, C) of uint8 levels (an array, or a streamed source's LazyRows) as the networks' rows
    (N, D) int64, one batch at a time."""

    def __init__(self, images: np.ndarray | LazyRows):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        picked = self.images[index.numpy() if isinstance(index, torch.Tensor) else index]
        return torch.from_numpy(picked.reshape(len(picked), -1).astype(np.int64))


#: decoder outputs and feature maps of one validation pass, in floats (64 MB of float32). Passes of 1,024 images
#: (370 MB for the 32x32 colour conv default) validated at half the images/s of passes within this budget
#: (0.92 against 0.50 s for 1,000 images; 28x28 conv: 0.56 against 0.30 s; 2 cores), a fifth of a training
#: epoch's time there
VALIDATION_ELEMENTS = 1 << 24
MAX_VALIDATION_BATCH = 1024


def validation_batch(model: VAE, k: int) -> int:
    """Images in one validation pass of K = k samples: within VALIDATION_ELEMENTS, at most MAX_VALIDATION_BATCH."""
    return max(1, min(MAX_VALIDATION_BATCH, rows_per_pass(model, VALIDATION_ELEMENTS) // k))


@torch.no_grad()
def validation_loss(
    model: VAE,
    x: torch.Tensor | Rows,
    k: int,
    seed: int,
    batch: int | None = None,
    procs: Distributed | None = None,
) -> float:
    """Mean negative bound (K=k, beta=1) in nats, with noise fixed by `seed` so epochs compare fairly; `batch`
    images a pass (default: `validation_batch`).

    With several processes each computes its slice of every batch (with that slice's noise) and the
    sums are added; the noise, drawn for whole batches, is that of a single process."""
    batch = batch or validation_batch(model, k)
    procs = procs or Distributed()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        eps = torch.randn(k, xb.shape[0], model.noise_dim, generator=gen)
        if procs.active:
            xb, eps = procs.shard(xb), procs.shard(eps, dim=1)
        log_w = model.log_weights(xb.to(device), eps.to(device), 1.0)
        if procs.active:
            total += -(torch.logsumexp(log_w, dim=0) - math.log(k)).double().sum()
        else:  # as VAE.loss computes it, so a single process's figures stay what they were
            total += (-(torch.logsumexp(log_w, dim=0) - math.log(k)).mean()).double() * len(xb)
    model.train(was_training)
    return procs.sum(total).item() / len(x)


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


@contextmanager
def _metrics_log(out_dir: Path | None, keep_bytes: int | None) -> Iterator[Any]:
    """metrics.jsonl in the work directory: new, or a resumed run's cut back to its checkpoint's length."""
    if out_dir is None:
        yield None
        return
    path = out_dir / "metrics.jsonl"
    if keep_bytes is None:
        f = path.open("w")
    else:
        f = path.open("r+" if path.exists() else "w")
        f.truncate(keep_bytes)
        f.seek(keep_bytes)
    try:
        yield f
    finally:
        f.close()


def train(
    cfg: TrainConfig,
    data: ImageData,
    out_dir: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    *,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    resume: bool = False,
    device: str | torch.device = "cpu",
    procs: Distributed | None = None,
    data_workers: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train a VAE on `data` with a resolved `cfg`; return the best state by validation loss (on the CPU).

    `out_dir` (the work directory) receives metrics.jsonl and checkpoint.pt; `resume` continues from the
    checkpoint there, if any. `on_step(step)` is called after every optimisation step (tests interrupt runs
    with it). Only rank 0 of several processes writes files."""
    assert cfg.batch_size is not None and cfg.epochs is not None, "resolve the config first"
    if checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every}")
    procs = procs or Distributed()
    dev = resolve_device(device) if isinstance(device, str) else device
    check_precision(cfg.precision, dev)
    ckpt_path = out_dir / CHECKPOINT_FILE if out_dir is not None else None
    writes = out_dir is not None and procs.main
    saved: dict[str, Any] | None = None
    if resume and ckpt_path is not None:
        saved = procs.broadcast(load_checkpoint_state(ckpt_path) if procs.main and ckpt_path.exists() else None)
        if saved is not None:
            check_resumable(saved, cfg, data, procs.world, ckpt_path)

    seed_everything(cfg.seed)
    model = VAE(cfg, data.dim, data.levels, data.shape).to(dev)
    if procs.active:  # each process its own dropout masks (one global generator per process)
        torch.manual_seed(cfg.seed * 1_000_003 + procs.rank)
    average = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None
    opt = torch.optim.Adamax(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp_dtype = AMP_DTYPES[cfg.precision]
    if amp_dtype is not None:
        autocast_trunks(model, dev.type, amp_dtype)  # the training model only: validation runs the fp32 average
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    net: nn.Module = _LogWeights(model)
    if procs.active:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[dev.index] if dev.type == "cuda" else None, forward_sync_buffers=False
        )
    # uint8 rows (N, D), viewed, not copied: a batch becomes int64 when it is drawn (the whole set as int64
    # would be 8x the images' bytes: 60,000 MNIST images 47 MB -> 376 MB)
    x_train = Rows(data.train)
    x_val = Rows(data.val)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, bs = len(x_train), cfg.batch_size

    best: dict[str, Any] = {"loss": math.inf, "epoch": -1, "which": "raw", "state": None, "losses": {}}
    stale = steps = 0
    first_epoch, next_index, perm, epoch_total = 1, 0, None, torch.zeros((), device=dev)
    stopped, time_limited, finished, elapsed = f"epoch cap of {cfg.epochs}", False, False, 0.0
    metrics_bytes: int | None = None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if average is not None:
            average.model.load_state_dict(saved["ema"])
            average.steps = saved["ema_steps"]
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        best = saved["best"]
        stale, steps, elapsed = saved["stale"], saved["steps"], saved["seconds"]
        first_epoch, next_index, perm = saved["epoch"], saved["next_index"], saved["perm"]
        mine = saved["ranks"][procs.rank]  # this process's own generators and its part of the epoch's loss sum
        epoch_total = mine["epoch_total"].to(dev)
        stopped, time_limited, finished = saved["stopped_because"], saved["time_limited"], saved["finished"]
        metrics_bytes = saved["metrics_bytes"]
        gen.set_state(saved["generator"])
        _set_rng_state(mine["rng"])
        if log is not None:
            where = "training had finished" if finished else f"epoch {first_epoch}, step {steps}"
            log(f"resuming from {ckpt_path} ({where})")
    start = time.monotonic() - elapsed
    if out_dir is not None and procs.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    epoch = first_epoch

    def checkpoint(done: bool) -> None:
        # each process's own: its generators (its dropout stream) and its slices' part of the epoch's loss sum
        ranks = procs.gather({"rng": _rng_state(), "epoch_total": epoch_total.cpu()})
        if not writes:
            return
        assert ckpt_path is not None
        save_checkpoint(
            ckpt_path,
            {
                "format": CHECKPOINT_FORMAT,
                "config": cfg.to_dict(),
                "data": [len(data.train), len(data.val), data.dim, data.levels],
                "world": procs.world,
                "finished": done,
                "epoch": epoch,
                "next_index": next_index,
                "perm": perm,
                "steps": steps,
                "stale": stale,
                "best": best,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "ema": average.model.state_dict() if average is not None else None,
                "ema_steps": average.steps if average is not None else 0,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "generator": gen.get_state(),
                "ranks": ranks,
                "metrics_bytes": log_file.tell() if log_file is not None else 0,
                "seconds": time.monotonic() - start,
                "stopped_because": stopped,
                "time_limited": time_limited,
            },
        )

    bar = tqdm(
        total=cfg.epochs,
        initial=first_epoch - 1,
        desc="training",
        unit="epoch",
        disable=not progress or not procs.main,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    # DataLoader workers leave torch's SIGCHLD handler installed, which crashed (SIGSEGV) this process when a
    # later child process exited (seen in pytest: a subprocess after a run with --data-workers); put it back
    sigchld = (
        signal.getsignal(signal.SIGCHLD)
        if data_workers and threading.current_thread() is threading.main_thread()
        else None
    )
    with _metrics_log(out_dir if writes else None, metrics_bytes) as log_file, StopSignals() as signals:
        try:
            for epoch in range(first_epoch, cfg.epochs + 1) if not finished else ():
                beta = cfg.beta if cfg.warmup == 0 else cfg.beta * min(1.0, epoch / cfg.warmup)
                model.train()
                if perm is None:
                    perm = torch.randperm(n, generator=gen)
                    next_index, epoch_total = 0, torch.zeros((), device=dev)
                batches = epoch_batches(x_train, perm, next_index, bs, procs, data_workers)
                while next_index < n:
                    rows = perm[next_index : next_index + bs]
                    eps = torch.randn(cfg.iw_train, len(rows), model.noise_dim, generator=gen)
                    xb, eps_b = next(batches).to(dev), procs.shard(eps, dim=1).to(dev)
                    log_w, free_bits = net(xb, eps_b, beta)
                    bound = torch.logsumexp(log_w.float(), dim=0) - math.log(cfg.iw_train)
                    if procs.active:  # DDP averages the gradients: world x (this slice's sum / global batch)
                        loss = -bound.sum() * (procs.world / len(rows))
                    else:
                        loss = -bound.mean()
                    if free_bits is not None:  # each process its slice's layer KLs (DDP averages the gradients)
                        loss = loss + free_bits
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    else:
                        loss.backward()
                        opt.step()
                    if average is not None:
                        average.update()
                    epoch_total += -bound.detach().sum() if procs.active else loss.detach() * len(xb)
                    steps += 1
                    next_index += bs
                    if on_step is not None:
                        on_step(steps)
                    stop = procs.any(signals.signum is not None)
                    if stop or steps % checkpoint_every == 0:
                        checkpoint(False)
                    if stop:
                        signum = signals.signum or signal.SIGTERM  # another process's signal
                        raise TrainingInterrupted(signum, steps, ckpt_path)  # rank 0 wrote it
                for _ in batches:  # (none left) the end a DataLoader's iterator needs to shut its workers down
                    pass
                train_loss = procs.sum(epoch_total).item() / n  # one sync per epoch
                if not math.isfinite(train_loss):
                    raise TrainingDiverged(
                        f"loss became {train_loss} at epoch {epoch}; lower --lr, or check the data and --input-scale"
                    )
                candidates = {"raw": model}
                if average is not None:
                    candidates["ema"] = average.model
                losses = {
                    k: validation_loss(m, x_val, cfg.iw_train, seed=cfg.seed + 1, procs=procs)
                    for k, m in candidates.items()
                }
                which = min(losses, key=losses.__getitem__)
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
                perm = None  # the next epoch draws its order
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
            if not finished:
                finished = True
                checkpoint(True)  # evaluation or export may still fail: resuming then skips training
        finally:
            bar.close()
            if sigchld is not None:
                signal.signal(signal.SIGCHLD, sigchld)
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
        resumed_from_step=saved["steps"] if saved is not None else None,
    )
