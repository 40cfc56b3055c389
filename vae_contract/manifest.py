"""manifest.json: its schema, the sha256 of every file it names, and its own digest.

A model version directory holds manifest.json, `manifest.json.sha256` (the manifest's own sha256,
written at export, so an edited manifest is refused like an edited graph) and the files the manifest
names with their sha256. The digest is an integrity check against corruption and accidental edits;
it is not a signature.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vae_contract.formulas import COMPRESSORS, SCORE_NAMES
from vae_contract.maps import MAP_PARTS, TWO_PARTS

MANIFEST_FORMAT = 3  # 3 added image.channels and image.preprocessing; format 2 manifests (grey) are read too
MANIFEST_FORMATS = (2, 3)
MANIFEST = "manifest.json"
DIGEST_FILE = "manifest.json.sha256"
LIKELIHOODS = ("categorical", "bernoulli", "logistic_mixture")
GRAPH_NAMES = ("encoder", "decoder", "log_weights")
_SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ManifestError(ValueError):
    """A manifest that is unreadable, malformed, or does not match its digest or its files."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_version(name: str) -> int | None:
    """A version directory's number: a positive integer written without sign or leading zeros, else None."""
    if not name.isdigit() or name.startswith("0") or not name.isascii():
        return None
    return int(name)


def valid_model_name(name: str) -> bool:
    return bool(_NAME.match(name))


# --- schema -----------------------------------------------------------------------------------

Dim = int | str  # a fixed size or the name of a dynamic axis


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=False)


class Preprocessing(_Strict):
    """What training did to the source's image files, and so what the service does to uploaded ones."""

    mode: Literal["L", "RGB"]  # the colour mode files are converted to (Pillow's convert)
    resize: list[int] | None = Field(None, min_length=2, max_length=2)  # [H, W] any file is resized to
    resample: Literal["lanczos"] | None = None
    convert: Literal["L", "RGB"] | None = None  # a conversion training made from the source's own mode


class ImageSpec(_Strict):
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    channels: Literal[1, 3] = 1
    dim: int = Field(ge=1)  # height x width x channels, the graphs' flat input (channel fastest)
    levels: int = Field(ge=2, le=256)
    preprocessing: Preprocessing | None = None  # format 3; format 2 versions are grey, never resized

    @model_validator(mode="after")
    def _dim(self) -> ImageSpec:
        if self.dim != self.height * self.width * self.channels:
            raise ValueError(
                f"dim {self.dim} is not height x width x channels = {self.height * self.width * self.channels}"
            )
        if self.preprocessing is not None and self.preprocessing.mode != ("L" if self.channels == 1 else "RGB"):
            raise ValueError(f"preprocessing.mode {self.preprocessing.mode} does not match {self.channels} channels")
        return self


class PriorSpec(_Strict):
    kind: str
    family: Literal["diagonal_gaussian_mixture"]
    components: int = Field(ge=1)
    log_weights: list[float]
    means: list[list[float]]
    log_vars: list[list[float]]


class SpanSpec(_Strict):
    """Two tensors inside a graph: the part between them may run at reduced precision."""

    input: str = Field(min_length=1)
    output: str = Field(min_length=1)


class GraphSpec(_Strict):
    file: str
    inputs: dict[str, list[Dim]]
    outputs: dict[str, list[Dim]]
    low_precision_span: SpanSpec | None = None

    @field_validator("file")
    @classmethod
    def _safe(cls, v: str) -> str:
        if not _SAFE_FILE.match(v):
            raise ValueError(f"graph file {v!r} must be a plain file name in the version directory")
        return v


class QuantileTable(_Strict):
    probs: list[float] = Field(min_length=2)
    values: list[float] = Field(min_length=2)

    @model_validator(mode="after")
    def _sorted(self) -> QuantileTable:
        if len(self.probs) != len(self.values):
            raise ValueError("probs and values differ in length")
        if any(b < a for a, b in zip(self.probs, self.probs[1:])) or any(
            b < a for a, b in zip(self.values, self.values[1:])
        ):
            raise ValueError("quantile probs and values must be ascending")
        if self.probs[0] != 0.0 or self.probs[-1] != 1.0:
            raise ValueError("quantile probs must run from 0 to 1")
        return self


class ScoreBlock(_Strict):
    units: str
    n: int = Field(ge=2)
    quantiles: QuantileTable
    thresholds: dict[str, float] = Field(default_factory=dict)
    parts: list[str] | None = None  # dose only: the calibrated statistics it combines


class MapPartBlock(_Strict):
    """One part of the anomaly map (vae_contract.maps.MAP_PARTS): its smoothing and the upper tail of its
    validation pixels' values."""

    blur_px: float = Field(ge=0)
    n: int = Field(ge=2)
    quantiles: QuantileTable


