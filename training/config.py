"""Training configuration: one dataclass that owns its JSON round trip and its command-line flags.

The field defaults ARE the default configuration (what `vae-train` with no flags trains); presets are
named overrides. A few fields default to "auto" (None for numbers) and are chosen from the data by
`resolve` before training: the likelihood from the number of grey levels, the batch size and the
epoch cap from the number of training images. A checkpoint or a model version stores the resolved
config, so every field here is plain JSON (str, int, float, bool, list or None).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vae_contract.formulas import SCORE_NAMES

LIKELIHOODS = ("auto", "categorical", "bernoulli", "logistic_mixture")
PRIORS = ("standard", "mog", "vamp")
INPUT_SCALES = ("unit", "raw")
OOD_SCORES = ("auto", *SCORE_NAMES)
CONTEXTS = ("auto", "none", "rows")
ARCHS = ("auto", "mlp", "conv")
PRECISIONS = ("fp32", "bf16", "fp16")
CATEGORICAL_MAX_LEVELS = 3  # "auto": categorical up to this many levels, logistic mixture above (README: measured)
CONTEXT_MIN_LEVELS = 64  # "auto": the rows context for logistic mixtures over at least this many levels (README)
MLP_LR, CONV_LR = 1e-3, 2e-3  # "auto" learning rates (the field help says why)
MAX_LATENT_LAYERS = 8
FREE_BITS = 2.0  # nats per latent layer, for models of several layers (see `free_bits`)
CONV_MIN_SIDE = 16  # "auto": convolutional networks for images at least this many pixels high and wide
CONV_COARSEST = 4  # "auto": the conv networks halve the resolution while the shorter side stays >= this
CONV_MAX_STAGES = 5  # "auto": at most this many resolutions (64x64 -> 4x4)
CONV_BASE_WIDTH = 16  # "auto": channels at full resolution, doubled at each halving ...
CONV_MAX_WIDTH = 64  # ... up to this many
MLP_STEPS = 12_000  # "auto" step budget of the mlp
MLP_MAX_BATCH, CONV_MAX_BATCH = 256, 128  # "auto" batch sizes stop doubling here (conv: fastest an image at 128)
CONV_VALUES_PER_LATENT, CONV_MAX_LATENT = 12, 64  # "auto" conv latent size (`auto_conv_latent`; the docs, defaults)
CONV_PIXEL_BUDGET = 3.5e8  # "auto" step budget of conv networks, in pixel passes (`conv_step_budget`) ...
CONV_BUDGET_IMAGES = 24_000  # ... times n_train / this or sqrt(H x W) / CONV_BUDGET_SIDE, the larger, from 1 to 2 ...
CONV_BUDGET_SIDE = 32  # ... (more steps for a large set or large images; the docs, defaults)
CONV_MEASURED_SIDE = 64  # the largest images (64x64) whose default budget was measured (`large_image_note`)
CONV_EVAL_IMAGES = 500  # "auto" test and calibration images of conv networks (their K passes dominate the run)


class ConfigError(ValueError):
    """A configuration value or file that cannot be used."""


def opt(default: Any, help: str, group: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    """A config field with its command-line help (the CLI's flags are built from these)."""
    meta = {"help": help, "group": group, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    # data
    dataset: str = opt("digits", "digits | idx:PATH | folder:PATH | npy:PATH | npz:PATH", "data")
    levels: int | None = opt(None, "requantize to N grey levels (2 for binary images); default: the source's", "data")
    image_size: list[int] | None = opt(
        None, "[H, W]: resize folder images (Lanczos; uploads are resized alike)", "data"
    )
    channels: str = opt(
        "auto", "1 (grey) or 3 (colour, RGB); auto: 3 when the images have colour", "data", ("auto", "1", "3")
    )
    classes: list[int] | None = opt(None, "keep only these digit classes (digits only)", "data")
    split_seed: int = opt(0, "seed of the train/val/test split where the source fixes none", "data")
    split_fractions: list[float] = opt([0.8, 0.1, 0.1], "train/val/test fractions of a seeded split", "data")
    # model
    likelihood: str = opt(
        "auto",
        f"per-pixel p(x|z); auto: bernoulli for 2 levels, categorical up to {CATEGORICAL_MAX_LEVELS}, "
        "logistic_mixture above",
        "model",
        LIKELIHOODS,
    )
    logistic_components: int = opt(2, "mixture components per pixel of the logistic_mixture likelihood", "model")
    context: str = opt(
        "auto",
        "rows: the logistic mixture's means also follow the pixels just above (an autoregressive p(x|z) over "
        f"rows); auto: rows for the logistic mixture from {CONTEXT_MIN_LEVELS} grey levels up, else none",
        "model",
        CONTEXTS,
    )
    prior: str = opt("mog", "p(z): standard Gaussian, learnable Gaussian mixture, VampPrior", "model", PRIORS)
    components: int = opt(32, "mixture components (mog) or pseudo-inputs (vamp)", "model")
    latent_dim: int | None = opt(
        None,
        f"latent dimensions L; auto: 16 for the mlp, for conv networks one per {CONV_VALUES_PER_LATENT} image values, "
        f"16 to {CONV_MAX_LATENT}",
        "model",
    )
    latent_layers: int = opt(
        1,
        "stochastic layers of latents, L each (a ladder VAE: top-down inference and generation); 2 or more serve "
        "the llr score (LLR>k, Havtorn et al. 2021)",
        "model",
    )
    llr_k: int = opt(
        1, "LLR>k: the bottom k latent layers take z from their conditional prior (< latent_layers)", "model"
    )
    arch: str = opt(
        "auto",
        "encoder and decoder networks: mlp (fully connected) or conv (convolutional: residual blocks, strided "
        f"down-sampling, up-sampling); auto: conv for images at least {CONV_MIN_SIDE} pixels high and wide with more "
        "than 2 levels, else mlp",
        "model",
        ARCHS,
    )
    hidden: int = opt(512, "width of the hidden layers (mlp)", "model")
    depth: int = opt(2, "hidden layers in the encoder and in the decoder (mlp)", "model")
    conv_widths: list[int] | None = opt(
        None,
        "channels of each resolution of the conv networks, full resolution first (the encoder halves the "
        "resolution from one to the next, the decoder doubles it; images are padded to a multiple of "
        f"2^(len - 1) and cropped back); auto: {CONV_BASE_WIDTH} doubling to at most {CONV_MAX_WIDTH}, halving "
        f"while the shorter side stays >= {CONV_COARSEST} ({CONV_MAX_STAGES} resolutions at most)",
        "model",
    )
    conv_blocks: int | None = opt(None, "residual blocks at each resolution of the conv networks; auto: 1", "model")
    dropout: float | None = opt(
        None,
        "dropout on the hidden layers (mlp) or inside the residual blocks (conv) while training; auto: 0.2 below "
        "10,000 training images for the mlp, else none (conv networks: none)",
        "model",
    )
    input_scale: str = opt(
        "unit", "encoder input: grey levels scaled to [0, 1], or raw level numbers", "model", INPUT_SCALES
    )
    # objective
    beta: float = opt(1.0, "weight of the KL term", "objective")
    warmup: int = opt(0, "epochs of linear KL warm-up from 0 to beta", "objective")
    free_bits: float | None = opt(
        None,
        "nats of KL per latent layer that training does not penalise (free bits, Kingma et al. 2016): below it a "
        f"layer's KL has no gradient, so upper layers do not collapse; auto: 0 for one layer, {FREE_BITS} for several",
        "objective",
    )
    iw_train: int | None = opt(
        None,
        "K_train importance samples of the training bound (1 = ELBO, >1 = IWAE); auto: 5 below 10,000 training "
        "images, 1 above (large data sets spend the compute on more epochs instead); conv networks: 1 (the "
        "decoder's cost grows with K)",
        "objective",
    )
    # optimisation
    lr: float | None = opt(
        None,
        "Adamax learning rate; auto: 1e-3 for the mlp, 2e-3 for conv networks (32x32 colour crops: 4.19 bits/dim "
        "after 608 steps at 2e-3, 4.58 after 698 at 1e-3)",
        "optimisation",
    )
    weight_decay: float = opt(0.0, "L2 weight decay", "optimisation")
    batch_size: int | None = opt(
        None,
        f"images per step; auto: 64, up to {MLP_MAX_BATCH} for large data sets ({CONV_MAX_BATCH} for conv networks)",
        "optimisation",
    )
    max_steps: int | None = opt(
        None,
        f"optimisation-step budget; the epoch cap is derived from it; auto: {MLP_STEPS:,} for the mlp; conv networks: "
        f"{CONV_PIXEL_BUDGET:.2g} pixel passes (H x W of every image a step sees) / (batch x H x W), times the "
        f"training images / {CONV_BUDGET_IMAGES:,} or sqrt(H x W) / {CONV_BUDGET_SIDE}, the larger, from 1 to 2 (on "
        "2 cores: ~8 minutes for 4,000 32x32 colour images, 16 for 48,000 28x28 grey ones, ~20 for 2,400 64x64 grey "
        "ones)",
        "optimisation",
    )
    epochs: int | None = opt(None, "epoch cap; auto: max_steps / steps per epoch", "optimisation")
    patience: int = opt(20, "stop after this many epochs without a better validation loss", "optimisation")
    ema: float = opt(0.999, "decay of the weight average (warmed up; 0 disables it)", "optimisation")
    max_minutes: float | None = opt(
        None, "wall-clock training budget (off by default: results then depend on the machine's speed)", "optimisation"
    )
    seed: int = opt(0, "seed of initialisation, batches and noise", "optimisation")
    precision: str = opt(
        "fp32",
        "arithmetic of the training steps' forward pass: fp32, or autocast to bf16 (CPU or CUDA) or fp16 (CUDA, "
        "with loss scaling); validation, evaluation, calibration and export stay float32",
        "optimisation",
        PRECISIONS,
    )
    # evaluation and export
    eval_k: int = opt(1000, "importance samples K for the test NLL and the OOD calibration", "evaluation")
    eval_chunk: int = opt(250, "importance samples per forward pass while evaluating", "evaluation")
    eval_images: int | None = opt(
        None,
        "test images for the NLL: all of a smaller test split, else a seeded subsample (0 = all); auto: 2000, "
        f"{CONV_EVAL_IMAGES} for conv networks (K decoder passes an image: 2000 at K=1000 would be ~25 minutes)",
        "evaluation",
    )
    calibration_images: int | None = opt(
        None,
        "validation images for the OOD calibration: all of a smaller split, else a seeded subsample (0 = all); "
        f"auto: 1000, {CONV_EVAL_IMAGES} for conv networks",
        "evaluation",
    )
    ood_score: str = opt(
        "auto",
        "default OOD score of /score; auto: chosen from the validation images at calibration (nll_bpd where "
        "their NLL varies independently of how compressible they are, else a complexity-aware score: "
        "training.ood.choose_default_score)",
        "evaluation",
        OOD_SCORES,
    )
    max_model_mb: float = opt(100.0, "refuse, before training, a model whose weights exceed this many MB", "evaluation")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, allowed in (
            ("likelihood", LIKELIHOODS),
            ("context", CONTEXTS),
            ("arch", ARCHS),
            ("prior", PRIORS),
            ("input_scale", INPUT_SCALES),
            ("ood_score", OOD_SCORES),
            ("precision", PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = [
            "latent_layers",
            "llr_k",
            "logistic_components",
            "components",
            "hidden",
            "depth",
            "patience",
            "eval_k",
            "eval_chunk",
        ]
        for name in positive + ["batch_size", "max_steps", "epochs", "iw_train", "latent_dim"]:
            value = getattr(self, name)
            if (value is not None or name in positive) and (type(value) is not int or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.ood_score == "llr" and self.latent_layers < 2:
            raise ConfigError("the llr score needs a model of several latent layers: add --latent-layers 2")
        if self.latent_layers > MAX_LATENT_LAYERS:
            raise ConfigError(f"latent_layers must be at most {MAX_LATENT_LAYERS}, got {self.latent_layers}")
        if self.latent_layers > 1 and self.llr_k >= self.latent_layers:
            raise ConfigError(
                f"llr_k must be below latent_layers ({self.latent_layers}): LLR>k keeps the top layers' posterior, "
                f"got {self.llr_k}"
            )
        if self.levels is not None and not 2 <= self.levels <= 256:
            raise ConfigError(f"levels must be between 2 and 256, got {self.levels}")
        if self.likelihood == "bernoulli" and self.levels not in (None, 2):
            raise ConfigError("the bernoulli likelihood needs binary images: use --levels 2")
        if self.context == "rows" and self.likelihood not in ("auto", "logistic_mixture"):
            raise ConfigError(f"--context rows needs the logistic_mixture likelihood, not {self.likelihood}")
        if self.conv_widths is not None and (
            not self.conv_widths or any(type(w) is not int or w < 1 for w in self.conv_widths)
        ):
            raise ConfigError(f"conv_widths must be one or more positive integers, got {self.conv_widths!r}")
        if self.conv_blocks is not None and (type(self.conv_blocks) is not int or self.conv_blocks < 0):
            raise ConfigError(f"conv_blocks must be a non-negative integer, got {self.conv_blocks!r}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must lie in [0, 1), got {self.ema}")
        if self.free_bits is not None and not 0 <= self.free_bits < 1e6:
            raise ConfigError(f"free_bits must be >= 0 nats, got {self.free_bits}")
        if self.beta < 0 or (self.lr is not None and self.lr <= 0) or self.warmup < 0 or self.weight_decay < 0:
            raise ConfigError("beta, warmup and weight_decay must be >= 0 and lr > 0")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"max_minutes must be positive, got {self.max_minutes}")
        for name in ("eval_images", "calibration_images"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise ConfigError(f"{name} must be a non-negative integer (0 = all), got {getattr(self, name)!r}")
        if self.max_model_mb <= 0:
            raise ConfigError(f"max_model_mb must be positive, got {self.max_model_mb}")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ConfigError(f"image_size must be [H, W] with positive sides, got {self.image_size}")
        fr = self.split_fractions
        if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise ConfigError(f"split_fractions must be three positive numbers summing to 1, got {fr}")

    # choices made from the data ----------------------------------------------------------------
    def resolve(self, levels: int, n_train: int, shape: tuple[int, ...] | list[int] | None = None) -> TrainConfig:
        """A copy with every "auto" choice made for data of `levels` grey levels, `n_train` images and images
        of `shape` (H, W) or (H, W, C); without a shape, arch "auto" keeps the mlp."""
        likelihood = self.likelihood
        if likelihood == "auto":
            if levels == 2:
                likelihood = "bernoulli"
            elif levels <= CATEGORICAL_MAX_LEVELS:
                likelihood = "categorical"
            else:
                likelihood = "logistic_mixture"
        if likelihood == "bernoulli" and levels != 2:
            raise ConfigError(
                f"the bernoulli likelihood needs binary images; the data has {levels} levels: add --levels 2"
            )
        if self.context == "rows" and likelihood != "logistic_mixture":
            raise ConfigError(
                f"--context rows needs the logistic_mixture likelihood; {levels} levels chose {likelihood}: "
                "add --likelihood logistic_mixture"
            )
        context = self.context
        if context == "auto":
            context = "rows" if likelihood == "logistic_mixture" and levels >= CONTEXT_MIN_LEVELS else "none"
        arch = self.arch
        if arch == "auto":
            # Binary images keep the mlp: on binarised MNIST it reaches 72.03 nats, while the conv default, halfway
            # through its step budget, still stood at 84.55 nats of validation loss (the mlp's test -ELBO: 77.30).
            big = shape is not None and min(shape[0], shape[1]) >= CONV_MIN_SIDE
            arch = "conv" if big and levels > 2 else "mlp"
        if arch == "conv" and shape is None:
            raise ConfigError("the conv networks need the images' shape")
        batch = self.batch_size or auto_batch_size(n_train, CONV_MAX_BATCH if arch == "conv" else MLP_MAX_BATCH)
        steps = self.max_steps or (conv_step_budget(batch, shape, n_train) if arch == "conv" and shape else MLP_STEPS)
        epochs = self.epochs or max(1, math.ceil(steps / math.ceil(n_train / batch)))
        evaluated = CONV_EVAL_IMAGES if arch == "conv" else None
        # Small data sets overfit an mlp: dropout and the tighter IWAE bound help there. Large ones need no
        # dropout (its masks cost ~20% of a step) and spend the compute better on more epochs of the plain
        # ELBO. A conv decoder is run once per importance sample and is ~10x an mlp's arithmetic: on 32x32
        # colour crops, 100 s of training reached 4.58 bits/dim with K=1 and no dropout, 4.88 with dropout,
        # 5.78 with K=5 and dropout (fewer epochs in the time; its 0.7 M weights overfit less than an mlp's 15 M).
        small = n_train < 10_000 and arch == "mlp"
        dropout = self.dropout if self.dropout is not None else (0.2 if small else 0.0)
        iw_train = self.iw_train or (5 if small else 1)
        conv: dict[str, Any] = {}
        latent = self.latent_dim
        if arch == "conv":
            assert shape is not None
            conv = {
                "conv_widths": self.conv_widths or auto_conv_widths(shape[0], shape[1]),
                "conv_blocks": self.conv_blocks if self.conv_blocks is not None else 1,
            }
            latent = latent or auto_conv_latent(math.prod(shape))
        return self.replace(
            likelihood=likelihood,
            context=context,
            batch_size=batch,
            max_steps=steps,
            epochs=epochs,
            eval_images=self.eval_images if self.eval_images is not None else evaluated or 2000,
            calibration_images=self.calibration_images if self.calibration_images is not None else evaluated or 1000,
            dropout=dropout,
            iw_train=iw_train,
            free_bits=self.free_bits if self.free_bits is not None else (FREE_BITS if self.latent_layers > 1 else 0.0),
            arch=arch,
            latent_dim=latent or 16,
            lr=self.lr or (CONV_LR if arch == "conv" else MLP_LR),
            **conv,
        )

    # JSON round trip -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(data) - field_names())
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


def auto_batch_size(n_train: int, largest: int = 256) -> int:
    """64 for small data sets, doubling with the data up to `largest` (about 200 images per step of the epoch)."""
    return int(min(largest, max(64, 2 ** round(math.log2(max(n_train, 1) / 200)))))


def conv_step_budget(batch: int, shape: Sequence[int], n_train: int) -> int:
    """Steps of a conv model: CONV_PIXEL_BUDGET pixel passes times `conv_budget_scale`. A conv step's cost follows
    the pixels it sees (each resolution costs about the same, whatever the channels), so the plain budget is about
    one training time for any image size (28x28 grey 1.9 ms an image on 2 cores, 32x32 colour 3.2 ms, batch 128),
    and the scale gives up to twice that to a large set or large images."""
    scale = conv_budget_scale(shape, n_train)
    return max(1, math.ceil(CONV_PIXEL_BUDGET * scale / (batch * shape[0] * shape[1])))


def conv_budget_scale(shape: Sequence[int], n_train: int) -> float:
    """n_train / CONV_BUDGET_IMAGES or sqrt(H x W) / CONV_BUDGET_SIDE, the larger, from 1 to 2. The plain budget is
    85 epochs of 4,000 32x32 images but only 10 of 48,000 28x28 ones, where the validation loss still fell 3.3 nats
    in the 10th (8-bit MNIST); and on 2,400 64x64 grey crops it is 1,368 steps of 64, after which the
    reconstructions were flat grey and the anomaly maps missed most blobs (pixel AUROC 0.58), against 0.92 at
    twice the steps (the docs' quality page). The cap keeps any default run within twice one training time."""
    side = math.sqrt(shape[0] * shape[1]) / CONV_BUDGET_SIDE
    return min(2.0, max(1.0, n_train / CONV_BUDGET_IMAGES, side))


def large_image_note(requested: TrainConfig, resolved: TrainConfig, shape: Sequence[int]) -> str | None:
    """What the run says when the automatic conv budget (`requested` set neither max_steps nor epochs) meets
    images larger than any it was measured on: capped at twice, it gives them fewer image passes than 64x64
    images needed, so the note names the two ways out. None otherwise."""
    side = CONV_MEASURED_SIDE
    auto = requested.max_steps is None and requested.epochs is None
    if resolved.arch != "conv" or not auto or shape[0] * shape[1] <= side * side:
        return None
    return (
        f"note: {shape[0]}x{shape[1]} images are larger than any the default step budget was measured on: it gives "
        f"them {resolved.max_steps:,} steps of {resolved.batch_size} (about twice one training time), where 2,400 "
        f"{side}x{side} crops took about 2,700 steps of 64 (half that left their reconstructions flat grey and the "
        f"anomaly maps missing most blobs). Pass --image-size {side} {side} to train on smaller copies (uploads are "
        "resized the same way), or --max-steps."
    )


def auto_conv_widths(height: int, width: int) -> list[int]:
    """Channels per resolution: CONV_BASE_WIDTH at full resolution, doubled at each halving up to
    CONV_MAX_WIDTH (each resolution then costs about the same), halving while the shorter side stays at
    least CONV_COARSEST (32x32 -> 4x4, 28x28 -> 7x7, 16x16 -> 4x4), at most CONV_MAX_STAGES resolutions."""
    stages = 1
    while stages < CONV_MAX_STAGES and min(height, width) >> stages >= CONV_COARSEST:
        stages += 1
    return [min(CONV_BASE_WIDTH << s, CONV_MAX_WIDTH) for s in range(stages)]


def auto_conv_latent(values: int) -> int:
    """Latent dimensions of a conv model: one per CONV_VALUES_PER_LATENT values of an image (H W C), from 16 to
    CONV_MAX_LATENT (28x28 grey and 32x32 colour: 64; 16x16 grey: 21)."""
    return int(min(CONV_MAX_LATENT, max(16, round(values / CONV_VALUES_PER_LATENT))))


def field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The fields a JSON config file sets (a partial config is fine); unknown keys are an error."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    unknown = sorted(set(data) - field_names())
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys: {', '.join(unknown)}")
    return data


#: The seed text's exact setup: D=64, hidden 256, latent 16, standard Gaussian prior, categorical
#: decoder over 17 levels fed raw level numbers, Adamax lr 1e-3, batch 64, early stopping with patience 20.
SEED_PRESET: dict[str, Any] = dict(
    likelihood="categorical",
    context="none",
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

PRESETS: dict[str, dict[str, Any]] = {"default": {}, "seed": SEED_PRESET}
