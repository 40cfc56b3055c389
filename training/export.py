"""Export a trained VAE to a model version directory: ONNX graphs + manifest.json (see models/README.md).

The export is verified: torch and onnxruntime are run on the same real images and the same noise, and
nothing is written if the importance-sampled log-likelihood differs by more than `tolerance` nats on
any image.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.model import VAE

MANIFEST_FORMAT = 1
PARITY_TOLERANCE_NATS = 1e-3
OPSET = 18


class ExportError(RuntimeError):
    """The export failed verification or cannot be written."""


class EncoderGraph(nn.Module):
    """x (B, D) int64 grey levels -> mu (B, L), log_var (B, L)."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.encoder = vae.encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)


class DecoderGraph(nn.Module):
    """z (B, L) -> probs (B, D, levels): each pixel's probability of every grey level."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder.probs(z)


class LogWeightsGraph(nn.Module):
    """x (B, D) int64, eps (K, B, L) -> log_w (K, B) = log p(x|z) + log p(z) - log q(z|x), z = mu + sigma eps."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.vae.log_weights(x, eps)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_ready(model: VAE) -> VAE:
    """A copy in eval mode whose prior is frozen to the Gaussian mixture the manifest records."""
    frozen = copy.deepcopy(model).eval()
    frozen.prior = model.frozen_prior()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def _onnx_export(
    module: nn.Module,
    args: tuple,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: dict[str, dict[int, str]],
) -> None:
    # The exporter restores the module's mode afterwards, recursively: a wrapper left in train mode
    # would switch the wrapped model's dropout back on.
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )


def export_graphs(model: VAE, out: Path) -> dict[str, dict[str, Any]]:
    """Write encoder.onnx, decoder.onnx and log_weights.onnx; return their contract entries."""
    latent, dim = model.cfg.latent_dim, model.dim
    x = torch.zeros(2, dim, dtype=torch.int64)
    z = torch.zeros(2, latent)
    eps = torch.zeros(3, 2, latent)
    _onnx_export(
        EncoderGraph(model),
        (x,),
        out / "encoder.onnx",
        ["x"],
        ["mu", "log_var"],
        {"x": {0: "batch"}, "mu": {0: "batch"}, "log_var": {0: "batch"}},
    )
    _onnx_export(
        DecoderGraph(model), (z,), out / "decoder.onnx", ["z"], ["probs"], {"z": {0: "batch"}, "probs": {0: "batch"}}
    )
    _onnx_export(
        LogWeightsGraph(model),
        (x, eps),
        out / "log_weights.onnx",
        ["x", "eps"],
        ["log_w"],
        {"x": {0: "batch"}, "eps": {0: "K", 1: "batch"}, "log_w": {0: "K", 1: "batch"}},
    )
    lv = model.levels
    return {
        "encoder": {
            "file": "encoder.onnx",
            "inputs": {"x": ["batch", dim, "int64"]},
            "outputs": {"mu": ["batch", latent, "float32"], "log_var": ["batch", latent, "float32"]},
        },
        "decoder": {
            "file": "decoder.onnx",
            "inputs": {"z": ["batch", latent, "float32"]},
            "outputs": {"probs": ["batch", dim, lv, "float32"]},
        },
        "log_weights": {
            "file": "log_weights.onnx",
            "inputs": {"x": ["batch", dim, "int64"], "eps": ["K", "batch", latent, "float32"]},
            "outputs": {"log_w": ["K", "batch", "float32"]},
        },
    }


def _logmeanexp(a: np.ndarray, axis: int = 0) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).mean(axis=axis, keepdims=True))).squeeze(axis)


