"""`vae-train`: train, evaluate and export a VAE in one run (the pipeline is training.pipeline.run).

Settings are layered: the defaults (TrainConfig's field defaults) < --preset < --config FILE < flags.
Every TrainConfig field is a flag, with its help and default taken from the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from training.config import PRESETS, ConfigError, TrainConfig, read_config_file
from training.data import DataError
from training.export import ExportError
from training.pipeline import run
from training.train import DEFAULT_CHECKPOINT_EVERY, DEVICES, TrainingDiverged, TrainingInterrupted

GROUP_TITLES = {"data": "data", "model": "model", "objective": "objective", "optimisation": "optimisation",
                "evaluation": "evaluation and export"}  # fmt: skip


def _flag_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse keyword arguments for one TrainConfig field, from its type hint and metadata."""
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    kw: dict[str, Any] = {"default": None, "dest": f.name}
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        kw.update(type=item, nargs={"image_size": 2, "split_fractions": 3}.get(f.name, "+"))
        if f.name == "image_size":
            kw["metavar"] = ("H", "W")
    else:
        kw["type"] = base
    if f.metadata.get("choices"):
        kw["choices"] = f.metadata["choices"]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if default is None:  # the help text says what None means
        kw["help"] = f.metadata["help"]
    else:
        kw["help"] = f"{f.metadata['help']} (default: {default})"
    return kw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vae-train",
        description="Train a VAE, evaluate it (-ELBO and importance-sampled NLL) and export a verified "
        "model version (ONNX graphs + weights + manifest.json). Settings layer as defaults < --preset < "
        "--config FILE < flags.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="model version directory <models>/<name>/<version> (default: models/<dataset name>/1)",
    )
    seed_items = ", ".join(f"{k}={v}" for k, v in PRESETS["seed"].items())
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help=f"named starting configuration (default: default). seed = the seed text's exact setup: {seed_items}",
    )
    p.add_argument("--config", type=Path, default=None, help="JSON file of TrainConfig fields")
    p.add_argument("--force", action="store_true", help="overwrite an existing model version")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    run_group = p.add_argument_group("running")
    run_group.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where training runs: auto (CUDA where available, else the CPU), cpu, cuda, mps; evaluation, "
        "calibration and the export's checks run on the CPU (default: auto)",
    )
    run_group.add_argument(
        "--checkpoint-every",
        type=int,
        default=DEFAULT_CHECKPOINT_EVERY,
        metavar="STEPS",
        help="write a checkpoint to resume from every this many optimisation steps, besides the one written "
        f"at SIGTERM or SIGINT (default: {DEFAULT_CHECKPOINT_EVERY})",
    )
    run_group.add_argument(
        "--stream",
        action="store_true",
        help="read npy:, uncompressed idx: and folder: sources a batch at a time from their files (folder images "
        "decoded when a batch needs them), so memory does not grow with the data set; the same model as without it",
    )
    run_group.add_argument(
        "--data-workers",
        type=int,
        default=0,
        metavar="N",
        help="DataLoader worker processes reading (and decoding) the next batches while a step runs; 0: the "
        "training process reads them (default: 0)",
    )
    run_group.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run of this --out from its checkpoint (same settings; a fresh start when "
        "there is none); gives the model the uninterrupted run would have given",
    )
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(GROUP_TITLES[group])
        groups[group].add_argument("--" + f.name.replace("_", "-"), **_flag_kwargs(f, hints[f.name]))
    return p


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = dict(PRESETS[args.preset])
    if args.config is not None:
        values.update(read_config_file(args.config))
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            values[f.name] = list(value) if isinstance(value, (list, tuple)) else value
    return TrainConfig.from_dict(values)


def default_out(dataset: str) -> Path:
    name = dataset if dataset == "digits" else Path(dataset.split(":", 1)[-1]).stem.split(".")[0]
    return Path("models") / name / "1"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
        out = args.out or default_out(cfg.dataset)
        if args.data_workers < 0:
            raise ConfigError(f"--data-workers must be 0 or more, got {args.data_workers}")
        if args.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be a positive number of steps, got {args.checkpoint_every}")
        run(
            cfg,
            out,
            force=args.force,
            plots=not args.no_plots,
            progress=not args.quiet,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            device=args.device,
            stream=args.stream,
            data_workers=args.data_workers,
        )
    except TrainingInterrupted as exc:
        hint = "run the same command with --resume to continue" if exc.checkpoint else "nothing was saved"
        print(f"vae-train: interrupted: {exc}; {hint}", file=sys.stderr)
        return 128 + exc.signum
    except (ConfigError, DataError, ExportError, TrainingDiverged) as exc:
        print(f"vae-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vae-train: interrupted; no model version written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
