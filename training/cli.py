"""`vae-train`: train, evaluate and export a VAE in one run.

Settings are layered: built-in defaults < --preset < --config FILE < explicit flags.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from training.config import (
    INPUT_SCALES,
    LIKELIHOODS,
    OOD_SCORES,
    PRESETS,
    PRIORS,
    ConfigError,
    TrainConfig,
    read_config_file,
)
from training.data import DataError, prepare_config
from training.evaluate import evaluate, save_plots
from training.export import ExportError, parse_version_dir, write_version
from training.ood import calibrate
from training.train import TrainingDiverged, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vae-train",
        description="Train a VAE, evaluate it (-ELBO and importance-sampled NLL) and export a verified "
        "model version (ONNX graphs + manifest.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--dataset", default=None, help="digits | idx:PATH | folder:PATH | npy:PATH | npz:PATH (default: digits)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="model version directory <models>/<name>/<version> (default: models/<dataset>/1)",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="named starting configuration; 'seed' is the seed text's exact setup",
    )
    p.add_argument("--config", type=Path, default=None, help="JSON file of TrainConfig fields")
    p.add_argument("--force", action="store_true", help="overwrite an existing model version")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("data")
    g.add_argument("--levels", type=int, help="requantize to N grey levels (2 for binary images)")
    g.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="resize folder images")
    g.add_argument("--classes", type=int, nargs="+", help="keep only these digit classes")
    g.add_argument("--split-seed", type=int, help="seed of the train/val/test split where none is fixed")
    g = p.add_argument_group("model")
    g.add_argument("--likelihood", choices=LIKELIHOODS)
    g.add_argument("--prior", choices=PRIORS)
    g.add_argument("--components", type=int, help="mixture components (mog) or pseudo-inputs (vamp)")
    g.add_argument("--latent-dim", type=int)
    g.add_argument("--hidden", type=int, help="width of the hidden layers")
    g.add_argument("--depth", type=int, help="hidden layers in the encoder and decoder")
    g.add_argument("--dropout", type=float)
    g.add_argument("--input-scale", choices=INPUT_SCALES)
    g = p.add_argument_group("objective and optimisation")
    g.add_argument("--beta", type=float, help="weight of the KL term")
    g.add_argument("--warmup", type=int, help="epochs of linear KL warm-up")
    g.add_argument("--iw-train", type=int, help="K_train importance samples (1 = ELBO)")
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--epochs", type=int)
    g.add_argument("--patience", type=int)
    g.add_argument("--ema", type=float, help="weight-averaging decay (0 disables)")
    g.add_argument("--max-minutes", type=float, help="wall-clock training budget")
    g.add_argument("--seed", type=int)
    g.add_argument("--eval-k", type=int, help="importance samples K for the test NLL and the OOD calibration")
    g.add_argument("--ood-score", choices=OOD_SCORES, help="default OOD score of /score")
    return p


CONFIG_FLAGS = [
    "levels",
    "image_size",
    "classes",
    "split_seed",
    "likelihood",
    "prior",
    "components",
    "latent_dim",
    "hidden",
    "depth",
    "dropout",
    "input_scale",
    "beta",
    "warmup",
    "iw_train",
    "lr",
    "weight_decay",
    "batch_size",
    "epochs",
    "patience",
    "ema",
    "max_minutes",
    "seed",
    "eval_k",
    "ood_score",
]


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = dict(PRESETS[args.preset])
    if args.config is not None:
        values.update(read_config_file(args.config))
    for name in CONFIG_FLAGS:
        value = getattr(args, name)
        if value is not None:
            values[name] = list(value) if isinstance(value, (list, tuple)) else value
    if args.dataset is not None:
        values["dataset"] = args.dataset
    return TrainConfig.from_dict(values)


def default_out(dataset: str) -> Path:
    name = dataset.split(":", 1)[0] if dataset == "digits" else Path(dataset.split(":", 1)[1]).stem
    return Path("models") / name / "1"


def run(
    cfg: TrainConfig, out: Path, *, force: bool = False, plots: bool = True, progress: bool = True, log=print
) -> dict[str, Any]:
    """Train, evaluate and export; return the manifest."""
    parse_version_dir(out)  # refuse a bad output path before spending time on training
    data = prepare_config(cfg)
    if cfg.likelihood == "bernoulli" and data.levels != 2:
        raise ConfigError(
            f"the bernoulli likelihood needs binary images; {cfg.dataset} has {data.levels} levels: add --levels 2"
        )
    log(
        f"data: {cfg.dataset}, images {data.shape[0]}x{data.shape[1]}, {data.levels} levels, "
        f"train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}"
    )
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} already holds a model version; pick a new version or pass --force")
    work = out.parent / f".{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = train(cfg, data, out_dir=work, progress=progress)
        log(
            f"trained {result.epochs_run} epochs in {result.seconds:.1f} s ({result.stopped_because}); "
            f"best validation loss {result.best_val_loss:.3f} nats at epoch {result.best_epoch}"
        )
        t0 = time.monotonic()
        x_test = torch.from_numpy(data.flat("test"))
        metrics = evaluate(result.model, x_test, k=cfg.eval_k, chunk=cfg.eval_chunk, seed=cfg.seed)
        metrics["seconds"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        calibration = calibrate(
            result.model, data.flat("val"), k=cfg.eval_k, seed=cfg.seed + 2, default_score=cfg.ood_score
        )
        calibration["seconds"] = round(time.monotonic() - t0, 2)
        extra = {"metrics.jsonl": work / "metrics.jsonl"}
        if plots:
            for name in save_plots(result.model, data.test, work, seed=cfg.seed):
                extra[name] = work / name
        training = {
            "config": cfg.to_dict(),
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "seconds": round(result.seconds, 2),
            "stopped_because": result.stopped_because,
            "best_val_loss_nats": round(result.best_val_loss, 4),
            "torch_version": torch.__version__,
        }
        data_info = {
            "source": cfg.dataset,
            "image_shape": list(data.shape),
            "split": data.split,
            "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        }
        manifest = write_version(
            result.model,
            out,
            verify_images=data.flat("test")[:256],
            metrics=metrics,
            training=training,
            data_info=data_info,
            extra_files=extra,
            calibration=calibration,
            force=force,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = manifest["metrics"]
    log(f"test -ELBO (K=1): {m['neg_elbo']['nats']:.3f} nats = {m['neg_elbo']['bits_per_dim']:.4f} bits/dim")
    log(f"test NLL (K={m['nll']['K']}): {m['nll']['nats']:.3f} nats = {m['nll']['bits_per_dim']:.4f} bits/dim")
    log(f"active units: {m['active_units']} of {cfg.latent_dim}")
    parity = manifest["export_check"]["max_abs_diff_log_likelihood_nats"]
    log(f"export parity: max |torch - onnxruntime| = {parity:.2e} nats")
    log(f"wrote {out}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
        out = args.out or default_out(cfg.dataset)
        run(cfg, out, force=args.force, plots=not args.no_plots, progress=not args.quiet)
    except (ConfigError, DataError, ExportError, TrainingDiverged) as exc:
        print(f"vae-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
