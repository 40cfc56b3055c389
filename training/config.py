"""Training configuration: one dataclass that owns its JSON round trip, plus named presets.

A checkpoint or a model version rebuilds its networks from the config saved beside it, so every
field here is plain JSON (str, int, float, bool, list or None).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LIKELIHOODS = ("categorical", "bernoulli")
PRIORS = ("standard", "mog", "vamp")
INPUT_SCALES = ("unit", "raw")
OOD_SCORES = ("nll_bpd", "complexity", "typicality", "combined")


class ConfigError(ValueError):
    """A configuration value or file that cannot be used."""


@dataclass
class TrainConfig:
    # data
    dataset: str = "digits"
    levels: int | None = None  # requantize to this many grey levels; None keeps the source's
    image_size: list[int] | None = None  # [H, W] resize for folder sources
    classes: list[int] | None = None  # keep only these labels (digits only)
    split_seed: int = 0  # seeded split for sources that have no fixed one
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    # model
    likelihood: str = "categorical"
    prior: str = "standard"
    components: int = 16  # mixture components (mog) or pseudo-inputs (vamp)
    latent_dim: int = 16
    hidden: int = 256
    depth: int = 2  # hidden layers in the encoder and in the decoder
    dropout: float = 0.0  # dropout on the hidden layers while training
    input_scale: str = "unit"  # encoder input: "unit" ([0, 1]) or "raw" (grey level numbers)
    # objective
    beta: float = 1.0
    warmup: int = 0  # epochs of linear KL warm-up from 0 to beta
    iw_train: int = 1  # K_train: 1 is the ELBO, >1 the importance-weighted bound
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 1000
    patience: int = 20
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0 disables it
    max_minutes: float | None = None  # wall-clock budget for training, early stopping aside
    seed: int = 0
    # evaluation and export
    eval_k: int = 1000  # importance samples for the test NLL
    eval_chunk: int = 100  # importance samples per forward pass while evaluating
    ood_score: str = "combined"  # the default OOD score /score uses (see models/README.md)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.prior not in PRIORS:
            raise ConfigError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        positive = {
            "components": self.components,
            "latent_dim": self.latent_dim,
            "hidden": self.hidden,
            "depth": self.depth,
            "iw_train": self.iw_train,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "patience": self.patience,
            "eval_k": self.eval_k,
            "eval_chunk": self.eval_chunk,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.input_scale not in INPUT_SCALES:
            raise ConfigError(f"input_scale must be one of {INPUT_SCALES}, got {self.input_scale!r}")
        if self.ood_score not in OOD_SCORES:
            raise ConfigError(f"ood_score must be one of {OOD_SCORES}, got {self.ood_score!r}")
        if self.levels is not None and not 2 <= self.levels <= 256:
            raise ConfigError(f"levels must be between 2 and 256, got {self.levels}")
        if self.likelihood == "bernoulli" and self.levels not in (None, 2):
            raise ConfigError("the bernoulli likelihood needs binary images: use --levels 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must lie in [0, 1), got {self.ema}")
        if self.beta < 0 or self.lr <= 0 or self.warmup < 0 or self.weight_decay < 0:
            raise ConfigError("beta, warmup and weight_decay must be >= 0 and lr > 0")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ConfigError(f"image_size must be [H, W] with positive sides, got {self.image_size}")
        fr = self.split_fractions
        if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise ConfigError(f"split_fractions must be three positive numbers summing to 1, got {fr}")

    # JSON round trip -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_config_file(path))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The fields a JSON config file sets (a partial config is fine); unknown keys are an error."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys: {', '.join(unknown)}")
    return data


#: The seed text's exact setup: D=64, hidden 256, latent 16, standard Gaussian prior, categorical
#: decoder over 17 levels, Adamax lr 1e-3, batch 64, early stopping with patience 20.
SEED_PRESET: dict[str, Any] = dict(
    likelihood="categorical",
    prior="standard",
    latent_dim=16,
    hidden=256,
    depth=2,
    dropout=0.0,
    input_scale="raw",
    beta=1.0,
    warmup=0,
    iw_train=1,
    lr=1e-3,
    weight_decay=0.0,
    batch_size=64,
    patience=20,
    ema=0.0,
)

#: Our default, chosen by the sweep recorded in README.md ("Default model"): a learnable mixture prior,
#: the IWAE bound with K_train=5, dropout, wider layers and an EMA of the weights, capped at 3 minutes.
DEFAULT_PRESET: dict[str, Any] = dict(
    SEED_PRESET,
    prior="mog",
    components=32,
    hidden=512,
    dropout=0.2,
    iw_train=5,
    ema=0.999,
    max_minutes=3.0,
)

PRESETS: dict[str, dict[str, Any]] = {"seed": SEED_PRESET, "default": DEFAULT_PRESET}