class MapRefit(_Strict):
    """calibration.anomaly_map.refit (vae_contract.maps.refilled_images): the first pass's residual part (read
    against mu(x)), the first-pass map's threshold that flags `fpr` of the validation pixels, and the fill of
    flagged values (one per image value, in levels: the validation images' mean)."""

    fpr: float = Field(gt=0, lt=1)
    threshold: float
    residual: MapPartBlock
    fill: list[int]


class MapCalibration(_Strict):
    """calibration.anomaly_map: the quantiles of every validation pixel's map value, and thresholds; `parts`
    define the map (versions calibrated before them have none, and their map is the expected NLL), and
    `refit` its second reconstruction (versions calibrated before it read the residual against mu(x))."""

    units: str
    definition: str
    parts: dict[str, MapPartBlock] | None = None
    refit: MapRefit | None = None
    images: int = Field(ge=2)
    K: int = Field(ge=1)
    n: int = Field(ge=2)  # validation pixel values the quantiles were taken from
    quantiles: QuantileTable
    thresholds: dict[str, float] = Field(default_factory=dict)


class Calibration(_Strict):
    split: str
    images: int = Field(ge=2)
    K: int = Field(ge=1)
    seed: int
    default_score: str
    default_fpr: float = Field(gt=0, lt=1)
    typicality_center_bpd: float
    standardize: dict[str, tuple[float, float]]
    compressor: str
    scores: dict[str, ScoreBlock]
    anomaly_map: MapCalibration | None = None  # versions exported before anomaly maps have none

    @model_validator(mode="after")
    def _names(self) -> Calibration:
        parts = self.anomaly_map.parts if self.anomaly_map is not None else None
        if parts is not None and set(parts) not in (set(MAP_PARTS), set(TWO_PARTS)):
            raise ValueError(
                f"calibration.anomaly_map.parts must be {list(MAP_PARTS)} (or {list(TWO_PARTS)}, as calibrated "
                f"before residual_fine), got {sorted(parts)}"
            )
        if self.anomaly_map is not None and self.anomaly_map.refit is not None and parts is None:
            raise ValueError("calibration.anomaly_map.refit needs the map's parts")
        unknown = sorted(set(self.scores) - set(SCORE_NAMES))
        if unknown:
            raise ValueError(f"unknown scores {unknown}; known: {list(SCORE_NAMES)}")
        if self.default_score not in self.scores:
            raise ValueError(f"default_score {self.default_score!r} is not calibrated")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"unknown compressor {self.compressor!r}; known: {list(COMPRESSORS)}")
        for name, block in self.scores.items():
            missing = sorted(set(block.parts or ()) - set(self.scores))
            if missing:
                raise ValueError(f"calibration.scores.{name} combines {missing}, which are not calibrated")
        for name, (_, std) in self.standardize.items():
            if not std > 0:
                raise ValueError(f"standardize[{name}] needs a positive std")
        return self


class ContextSpec(_Strict):
    """The rows context: each logistic component's means add sum_t weights[m][t] v(pixel + taps[t])."""

    kind: Literal["rows"]
    taps: list[tuple[int, int]]
    weights: list[list[float]]

    @model_validator(mode="after")
    def _causal(self) -> ContextSpec:
        if not self.taps or any(dy >= 0 for dy, _ in self.taps):
            raise ValueError("context taps must all lie in rows above the pixel (negative row offsets)")
        if not self.weights or any(len(row) != len(self.taps) for row in self.weights):
            raise ValueError("context weights must be one row per mixture component, one weight per tap")
        return self


class DecoderSpec(_Strict):
    outputs_per_pixel: int = Field(ge=1)
    working_floats_per_sample: int = Field(0, ge=0)  # a conv decoder's feature maps alive at once, per sample
    context: ContextSpec | None = None


class CheckSpec(_Strict):
    """Images with their log-likelihoods as export computed them on onnxruntime fp32 (contract noise)."""

    images: list[list[int]] = Field(min_length=1)
    K: int = Field(ge=1)
    seed: int
    log_likelihood_nats: list[float]
    engine: str

    @model_validator(mode="after")
    def _lengths(self) -> CheckSpec:
        if len(self.images) != len(self.log_likelihood_nats):
            raise ValueError("check images and log_likelihood_nats differ in length")
        return self


