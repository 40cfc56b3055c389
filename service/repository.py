"""The model repository: <models_dir>/<name>/<version>/, verified, loaded, and reloaded while serving.

A version is served only after its manifest matches its digest and its schema, every file matches
its sha256, its engines are built, every graph ran once, onnxruntime reproduced the export's check
scores, and the scoring engine was chosen. A version that fails any step is reported with its reason
(in /readyz and the log) and never stops the others. `scan` is the one way in, at start-up and on
every reload (SIGHUP, POST /admin/reload, or a polling interval): a new or changed version is loaded
in full before the served set is swapped, atomically, for the new one; requests already holding a
version finish on it, so a removed or replaced version drains.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.engine import OrtEngine, ScoringChoice, check_log_likelihoods, choose_scoring_engine
from service.errors import NotReady, UnknownModel
from service.images import ImageFormat
from service.scoring import chunk_size
from service.settings import Settings
from vae_contract.formulas import (
    ALWAYS_SCORES,
    SCORE_NAMES,
    ScoreCalibration,
    expected_values,
    fp32_parity_tolerance,
    raw_scores,
    scores_from_nll,
)
from vae_contract.manifest import (
    ManifestError,
    noise_width,
    parse_version,
    read_manifest,
    valid_model_name,
    verify_files,
)
from vae_contract.maps import anomaly_maps, map_means, map_reconstructions, refilled_images, residual_maps

log = logging.getLogger("vae_serve")
WORKING_SET = 8  # tensors the size of the decoder's output alive at once in a log_weights call (about)


class ModelLoadError(RuntimeError):
    pass


def images_per_call(engine: Any, rows: int, chunk: int) -> int:
    """Images a scoring call takes: as many chunks as `rows` allows, capped by the engine's preference."""
    preferred = getattr(engine, "rows_per_call", None)
    return max(1, min(rows, preferred or rows) // chunk)


@dataclass
class ModelVersion:
    """One loaded, verified version and what serving it needs."""

    name: str
    version: int
    digest: str  # sha256 of manifest.json, which names every other file's sha256
    manifest: dict[str, Any]
    ref: OrtEngine
    scoring: ScoringChoice
    calibrations: dict[str, ScoreCalibration]
    chunk: int  # importance samples per engine call and image
    decode_rows_per_call: int
    score_rows: int  # the most rows one log_weights call may hold (engine_memory_mb)
    # op -> engine seconds a unit of its work costs (an image; an importance sample for score), for admission
    # control: timed at load, then a moving average over engine calls kept by the scheduler
    unit_seconds: dict[str, float] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)

    @property
    def score_images_per_call(self) -> int:
        """Images one scoring call takes on the scoring engine."""
        return images_per_call(self.scoring.engine, self.score_rows, self.chunk)

    @property
    def score_call_rows(self) -> int:
        """Rows (images x samples) one scoring call takes on the scoring engine."""
        return self.score_images_per_call * self.chunk

    @property
    def pixel_engine(self) -> Any:
        """The engine of anomaly-map requests: the fast path's pixel graph where it passed its check, else fp32."""
        return self.scoring.pixel_engine or self.ref

    @property
    def has_anomaly_maps(self) -> bool:
        """Whether the version carries the pixel_log_weights graph and the anomaly-map calibration."""
        return "pixel_log_weights" in self.ref.sessions and bool(
            (self.manifest.get("calibration") or {}).get("anomaly_map")
        )

    @property
    def height(self) -> int:
        return int(self.manifest["image"]["height"])

    @property
    def width(self) -> int:
        return int(self.manifest["image"]["width"])

    @property
    def channels(self) -> int:
        """1 (grey) or 3 (RGB); format 2 manifests are grey."""
        return int(self.manifest["image"].get("channels", 1))

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One image as the API shows it: (H, W) for grey, (H, W, C) for colour."""
        return (self.height, self.width) if self.channels == 1 else (self.height, self.width, self.channels)

    @property
    def image_format(self) -> ImageFormat:
        return ImageFormat.of(self.manifest["image"])

    @property
    def dim(self) -> int:
        return int(self.manifest["image"]["dim"])

    @property
    def levels(self) -> int:
        return int(self.manifest["image"]["levels"])

    @property
    def latent_dim(self) -> int:
        return int(self.manifest["latent_dim"])

    @property
    def noise_dim(self) -> int:
        """The importance noise's width (`noise_width`): latent_dim on one-layer models."""
        return noise_width(self.manifest)

    @property
    def has_llr(self) -> bool:
        """Whether the version carries the llr_log_weights graph (a model of several latent layers)."""
        return "llr_log_weights" in self.ref.sessions

    @property
    def score_names(self) -> list[str]:
        """The scores this version can give, in SCORE_NAMES's order: nll_bpd and complexity always, the others
        where calibrated."""
        return [n for n in SCORE_NAMES if n in ALWAYS_SCORES or n in self.calibrations]

    def score_values(
        self,
        nll_bpd: np.ndarray,
        x: np.ndarray,
        llr_bpd: np.ndarray | None = None,
        elbo_gap_bpd: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Every score this version gives of rows x (B, D) with these statistics (bits/dim), as its calibration
        defines them: its compressor, its validation statistics and tables; nll_bpd and complexity alone
        where it has no calibration."""
        images = x.reshape(len(x), self.height, self.width, self.channels)
        calib = self.manifest.get("calibration")
        if not calib:
            return raw_scores(nll_bpd, images)
        return scores_from_nll(
            nll_bpd,
            images,
            calib["typicality_center_bpd"],
            calib["standardize"],
            llr_bpd,
            calib.get("scores"),
            elbo_gap_bpd=elbo_gap_bpd,
            compressor=calib["compressor"],
        )

    @property
    def map_block(self) -> dict[str, Any]:
        """calibration.anomaly_map (check `has_anomaly_maps` first)."""
        return dict(self.manifest["calibration"]["anomaly_map"])

    @property
    def map_reconstructions(self) -> int:
        """How many reconstructions the version's map reads (vae_contract.maps.map_reconstructions): 0, 1
        (mu(x)) or 2 (mu(x), then mu of the image with the first pass's flagged pixels refilled)."""
        return map_reconstructions(self.map_block)

    def reconstruction_means(self, x: np.ndarray) -> np.ndarray:
        """E[x|z = mu(x)] (B, D) in levels, on the reference engine in calls of decode_rows_per_call, where no
        scheduler runs the calls (vae-score)."""
        mu = self.ref.encode(x)[0]
        step = self.decode_rows_per_call
        return np.concatenate([expected_values(self.ref.decode(mu[i : i + step])) for i in range(0, len(mu), step)])

    def refilled_images(self, expected_nll: np.ndarray, x: np.ndarray, means: np.ndarray) -> np.ndarray:
        """Rows x (B, D) with the pixels the map's first pass flags refilled, from their expected NLLs and
        reconstruction means (vae_contract.maps.refilled_images): the second reconstruction's input."""
        shape = (self.height, self.width)
        return refilled_images(x, expected_nll, means, shape, self.map_block, self.levels, self.channels)

    def map_means(self, expected_nll: np.ndarray, x: np.ndarray) -> np.ndarray | None:
        """The reconstruction (B, D) the map's residual part reads rows x against, on the reference engine
        (`reconstruction_means`), or None where the map has no residual part (vae_contract.maps.map_means)."""
        shape = (self.height, self.width)
        block = self.map_block
        return map_means(x, expected_nll, self.reconstruction_means, shape, block, self.levels, self.channels)

    def anomaly_maps(self, expected_nll: np.ndarray, x: np.ndarray, means: np.ndarray | None) -> np.ndarray:
        """Anomaly maps (B, H, W) of rows x (B, D) from their pixels' expected NLLs (B, H x W) and, where the
        map has the residual part, the reconstruction it reads (`map_means`; vae_contract.maps.anomaly_maps)."""
        residual = residual_maps(x, means, self.levels, self.channels) if means is not None else None
        return anomaly_maps(expected_nll, residual, (self.height, self.width), self.map_block)

    def score_engine(self, maps: bool, llr: bool) -> Any:
        """The engine whose log weights make a score: the fp32 reference's llr graph where the score needs LLR>k
        (its two estimates from one engine), else the pixel graph's engine with maps (one pass), else the
        scoring engine."""
        return self.ref if llr else self.pixel_engine if maps else self.scoring.engine

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    def sample_prior(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n latents from the manifest's Gaussian mixture prior -> (n, L) float32."""
        prior = self.manifest["prior"]
        log_w = np.asarray(prior["log_weights"], dtype=np.float64)
        w = np.exp(log_w - log_w.max())
        comp = rng.choice(len(w), size=n, p=w / w.sum())
        eps = rng.standard_normal((n, self.latent_dim))
        means, log_vars = np.asarray(prior["means"]), np.asarray(prior["log_vars"])
        return (means[comp] + np.exp(0.5 * log_vars[comp]) * eps).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """What /v1/models shows of a version: no paths, no calibration tables."""
        m = self.manifest
        return {
            "version": self.version,
            "digest": self.digest,
            "image": m["image"],
            "likelihood": m["likelihood"],
            "context": ((m.get("decoder") or {}).get("context") or {}).get("kind", "none"),
            "latent_dim": m["latent_dim"],
            "latent_layers": int(m.get("latent_layers", 1)),
            "prior": {"kind": m["prior"]["kind"], "components": m["prior"]["components"]},
            "metrics": m.get("metrics", {}),
            "calibrated_scores": sorted(self.calibrations),
            "default_score": (m.get("calibration") or {}).get("default_score"),
            "anomaly_maps": self.has_anomaly_maps,
            "scoring": self.scoring.describe(),
            "created": m.get("created"),
        }


def load_version(version_dir: Path, settings: Settings, name: str, version: int) -> ModelVersion:
    """Read, verify, open, warm up and check one model version; ModelLoadError says why it cannot be served."""
    try:
        manifest, digest = read_manifest(version_dir)
        verify_files(version_dir, manifest)
    except ManifestError as exc:
        raise ModelLoadError(str(exc)) from None
    graphs = {g: spec["file"] for g, spec in manifest["graphs"].items()}
    try:
        ref = OrtEngine(version_dir, graphs, settings.threads())
    except Exception as exc:  # onnxruntime raises several types for a bad graph
        raise ModelLoadError(f"onnxruntime cannot load the graphs: {exc.__class__.__name__}") from exc
    dim, levels = manifest["image"]["dim"], manifest["image"]["levels"]
    decoder = manifest.get("decoder", {})
    per_pixel = int(decoder.get("outputs_per_pixel", levels))
    feature_maps = int(decoder.get("working_floats_per_sample", 0))  # conv decoders
    budget = settings.engine_memory_mb * 1_000_000
    rows = max(1, budget // (4 * (dim * per_pixel * WORKING_SET + feature_maps)))
    chunk = chunk_size(rows)
    check_images_per_call = images_per_call(ref, rows, chunk)
    # per-level probabilities (and, for a mixture, each component's CDF at every edge) of each latent
    decode_rows = max(1, min(settings.batch_max_rows, budget // (4 * dim * levels * (per_pixel // 3 + 2))))
    try:
        t0 = time.perf_counter()
        mu, _ = ref.encode(np.zeros((2, dim), dtype=np.int64))
        t1 = time.perf_counter()
        probs = ref.decode(mu)
        t2 = time.perf_counter()
        if probs.shape != (2, dim, levels) or not np.all(np.isfinite(probs)):
            raise ModelLoadError(f"the decoder graph gives {probs.shape}, expected (2, {dim}, {levels}) finite")
        check = manifest["check"]
        x = np.asarray(check["images"], dtype=np.int64)
        got = check_log_likelihoods(ref, check, noise_width(manifest), chunk, check_images_per_call)
        t3 = time.perf_counter()
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"warm-up failed: {exc.__class__.__name__}: {exc}") from exc
    expected = np.asarray(check["log_likelihood_nats"], dtype=np.float64)
    diffs = np.abs(got - expected)
    if not np.all(np.isfinite(diffs)) or np.any(diffs > fp32_parity_tolerance(expected)):  # fp32 against fp32
        raise ModelLoadError(
            f"onnxruntime does not reproduce the export's check scores: max |diff| {np.max(diffs):.3g} nats over "
            f"{len(x)} images (tolerance 1e-3 nats + 2e-6 of the log-likelihood)"
        )
    scoring = choose_scoring_engine(settings, version_dir, manifest, ref, chunk, check_images_per_call, got)
    blocks = (manifest.get("calibration") or {}).get("scores", {})
    calibrations = {n: ScoreCalibration.from_block(n, block) for n, block in blocks.items()}
    return ModelVersion(
        name,
        version,
        digest,
        manifest,
        ref,
        scoring,
        calibrations,
        chunk,
        decode_rows,
        rows,
        # first costs for admission control until engine calls measure them (the first calls include
        # set-up, so these lean high; the fast path scores faster than the reference timed here)
        {"encode": (t1 - t0) / 2, "decode": (t2 - t1) / 2, "score": (t3 - t2) / (len(x) * int(check["K"]))},
    )


@dataclass
class ScanReport:
    loaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "unchanged": self.unchanged, "removed": self.removed, "failed": self.failed}


def found_keys(found: dict[tuple[str, int], Path]) -> set[str]:
    return {f"{name}/{version}" for name, version in found}


def _manifest_digest(version_dir: Path) -> str | None:
    try:
        return (version_dir / "manifest.json.sha256").read_text().split()[0]
    except (OSError, IndexError):
        return None


class ModelRepository:
    """The served versions, as an immutable snapshot swapped whole on every scan."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._served: dict[str, dict[int, ModelVersion]] = {}
        self.failures: dict[str, str] = {}  # "name/version" (or "repository") -> why it is not served
        self._scan_lock = threading.Lock()
        self.loaded_once = threading.Event()
        self.scans = 0

    @property
    def models(self) -> dict[str, dict[int, ModelVersion]]:
        return self._served

    @property
    def ready(self) -> bool:
        return self.loaded_once.is_set() and bool(self._served)

    def _discover(self) -> tuple[dict[tuple[str, int], Path], dict[str, str]]:
        root = self.settings.models_dir
        found: dict[tuple[str, int], Path] = {}
        problems: dict[str, str] = {}
        try:
            names = sorted(os.scandir(root), key=lambda e: e.name)
        except FileNotFoundError:
            return found, {"repository": "the models directory does not exist"}
        except OSError as exc:
            return found, {"repository": f"the models directory cannot be read ({exc.strerror})"}
        for entry in names:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            if not valid_model_name(entry.name):
                problems[entry.name] = "not a valid model name (1-64 letters, digits, '.', '_' or '-')"
                continue
            try:
                versions = sorted(os.scandir(entry.path), key=lambda e: e.name)
            except OSError as exc:
                problems[entry.name] = f"cannot list the model's versions ({exc.strerror})"
                continue
            for v in versions:
                if v.name.startswith(".") or not v.is_dir():
                    continue  # vae-train's staging directories start with "."
                number = parse_version(v.name)
                key = f"{entry.name}/{v.name}"
                if number is None:
                    problems[key] = "a version directory must be a positive integer (1, 2, ...; no sign, no leading 0)"
                    continue
                if not os.access(v.path, os.R_OK | os.X_OK):
                    problems[key] = "permission denied: the service cannot read this version directory"
                    continue
                found[(entry.name, number)] = Path(v.path)
        return found, problems

    def scan(self) -> ScanReport:
        """Rescan the repository; load new and changed versions, then swap the served set at once."""
        with self._scan_lock:
            report = ScanReport()
            found, problems = self._discover()
            served: dict[str, dict[int, ModelVersion]] = {}
            old = self._served
            for (name, version), path in sorted(found.items()):
                key = f"{name}/{version}"
                current = old.get(name, {}).get(version)
                if current is not None and _manifest_digest(path) == current.digest:
                    served.setdefault(name, {})[version] = current
                    report.unchanged.append(key)
                    continue
                started = time.monotonic()
                try:
                    mv = load_version(path, self.settings, name, version)
                except ModelLoadError as exc:
                    problems[key] = str(exc)
                    log.error("not serving %s: %s", key, exc)
                    if current is not None:  # the in-memory version stays valid; its new content is refused
                        served.setdefault(name, {})[version] = current
                        log.error("still serving the previously loaded %s (digest %s...)", key, current.digest[:12])
                    continue
                served.setdefault(name, {})[version] = mv
                report.loaded.append(key)
                log.info(
                    "serving %s (digest %s..., %d files verified, warmed up, scoring on %s) in %.1f s",
                    key,
                    mv.digest[:12],
                    len(mv.manifest["files"]),
                    mv.scoring.info.label,
                    time.monotonic() - started,
                )
            for name, versions in old.items():
                for version in versions:
                    if version not in served.get(name, {}):
                        report.removed.append(f"{name}/{version}")
                        log.info("no longer serving %s (in-flight requests finish on it)", f"{name}/{version}")
            for key, why in problems.items():
                report.failed[key] = why
                if key not in found_keys(found):
                    log.error("not serving %s: %s", key, why)
            self._served = served
            self.failures = problems
            self.scans += 1
            self.loaded_once.set()
            return report

    def default_name(self) -> str | None:
        served = self._served
        if self.settings.default_model:
            return self.settings.default_model
        if len(served) == 1:
            return next(iter(served))
        return "digits" if "digits" in served else (sorted(served)[0] if served else None)

    def get(self, name: str | None = None, version: int | None = None) -> ModelVersion:
        """The named (or default) model at the given (or newest) version."""
        served = self._served
        if not served:
            raise NotReady("no model is loaded yet; see /readyz", "model")
        name = name or self.default_name()
        if name is None or name not in served:
            known = ", ".join(sorted(served)) or "none"
            raise UnknownModel(f"no model named {name!r} is served (served: {known})", "model")
        versions = served[name]
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise UnknownModel(
                f"model {name!r} has no version {version} (served: {sorted(versions)})",
                "version",
                code="unknown_version",
            )
        return versions[version]