def verify(
    model: VAE, out: Path, x: np.ndarray, k: int = 64, seed: int = 0, tolerance: float = PARITY_TOLERANCE_NATS
) -> dict[str, Any]:
    """Compare torch and onnxruntime on real images; raise ExportError beyond `tolerance` nats."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = {
        name: ort.InferenceSession(str(out / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])
        for name in ("encoder", "decoder", "log_weights")
    }
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal((k, len(x), model.cfg.latent_dim)).astype(np.float32)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        lw_torch = model.log_weights(xt, torch.from_numpy(eps)).double().numpy()
        mu_t, lv_t = (t.numpy() for t in model.encoder(xt))
        probs_t = model.decoder.probs(torch.from_numpy(mu_t)).numpy()
    lw_onnx = sess["log_weights"].run(None, {"x": x, "eps": eps})[0].astype(np.float64)
    mu_o, lv_o = sess["encoder"].run(None, {"x": x})
    probs_o = sess["decoder"].run(None, {"z": mu_t})[0]
    ll_diff = np.abs(_logmeanexp(lw_torch) - _logmeanexp(lw_onnx))
    report = {
        "images": int(len(x)),
        "K": k,
        "seed": seed,
        "tolerance_nats": tolerance,
        "max_abs_diff_log_likelihood_nats": float(ll_diff.max()),
        "max_abs_diff_encoder": float(max(np.abs(mu_t - mu_o).max(), np.abs(lv_t - lv_o).max())),
        "max_abs_diff_decoder_probs": float(np.abs(probs_t - probs_o).max()),
    }
    if not np.all(np.isfinite(lw_onnx)) or ll_diff.max() > tolerance:
        worst = int(np.nanargmax(ll_diff)) if np.all(np.isfinite(ll_diff)) else -1
        raise ExportError(
            f"export parity failed: onnxruntime and torch log-likelihoods differ by up to "
            f"{ll_diff.max():.3g} nats (image {worst}), tolerance {tolerance} nats; nothing written"
        )
    if report["max_abs_diff_encoder"] > 1e-3 or report["max_abs_diff_decoder_probs"] > 1e-4:
        raise ExportError(f"export parity failed for the encoder or decoder graph: {report}; nothing written")
    return report


def parse_version_dir(out: Path) -> tuple[str, int]:
    """models/<name>/<version>: the name and the positive integer version."""
    try:
        version = int(out.name)
    except ValueError:
        version = -1
    if version < 1:
        raise ExportError(f"{out}: the output directory must be <models>/<name>/<version> with an integer version >= 1")
    return out.parent.name, version


def write_version(
    model: VAE,
    out: Path,
    *,
    verify_images: np.ndarray,
    metrics: dict[str, Any],
    training: dict[str, Any],
    data_info: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
    calibration: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Export, verify and write the model version atomically; return the manifest."""
    name, version = parse_version_dir(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} already holds a model version; pick a new version or pass --force")
    frozen = export_ready(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        graphs = export_graphs(frozen, staging)
        check = verify(frozen, staging, verify_images)
        torch.save(
            {"config": model.cfg.to_dict(), "dim": model.dim, "levels": model.levels, "state_dict": model.state_dict()},
            staging / "checkpoint.pt",
        )
        for fname, src in (extra_files or {}).items():
            shutil.copyfile(src, staging / fname)
        log_w, means, log_vars = (t.double().numpy() for t in frozen.prior.mixture())
        h, w = data_info["image_shape"]
        manifest = {
            "format_version": MANIFEST_FORMAT,
            "name": name,
            "version": version,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "image": {"height": h, "width": w, "dim": h * w, "levels": model.levels},
            "likelihood": model.cfg.likelihood,
            "latent_dim": model.cfg.latent_dim,
            "prior": {
                "kind": model.cfg.prior,
                "family": "diagonal_gaussian_mixture",
                "components": int(len(log_w)),
                "log_weights": log_w.tolist(),
                "means": means.tolist(),
                "log_vars": log_vars.tolist(),
            },
            "graphs": graphs,
            "metrics": metrics,
            "export_check": check,
            "calibration": calibration,
            "training": training,
            "data": {k: v for k, v in data_info.items() if k != "image_shape"},
            "files": {},
        }
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def load_checkpoint(version_dir: Path) -> VAE:
    """Rebuild the trained torch model of a model version from its checkpoint and saved config."""
    from training.config import TrainConfig

    ckpt = torch.load(version_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = VAE(TrainConfig.from_dict(ckpt["config"]), ckpt["dim"], ckpt["levels"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def verify_files(version_dir: Path) -> dict[str, Any]:
    """Check every file named in the manifest against its sha256; raise ExportError on a mismatch."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    for fname, digest in manifest["files"].items():
        path = version_dir / fname
        if not path.is_file():
            raise ExportError(f"{path}: named in the manifest but missing")
        actual = sha256_file(path)
        if actual != digest:
            raise ExportError(f"{path}: sha256 {actual} does not match the manifest's {digest} (tampered?)")
    return manifest