class Manifest(_Strict):
    format_version: Literal[2, 3]
    name: str
    version: int = Field(ge=1)
    created: str
    image: ImageSpec
    likelihood: Literal["categorical", "bernoulli", "logistic_mixture"]
    latent_dim: int = Field(ge=1)
    latent_layers: int = Field(default=1, ge=1)  # stochastic layers, latent_dim each; one before hierarchies
    llr_k: int | None = Field(default=None, ge=1)  # LLR>k's k, on models of several layers
    decoder: DecoderSpec | None = None
    prior: PriorSpec
    graphs: dict[str, GraphSpec]
    check: CheckSpec
    calibration: Calibration | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    export_check: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if not valid_model_name(self.name):
            raise ValueError(f"model name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        missing = [g for g in GRAPH_NAMES if g not in self.graphs]
        if missing:
            raise ValueError(f"graphs {missing} are missing")
        for fname, digest in self.files.items():
            if not _SAFE_FILE.match(fname) or fname in (MANIFEST, DIGEST_FILE):
                raise ValueError(f"files: {fname!r} is not a plain file name of the version directory")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"files[{fname}]: not a sha256 hex digest")
        for g, spec in self.graphs.items():
            if spec.file not in self.files:
                raise ValueError(f"graph {g}'s file {spec.file} has no sha256 in files")
        p, latent = self.prior, self.latent_dim
        if not (len(p.log_weights) == len(p.means) == len(p.log_vars) == p.components):
            raise ValueError("prior: log_weights, means and log_vars must each have `components` entries")
        if any(len(row) != latent for row in p.means + p.log_vars):
            raise ValueError(f"prior: means and log_vars rows must have latent_dim = {latent} values")
        if self.latent_layers > 1 and (self.llr_k is None or self.llr_k >= self.latent_layers):
            raise ValueError(f"llr_k must lie in [1, latent_layers) for {self.latent_layers} latent layers")
        scores = self.calibration.scores if self.calibration else {}
        if "llr" in scores and "llr_log_weights" not in self.graphs:
            raise ValueError("calibration.scores.llr needs the llr_log_weights graph")
        maps = self.calibration.anomaly_map if self.calibration else None
        if maps is not None and "pixel_log_weights" not in self.graphs:
            raise ValueError("calibration.anomaly_map needs the pixel_log_weights graph")
        dim, levels = self.image.dim, self.image.levels
        fill = maps.refit.fill if maps is not None and maps.refit is not None else None
        if fill is not None and (len(fill) != dim or min(fill) < 0 or max(fill) >= levels):
            raise ValueError(f"calibration.anomaly_map.refit.fill must be {dim} levels in 0..{levels - 1}")
        for img in self.check.images:
            if len(img) != dim or min(img) < 0 or max(img) >= levels:
                raise ValueError(f"check images must be {dim} grey levels in 0..{levels - 1}")
        return self


def noise_width(manifest: dict[str, Any]) -> int:
    """The importance noise's width: latent_dim per latent layer (eps (K, B, latent_layers x latent_dim))."""
    return int(manifest["latent_dim"]) * int(manifest.get("latent_layers", 1))


def validate_manifest(data: Any) -> Manifest:
    """The parsed manifest, or ManifestError naming the first problems found."""
    if not isinstance(data, dict):
        raise ManifestError(f"manifest.json must hold a JSON object, not {type(data).__name__}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:3]:
            where = ".".join(str(p) for p in err["loc"]) or "manifest"
            problems.append(f"{where}: {err['msg']}")
        more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise ManifestError("invalid manifest: " + "; ".join(problems) + more) from None


# --- reading and writing ----------------------------------------------------------------------


def write_manifest(version_dir: Path, manifest: dict[str, Any]) -> str:
    """Validate and write manifest.json and its digest file; return the digest."""
    validate_manifest(manifest)
    text = (json.dumps(manifest, indent=2) + "\n").encode()
    digest = sha256_bytes(text)
    for name, data in ((MANIFEST, text), (DIGEST_FILE, f"{digest}  {MANIFEST}\n".encode())):
        tmp = version_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, version_dir / name)
    return digest


def read_manifest(version_dir: Path) -> tuple[dict[str, Any], str]:
    """(manifest, its sha256) after checking it against its digest file and the schema."""
    try:
        text = (version_dir / MANIFEST).read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read {MANIFEST}: {exc.strerror or exc.__class__.__name__}") from None
    digest = sha256_bytes(text)
    try:
        expected = (version_dir / DIGEST_FILE).read_text().split()[0]
    except (OSError, IndexError):
        raise ManifestError(f"{DIGEST_FILE} is missing or unreadable: the manifest cannot be verified") from None
    if expected != digest:
        raise ManifestError(
            f"{MANIFEST} does not match {DIGEST_FILE} (sha256 {digest[:12]}..., expected {expected[:12]}...): "
            "the manifest was modified"
        )
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{MANIFEST} is not valid JSON: {exc}") from None
    validate_manifest(data)
    return data, digest


def verify_files(version_dir: Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest names against its sha256; ManifestError on the first mismatch."""
    for fname, expected in manifest["files"].items():
        path = version_dir / fname
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            raise ManifestError(f"{fname} is named in the manifest but missing") from None
        except OSError as exc:
            raise ManifestError(f"{fname}: cannot read: {exc.strerror or exc.__class__.__name__}") from None
        if actual != expected:
            raise ManifestError(
                f"{fname}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}... "
                "(the file was modified or corrupted)"
            )
