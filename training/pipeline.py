"""The pipeline behind `vae-train`: data -> train -> evaluate -> calibrate -> export, as one call.

`vae-train`, `vae-ood-eval` and the tests call `run`; the CLI only parses arguments and maps errors
to exit codes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import ConfigError, TrainConfig, large_image_note
from training.data import prepare_config
from training.evaluate import evaluate, save_plots
from training.export import ExportError, parse_version_dir, write_version
from training.model import parameter_count
from training.ood import calibrate
from training.train import (
    CHECKPOINT_FILE,
    DEFAULT_CHECKPOINT_EVERY,
    Distributed,
    TrainingDiverged,
    TrainingInterrupted,
    check_precision,
    resolve_device,
    train,
)

Log = Callable[[str], None]


def _silent(_: str) -> None:
    """The log of processes other than rank 0."""


def subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """All of x when n is 0 or covers it, else n rows chosen by a seeded permutation (in their original order)."""
    if n == 0 or len(x) <= n:
        return x
    return x[np.sort(np.random.default_rng(seed).permutation(len(x))[:n])]


def subsample_rows(images: Any, n: int, seed: int) -> np.ndarray:
    """`subsample` of a split's images (an array or a streamed source's LazyRows) as (n, D) int64 rows, reading
    only the rows it picks."""
    if n == 0 or len(images) <= n:
        picked = np.asarray(images[:])
    else:
        picked = images[np.sort(np.random.default_rng(seed).permutation(len(images))[:n])]
    return picked.reshape(len(picked), -1).astype(np.int64)


def check_model_size(
    cfg: TrainConfig, dim: int, levels: int, shape: tuple[int, int] | None = None
) -> tuple[int, float]:
    """(parameters, MB of float32 weights) of the model `cfg` builds; ConfigError above max_model_mb."""
    params = parameter_count(cfg, dim, levels, shape)
    mb = params * 4 / 1e6
    if mb > cfg.max_model_mb:
        hint = (
            "use --likelihood logistic_mixture (a few numbers per pixel, not one per grey level), fewer --levels, "
            if cfg.likelihood == "categorical"
            else ""
        )
        raise ConfigError(
            f"this configuration would build a model of {params / 1e6:.1f} M parameters = {mb:.0f} MB of weights "
            f"per version ({cfg.likelihood} likelihood, {levels} levels, {dim} pixels, hidden {cfg.hidden}), over the "
            f"--max-model-mb limit of {cfg.max_model_mb:g} MB; {hint}a smaller --hidden, or raise --max-model-mb"
        )
    return params, mb


def work_dir(out: Path) -> Path:
    """Where a run trains before its model version exists: metrics.jsonl and the checkpoint to resume from.
    Removed when the version is written; kept when training is interrupted or a later stage fails."""
    return out.parent / f".{out.name}-work"


@contextmanager
def _keeping_checkpoint(work: Path, log: Log) -> Iterator[None]:
    """Say where the trained weights are kept when a stage after training fails, so the run can resume."""
    try:
        yield
    except BaseException:
        if (work / CHECKPOINT_FILE).exists():
            log(f"the trained weights are kept in {work / CHECKPOINT_FILE}: add --resume to the same command to go on")
        raise


def run(
    cfg: TrainConfig,
    out: Path,
    *,
    force: bool = False,
    plots: bool = True,
    progress: bool = True,
    log: Log = print,
    resume: bool = False,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    device: str = "cpu",
    stream: bool = False,
    data_workers: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train, evaluate, calibrate and export one model version; return its manifest.

    `resume` continues from the checkpoint an interrupted run left in `work_dir(out)` (a fresh start
    where there is none). Under `torchrun` every process trains, evaluates and calibrates its slice of each
    batch, and rank 0 alone writes the version; the other processes return {} after calibration."""
    procs = Distributed.from_env()
    if not procs.main:
        log = _silent
        progress = False
    parse_version_dir(out)  # refuse a bad output path before spending time on training
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} already holds a model version; pick a new version or pass --force")
    dev = resolve_device(device)
    check_precision(cfg.precision, dev)
    work = work_dir(out)
    if (work / CHECKPOINT_FILE).exists() and not resume:
        if not force:
            raise ExportError(
                f"{work} holds the checkpoint of an interrupted run of {out}: add --resume to continue it, "
                "or --force to start afresh (which deletes it)"
            )
        if procs.main:
            shutil.rmtree(work)
    dev = procs.init(dev)
    data = prepare_config(cfg, stream=stream)
    resolved = cfg.resolve(data.levels, len(data.train), data.shape)
    params, mb = check_model_size(resolved, data.dim, data.levels, data.shape)
    log(
        f"data: {cfg.dataset}, images {data.shape[0]}x{data.shape[1]}x{data.shape[2]}, {data.levels} levels, "
        f"train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}"
    )
    layers = (
        f" x {resolved.latent_layers} layers (LLR>{resolved.llr_k}, free bits {resolved.free_bits:g} nats a layer)"
        if resolved.latent_layers > 1
        else ""
    )
    log(
        f"model: {resolved.arch} networks, {resolved.likelihood} likelihood"
        f"{' over rows' if resolved.context == 'rows' else ''}, "
        f"{resolved.prior} prior, latent {resolved.latent_dim}{layers}, "
        f"{params / 1e6:.2f} M parameters ({mb:.1f} MB); batch {resolved.batch_size}, at most {resolved.epochs} epochs "
        f"({resolved.max_steps} steps), patience {resolved.patience}, seed {resolved.seed}"
    )
    note = large_image_note(cfg, resolved, data.shape)
    if note:
        log(note)
    log(
        f"device: {dev.type}, precision {resolved.precision}"
        + (f", {procs.world} processes (batch {resolved.batch_size} split among them)" if procs.active else "")
    )
    try:
        result = train(
            resolved,
            data,
            out_dir=work,
            progress=progress,
            log=log,
            checkpoint_every=checkpoint_every,
            resume=resume,
            device=dev,
            procs=procs,
            data_workers=data_workers,
            on_step=on_step,
        )
    except TrainingDiverged:
        procs.close()
        if procs.main:  # nothing worth resuming: a diverged run needs another configuration
            shutil.rmtree(work, ignore_errors=True)
        raise
    except TrainingInterrupted:
        # Every process stops after the same step (the stop is agreed by an all-reduce), so each can leave
        # the group here. A gloo process that exits with its group alive can abort in the interpreter's
        # teardown ("terminate called without an active exception", SIGABRT), seen in full suite runs.
        procs.close()
        raise
    with _keeping_checkpoint(work, log):
        try:  # every process evaluates and calibrates its slice of every batch; each gets all the numbers
            log(
                f"trained {result.epochs_run} epochs ({result.steps} steps) in {result.seconds:.1f} s, "
                f"{result.stopped_because}; best validation loss {result.best_val_loss:.3f} nats at epoch "
                f"{result.best_epoch} ({result.weights} weights)"
            )
            t0 = time.monotonic()
            x_test = subsample_rows(data.test, resolved.eval_images or 0, cfg.seed)
            metrics = evaluate(
                result.model,
                torch.from_numpy(x_test),
                k=cfg.eval_k,
                chunk=cfg.eval_chunk,
                seed=cfg.seed,
                progress=progress,
                procs=procs,
            )
            eval_seconds = time.monotonic() - t0
            t0 = time.monotonic()
            x_cal = subsample_rows(data.val, resolved.calibration_images or 0, cfg.seed + 2)
            calibration = calibrate(
                result.model,
                x_cal,
                k=cfg.eval_k,
                seed=cfg.seed + 2,
                default_score=cfg.ood_score,
                progress=progress,
                procs=procs,
            )
            calibration_seconds = time.monotonic() - t0
        finally:
            procs.close()  # calibration was the last collective: rank 0 writes the version alone
    if not procs.main:
        return {}
    with _keeping_checkpoint(work, log):
        metrics["of_images"] = len(data.test)
        calibration["of_images"] = len(data.val)
        extra = {"metrics.jsonl": work / "metrics.jsonl"}
        if plots:
            for name in save_plots(result.model, data.test, work, seed=cfg.seed):
                extra[name] = work / name
        training = {
            "config": resolved.to_dict(),
            "requested": cfg.to_dict(),
            "weights": result.weights,
            "val_loss_at_best_nats": {k: round(v, 4) for k, v in result.val_loss_at_best.items()},
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "steps": result.steps,
            "stopped_because": result.stopped_because,
            "time_limited": result.time_limited,
            "best_val_loss_nats": round(result.best_val_loss, 4),
            "seconds": {
                "training": round(result.seconds, 2),
                "evaluation": round(eval_seconds, 2),
                "calibration": round(calibration_seconds, 2),
            },
            "torch_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": dev.type,
            "processes": procs.world,
            "resumed_from_step": result.resumed_from_step,
        }
        data_info = {
            "source": cfg.dataset,
            "image_shape": list(data.shape),
            "preprocessing": data.preprocessing,
            "split": data.split,
            "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        }
        manifest = write_version(
            result.model,
            out,
            verify_images=subsample_rows(data.test[:256], 0, 0),
            metrics=metrics,
            training=training,
            data_info=data_info,
            extra_files=extra,
            calibration=calibration,
            force=force,
        )
    shutil.rmtree(work, ignore_errors=True)  # only now: a failure above keeps the checkpoint to resume from
    m = manifest["metrics"]
    log(f"test -ELBO (K=1): {m['neg_elbo']['nats']:.3f} nats = {m['neg_elbo']['bits_per_dim']:.4f} bits/dim")
    log(
        f"test NLL (K={m['nll']['K']}, {m['images']} of {m['of_images']} test images): "
        f"{m['nll']['nats']:.3f} nats = {m['nll']['bits_per_dim']:.4f} bits/dim"
    )
    log(f"active units: {m['active_units']} of {resolved.latent_dim}")
    log(f"evaluation {eval_seconds:.1f} s, calibration {calibration_seconds:.1f} s (K={cfg.eval_k})")
    parity = manifest["export_check"]["max_abs_diff_log_likelihood_nats"]
    log(f"export parity: max |torch - onnxruntime| = {parity:.2e} nats")
    if result.time_limited:
        log(f"WARNING: training was cut short by --max-minutes {cfg.max_minutes}; see the manifest's training block")
    log(f"wrote {out} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.1f} MB)")
    return manifest
