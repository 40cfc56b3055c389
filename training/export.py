"""Export a trained VAE to a model version directory: ONNX graphs, one weights file, manifest.json.

The export is verified: torch and onnxruntime run on the same real images and the same noise, and
nothing is written if the importance-sampled log-likelihood differs by more than `tolerance` nats on
any image. The three graphs and the torch checkpoint share one `weights.bin` (each distinct tensor
stored once, as ONNX external data), so a version holds its weights once. See models/README.md.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.config import TrainConfig
from training.evaluate import MAX_ELEMENTS, rows_per_pass
from training.model import CONTEXT_TAPS, VAE
from vae_contract.formulas import (
    ImportanceAccumulator,
    PixelNllAccumulator,
    fp32_parity_tolerance,
    importance_noise,
)
from vae_contract.manifest import (
    MANIFEST_FORMAT,
    ManifestError,
    parse_version,
    read_manifest,
    sha256_file,
    verify_files,
    write_manifest,
)

OPSET = 18
WEIGHTS = "weights.bin"
CHECKPOINT = "checkpoint.json"
GRAPH_FILES = {
    "encoder": "encoder.onnx",
    "decoder": "decoder.onnx",
    "log_weights": "log_weights.onnx",
    "pixel_log_weights": "pixel_log_weights.onnx",
}
#: graphs only models of several latent layers have
LLR_GRAPH = "llr_log_weights"
HIERARCHY_GRAPH_FILES = {LLR_GRAPH: "llr_log_weights.onnx"}
CHECK_IMAGES, CHECK_K, CHECK_SEED = 32, 1000, 0
INLINE_BYTES = 1024  # initializers smaller than this stay inside their graph


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
    """z (B, L) -> probs (B, D, levels): each pixel's probability of every grey level. z is the top latent
    layer's; the layers below take their conditional priors' means (`VAE.top_down_mean`)."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.probs(z)


class LogWeightsGraph(nn.Module):
    """x (B, D) int64, eps (K, B, L) -> log_w (K, B) = log p(x|z) + log p(z) - log q(z|x), z = mu + sigma eps."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.vae.log_weights(x, eps)


class PixelLogWeightsGraph(nn.Module):
    """x (B, D) int64, eps (K, B, L) -> log_w (K, B) and pixel_log_px (K, B, H x W): the log_weights graph's
    numbers before the sum over pixels (each pixel's log p(x_p|z), its channels summed), for anomaly maps."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae.pixel_terms(x, eps)


class LlrLogWeightsGraph(nn.Module):
    """x (B, D) int64, eps (K, B, layers x L) -> log_w (K, B) and log_w_llr (K, B): the full model's log importance
    weights and those of L>k (the bottom llr_k layers drawn from their conditional priors) with the same noise
    and one bottom-up pass; the llr score is their log-mean-exps' difference."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae.llr_terms(x, eps)


def export_ready(model: VAE) -> VAE:
    """A copy in eval mode whose prior is frozen to the Gaussian mixture the manifest records, its log-density
    in matrix-product form where that is exact in fp32 (see `mixture_log_prob`)."""
    frozen = copy.deepcopy(model).eval()
    frozen.prior = model.frozen_prior()
    frozen.prior.as_matmul = frozen.prior.matmul_is_exact()
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
    """Write encoder.onnx, decoder.onnx, log_weights.onnx and pixel_log_weights.onnx (weights inline); return
    their contract entries."""
    latent, noise, dim, lv = model.latent_dim, model.noise_dim, model.dim, model.levels
    x = torch.zeros(2, dim, dtype=torch.int64)
    z = torch.zeros(2, latent)
    eps = torch.zeros(3, 2, noise)
    _onnx_export(
        EncoderGraph(model),
        (x,),
        out / GRAPH_FILES["encoder"],
        ["x"],
        ["mu", "log_var"],
        {"x": {0: "batch"}, "mu": {0: "batch"}, "log_var": {0: "batch"}},
    )
    _onnx_export(
        DecoderGraph(model),
        (z,),
        out / GRAPH_FILES["decoder"],
        ["z"],
        ["probs"],
        {"z": {0: "batch"}, "probs": {0: "batch"}},
    )
    _onnx_export(
        LogWeightsGraph(model),
        (x, eps),
        out / GRAPH_FILES["log_weights"],
        ["x", "eps"],
        ["log_w"],
        {"x": {0: "batch"}, "eps": {0: "K", 1: "batch"}, "log_w": {0: "K", 1: "batch"}},
    )
    _onnx_export(
        PixelLogWeightsGraph(model),
        (x, eps),
        out / GRAPH_FILES["pixel_log_weights"],
        ["x", "eps"],
        ["log_w", "pixel_log_px"],
        {
            "x": {0: "batch"},
            "eps": {0: "K", 1: "batch"},
            "log_w": {0: "K", 1: "batch"},
            "pixel_log_px": {0: "K", 1: "batch"},
        },
    )
    span = name_low_precision_span(model, out / GRAPH_FILES["log_weights"])
    pixel_span = name_low_precision_span(model, out / GRAPH_FILES["pixel_log_weights"])
    pixels = dim // model.decoder.channels
    weights_io = {"x": ["batch", dim, "int64"], "eps": ["K", "batch", noise, "float32"]}
    extra: dict[str, dict[str, Any]] = {}
    if model.layers:
        _onnx_export(
            LlrLogWeightsGraph(model),
            (x, eps),
            out / HIERARCHY_GRAPH_FILES[LLR_GRAPH],
            ["x", "eps"],
            ["log_w", "log_w_llr"],
            {
                "x": {0: "batch"},
                "eps": {0: "K", 1: "batch"},
                "log_w": {0: "K", 1: "batch"},
                "log_w_llr": {0: "K", 1: "batch"},
            },
        )
        extra[LLR_GRAPH] = {
            "file": HIERARCHY_GRAPH_FILES[LLR_GRAPH],
            "inputs": weights_io,
            "outputs": {"log_w": ["K", "batch", "float32"], "log_w_llr": ["K", "batch", "float32"]},
        }
    return {
        "encoder": {
            "file": GRAPH_FILES["encoder"],
            "inputs": {"x": ["batch", dim, "int64"]},
            "outputs": {"mu": ["batch", latent, "float32"], "log_var": ["batch", latent, "float32"]},
        },
        "decoder": {
            "file": GRAPH_FILES["decoder"],
            "inputs": {"z": ["batch", latent, "float32"]},
            "outputs": {"probs": ["batch", dim, lv, "float32"]},
        },
        "log_weights": {
            "file": GRAPH_FILES["log_weights"],
            "inputs": weights_io,
            "outputs": {"log_w": ["K", "batch", "float32"]},
            **({"low_precision_span": span} if span else {}),
        },
        "pixel_log_weights": {
            "file": GRAPH_FILES["pixel_log_weights"],
            "inputs": weights_io,
            "outputs": {"log_w": ["K", "batch", "float32"], "pixel_log_px": ["K", "batch", pixels, "float32"]},
            **({"low_precision_span": pixel_span} if pixel_span else {}),
        },
        **extra,
    }


SPAN_INPUT, SPAN_OUTPUT = "decoder_hidden", "decoder_features"


def name_low_precision_span(model: VAE, path: Path) -> dict[str, str] | None:
    """Name the tensors of the log_weights graph that bound the span the model says may run at reduced
    precision (`VAE.low_precision_span`): the decoder network after its first layer.

    Between `decoder_hidden` (the first layer's activation) and `decoder_features` (the output layer's
    result) the graph is the decoder network's matrix products or convolutions, nearly all of its
    arithmetic: an engine may run that span in bf16 and the rest in fp32 (the service's OpenVINO path
    does). None when the model names no span.
    """
    import onnx

    span = model.low_precision_span()
    if span is None:
        return None
    graph = onnx.load(str(path))
    nodes = list(graph.graph.node)

    def layer_of(weight: str) -> onnx.NodeProto:
        found = [n for n in nodes if f"vae.{weight}" in n.input]
        if len(found) != 1 or found[0].op_type not in ("Gemm", "Conv", "MatMul"):
            raise ExportError(f"{path.name}: expected one Gemm, MatMul or Conv on {weight}, found {found}")
        return found[0]

    first = layer_of(span.start)
    acts = [n for n in nodes if first.output[0] in n.input]
    if len(acts) != 1 or acts[0].op_type != "LeakyRelu":
        raise ExportError(f"{path.name}: the decoder's first layer does not feed one activation")
    renames = {acts[0].output[0]: SPAN_INPUT, layer_of(span.end).output[0]: SPAN_OUTPUT}
    for node in nodes:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                field[i] = renames.get(name, name)
    for info in graph.graph.value_info:
        info.name = renames.get(info.name, info.name)
    onnx.save(graph, str(path))
    return {"input": SPAN_INPUT, "output": SPAN_OUTPUT}


def share_weights(out: Path, graph_files: list[str], tensors: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Move the graphs' large initializers and the torch tensors into one weights.bin, each distinct tensor once.

    The graphs keep pointing at their initializers as ONNX external data (location, offset, length);
    the returned index does the same for the torch tensors (the checkpoint).
    """
    import onnx
    from onnx import numpy_helper

    blobs: dict[str, tuple[int, int]] = {}
    with (out / WEIGHTS).open("wb") as fh:

        def put(raw: bytes) -> tuple[int, int]:
            key = hashlib.sha256(raw).hexdigest()
            if key not in blobs:
                fh.write(b"\0" * (-fh.tell() % 64))  # 64-byte alignment for memory-mapping readers
                blobs[key] = (fh.tell(), len(raw))
                fh.write(raw)
            return blobs[key]

        for fname in graph_files:
            graph = onnx.load(str(out / fname))
            for init in graph.graph.initializer:
                array = numpy_helper.to_array(init)
                if array.nbytes < INLINE_BYTES:
                    continue
                offset, length = put(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())
                for data_field in ("raw_data", "float_data", "double_data", "int32_data", "int64_data"):
                    init.ClearField(data_field)
                init.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", WEIGHTS), ("offset", str(offset)), ("length", str(length))):
                    entry = init.external_data.add()
                    entry.key, entry.value = key, value
            onnx.save(graph, str(out / fname))
        index = {}
        for name, array in tensors.items():
            a = np.ascontiguousarray(array, dtype=np.float32)
            offset, length = put(a.tobytes())
            index[name] = {"offset": offset, "length": length, "shape": list(a.shape), "dtype": "float32"}
    return index


def _logmeanexp(a: np.ndarray, axis: int = 0) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).mean(axis=axis, keepdims=True))).squeeze(axis)


def _sessions(out: Path) -> dict[str, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return {
        name: ort.InferenceSession(str(out / fname), opts, providers=["CPUExecutionProvider"])
        for name, fname in {**GRAPH_FILES, **HIERARCHY_GRAPH_FILES}.items()
        if (out / fname).exists()
    }


DECODER_PROBS_FLOOR = 1e-4  # the decoder graph's probabilities may always differ from torch's this much


def decoder_probs_check(probs_onnx: np.ndarray, probs_torch: np.ndarray, probs_f64: np.ndarray) -> dict[str, float]:
    """How far the decoder graph's per-level probabilities are from a float64 evaluation of the same model,
    against how far torch's own float32 ones are; `ok` when the graph's error is at most
    max(DECODER_PROBS_FLOOR, 2 x torch's).

    A fixed bound on |onnxruntime - torch| cannot hold for every trained model: a logistic component
    narrower than its bin (log scale near -7, which 8-bit models learn) turns a 1e-7 rounding of its mean
    into a 1e-4 change of a bin's probability, in torch's float32 as much as in onnxruntime's. Held to
    the float64 answer, the export must be as exact as the model's own float32 arithmetic, and a
    well-conditioned model still to the floor.
    """
    return _probs_report(*_probs_errors(probs_onnx, probs_torch, probs_f64))


def _probs_errors(probs_onnx: np.ndarray, probs_torch: np.ndarray, probs_f64: np.ndarray) -> tuple[float, ...]:
    """(the graph's largest error against float64, torch float32's, the largest |torch - graph|): NaN stays NaN."""
    return (
        float(np.abs(probs_onnx.astype(np.float64) - probs_f64).max()),
        float(np.abs(probs_torch.astype(np.float64) - probs_f64).max()),
        float(np.abs(probs_torch - probs_onnx).max()),
    )


def _probs_report(onnx_err: float, torch_err: float, diff: float) -> dict[str, Any]:
    bound = max(DECODER_PROBS_FLOOR, 2.0 * torch_err)
    return {
        "max_abs_diff_decoder_probs": diff,
        "decoder_probs_error_vs_float64": {
            "onnxruntime": onnx_err,
            "torch_float32": torch_err,
            "bound": bound,
        },
        "ok": bool(np.isfinite(onnx_err) and onnx_err <= bound),
    }


def verify(model: VAE, out: Path, x: np.ndarray, k: int = 64, seed: int = 0) -> dict[str, Any]:
    """Compare torch and onnxruntime on real images; raise ExportError beyond the contract's fp32 parity
    tolerance (`fp32_parity_tolerance`: 1e-3 nats plus 2e-6 of the log-likelihood) on any image, beyond
    1e-3 on the encoder's outputs, or where the decoder's probabilities fail `decoder_probs_check`."""
    sess = _sessions(out)
    eps = np.broadcast_to(importance_noise(seed, k, model.noise_dim)[:, None, :], (k, len(x), model.noise_dim))
    eps = np.ascontiguousarray(eps)
    # a few images a call: K x 256 samples of a conv decoder in one call held 18 GB (32x32 colour)
    parts = _groups(len(x), rows_per_pass(model) // k)
    parts_probs = _groups(len(x), MAX_ELEMENTS // (8 * model.dim * model.levels))  # the rollout's per-level tensors
    model_64 = copy.deepcopy(model).double()
    with torch.no_grad():
        xt = torch.from_numpy(x)
        lw_torch = np.concatenate(
            [model.log_weights(xt[s], torch.from_numpy(eps[:, s])).double().numpy() for s in parts], axis=1
        )
        mu_t, lv_t = (t.numpy() for t in model.encoder(xt))
        # checked a few images at a time: 256 images' probabilities in three precisions held 10 GB (64x64, 256 levels)
        probs_errors = [
            _probs_errors(
                sess["decoder"].run(None, {"z": mu_t[s]})[0],
                model.probs(torch.from_numpy(mu_t[s])).numpy(),
                model_64.probs(torch.from_numpy(mu_t[s]).double()).numpy(),
            )
            for s in parts_probs
        ]
    lw_onnx = np.concatenate(
        [sess["log_weights"].run(None, {"x": x[s], "eps": np.ascontiguousarray(eps[:, s])})[0] for s in parts], axis=1
    ).astype(np.float64)
    pixel_err, pixel_ratio = _pixel_graph_error(model, sess["pixel_log_weights"], x, eps, parts)
    llr_err, llr_ratio = _llr_graph_error(model, sess.get(LLR_GRAPH), x, eps, parts)
    mu_o, lv_o = sess["encoder"].run(None, {"x": x})
    ll_torch = _logmeanexp(lw_torch)
    ll_diff = np.abs(ll_torch - _logmeanexp(lw_onnx))
    tolerance = fp32_parity_tolerance(ll_torch)
    report = {
        "images": int(len(x)),
        "K": k,
        "seed": seed,
        "tolerance_nats": round(float(tolerance.max()), 6),
        "max_abs_diff_log_likelihood_nats": float(ll_diff.max()),
        "max_abs_diff_encoder": float(max(np.abs(mu_t - mu_o).max(), np.abs(lv_t - lv_o).max())),
    }
    report["max_abs_diff_pixel_nll_nats"] = pixel_err
    if model.layers:
        report["max_abs_diff_llr_log_likelihoods_nats"] = llr_err
    decoder = _probs_report(*(float(v) for v in np.max(probs_errors, axis=0)))  # as over all images at once
    decoder_ok = decoder.pop("ok")
    report.update(decoder)
    if not np.all(np.isfinite(lw_onnx)) or np.any(ll_diff > tolerance):
        worst = int(np.nanargmax(ll_diff / tolerance)) if np.all(np.isfinite(ll_diff)) else -1
        raise ExportError(
            f"export parity failed: onnxruntime and torch log-likelihoods differ by up to "
            f"{ll_diff.max():.3g} nats (image {worst}: {ll_diff[worst]:.3g} against a tolerance of "
            f"{tolerance[worst]:.3g} nats); nothing written"
        )
    if report["max_abs_diff_encoder"] > 1e-3 or not decoder_ok or not pixel_ratio <= 1.0 or not llr_ratio <= 1.0:
        raise ExportError(
            f"export parity failed for the encoder, decoder or pixel_log_weights graph: {report}; nothing written"
        )
    return report


PIXEL_NLL_FLOOR = 1e-3  # nats: one pixel's expected NLL, torch against the pixel_log_weights graph, at least


def _pixel_graph_error(
    model: VAE, session: Any, x: np.ndarray, eps: np.ndarray, parts: list[slice]
) -> tuple[float, float]:
    """(the largest |difference| of a pixel's expected NLL, torch against the pixel_log_weights graph, in nats;
    the largest of those differences over its bound): the anomaly map's input (`PixelNllAccumulator`). An
    image's bound is PIXEL_NLL_FLOOR plus its log-likelihood's fp32 parity tolerance: the pixels are averaged
    with the same importance weights, and log weights that differ within that tolerance move the average
    by up to as much (an 8-bit colour image's pixels moved 2.5e-3 nats with its log-likelihood within 0.029).
    NaN or inf give inf."""
    worst, worst_ratio = 0.0, 0.0
    for s in parts:
        e = np.ascontiguousarray(eps[:, s])
        with torch.no_grad():
            lw_t, px_t = (t.double().numpy() for t in model.pixel_terms(torch.from_numpy(x[s]), torch.from_numpy(e)))
        lw_o, px_o = session.run(None, {"x": x[s], "eps": e})
        maps = []
        for lw, px in ((lw_t, px_t), (lw_o, px_o)):
            acc = PixelNllAccumulator.empty(lw.shape[1], px.shape[2])
            acc.add(lw, px)
            maps.append(acc.expected_nll())
        diff = np.abs(maps[0] - maps[1]).max(axis=1)  # per image
        bound = PIXEL_NLL_FLOOR + fp32_parity_tolerance(_logmeanexp(lw_t))
        if not np.all(np.isfinite(diff)):
            return math.inf, math.inf
        worst, worst_ratio = max(worst, float(diff.max())), max(worst_ratio, float((diff / bound).max()))
    return worst, worst_ratio


def _llr_graph_error(
    model: VAE, session: Any, x: np.ndarray, eps: np.ndarray, parts: list[slice]
) -> tuple[float, float]:
    """(the largest |difference| in nats of either log-likelihood estimate of the llr_log_weights graph, torch against
    onnxruntime; the largest of those differences over the fp32 parity tolerance). (0, 0) for a one-layer model;
    NaN or inf give inf."""
    if not model.layers:
        return 0.0, 0.0
    worst, worst_ratio = 0.0, 0.0
    for s in parts:
        e = np.ascontiguousarray(eps[:, s])
        with torch.no_grad():
            ref = [t.double().numpy() for t in model.llr_terms(torch.from_numpy(x[s]), torch.from_numpy(e))]
        got = session.run(None, {"x": x[s], "eps": e})
        for r, g in zip(ref, got, strict=True):
            ll = _logmeanexp(r)
            diff = np.abs(ll - _logmeanexp(g.astype(np.float64)))
            if not np.all(np.isfinite(diff)):
                return math.inf, math.inf
            worst = max(worst, float(diff.max()))
            worst_ratio = max(worst_ratio, float((diff / fp32_parity_tolerance(ll)).max()))
    return worst, worst_ratio


def reference_scores(out: Path, x: np.ndarray, noise_dim: int, k: int, seed: int, rows: int) -> list[float]:
    """log p(x) in nats of each image on onnxruntime fp32, with the contract's noise: the manifest's check.
    One call holds at most `rows` (image, sample) rows (`rows_per_pass`): 250 samples of 32 images in one
    call held 15 GB for a 64x64 conv model, and the default command was killed for memory at 24 GB."""
    sess = _sessions(out)["log_weights"]
    eps = importance_noise(seed, k, noise_dim)
    chunk = max(1, min(250, k, rows))
    scores: list[float] = []
    for s in _groups(len(x), rows // chunk):
        acc = ImportanceAccumulator.empty(len(x[s]))
        for e in _groups(k, chunk):
            noise = np.broadcast_to(eps[e, None], (len(eps[e]), len(x[s]), noise_dim))
            acc.add(sess.run(None, {"x": x[s], "eps": np.ascontiguousarray(noise)})[0])
        scores += [round(float(v), 6) for v in acc.log_likelihood()]
    return scores


def _groups(n: int, size: int) -> list[slice]:
    """Slices of range(n) of `size` (at least 1) each, the last shorter: the images (or samples) of one call."""
    size = max(1, size)
    return [slice(i, i + size) for i in range(0, n, size)]


def parse_version_dir(out: Path) -> tuple[str, int]:
    """models/<name>/<version>: the name and the positive integer version."""
    version = parse_version(out.name)
    if version is None:
        raise ExportError(
            f"{out}: the output directory must be <models>/<name>/<version> with an integer version >= 1 "
            "(no sign or leading zeros)"
        )
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
        state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        index = share_weights(staging, [g["file"] for g in graphs.values()], state)
        check = verify(frozen, staging, verify_images)
        check["prior_as_matmul"] = frozen.prior.as_matmul
        (staging / CHECKPOINT).write_text(
            json.dumps(
                {
                    "config": model.cfg.to_dict(),
                    "dim": model.dim,
                    "levels": model.levels,
                    "image_shape": list(data_info["image_shape"]),
                    "weights": WEIGHTS,
                    "tensors": index,
                },
                indent=1,
            )
            + "\n"
        )
        for fname, src in (extra_files or {}).items():
            shutil.copyfile(src, staging / fname)
        check_images = verify_images[:CHECK_IMAGES]
        log_w, means, log_vars = (t.double().numpy() for t in frozen.prior.mixture())
        manifest = {
            "format_version": MANIFEST_FORMAT,
            "name": name,
            "version": version,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "image": image_spec(data_info, model.levels),
            "likelihood": model.cfg.likelihood,
            "decoder": decoder_spec(model),
            "latent_dim": model.cfg.latent_dim,
            **({"latent_layers": model.cfg.latent_layers, "llr_k": model.cfg.llr_k} if model.layers else {}),
            "prior": {
                "kind": model.cfg.prior,
                "family": "diagonal_gaussian_mixture",
                "components": int(len(log_w)),
                "log_weights": log_w.tolist(),
                "means": means.tolist(),
                "log_vars": log_vars.tolist(),
            },
            "graphs": graphs,
            "weights": {
                "file": WEIGHTS,
                "bytes": (staging / WEIGHTS).stat().st_size,
                "parameters": int(sum(p.numel() for p in model.parameters())),
            },
            "check": {
                "images": check_images.astype(int).tolist(),
                "K": CHECK_K,
                "seed": CHECK_SEED,
                "log_likelihood_nats": reference_scores(
                    staging, check_images, model.noise_dim, CHECK_K, CHECK_SEED, rows_per_pass(model)
                ),
                "engine": "onnxruntime fp32 (CPUExecutionProvider)",
            },
            "metrics": metrics,
            "export_check": check,
            "calibration": calibration,
            "training": training,
            "data": {k: v for k, v in data_info.items() if k not in ("image_shape", "preprocessing")},
            "files": {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()},
        }
        write_manifest(staging, manifest)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp made it 0700: other users (a non-root server) must read it
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except ManifestError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"the manifest export produced is invalid: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def decoder_spec(model: VAE) -> dict[str, Any]:
    """The manifest's `decoder` entry: outputs per pixel, and the rows context's taps and weights if any:
    one row of T tap weights per (component, channel, channel of the taps), M C C rows (M for grey)."""
    spec: dict[str, Any] = {"outputs_per_pixel": model.decoder.out_per_pixel}
    if model.decoder.working_floats:
        spec["working_floats_per_sample"] = model.decoder.working_floats
    if model.decoder.context:
        weights = model.decoder.context_weights.detach().double().reshape(-1, len(CONTEXT_TAPS))
        spec["context"] = {
            "kind": "rows",
            "taps": [list(t) for t in CONTEXT_TAPS],
            "weights": weights.numpy().round(6).tolist(),
        }
    return spec


def image_spec(data_info: dict[str, Any], levels: int) -> dict[str, Any]:
    """The manifest's image section: the shape the graphs take (H, W, C; D = H W C, channel fastest), the
    levels, and the preprocessing training applied to the source's files, which the service applies
    to uploaded files alike (conversion to grey or colour, resize)."""
    h, w, *rest = data_info["image_shape"]
    c = rest[0] if rest else 1
    pre = data_info.get("preprocessing") or {}
    preprocessing = {
        "mode": "L" if c == 1 else "RGB",
        "resize": pre.get("resize"),
        "resample": pre.get("resample", "lanczos") if pre.get("resize") else None,
        "convert": pre.get("convert"),
    }
    return {"height": h, "width": w, "channels": c, "dim": h * w * c, "levels": levels, "preprocessing": preprocessing}


def load_checkpoint(version_dir: Path) -> VAE:
    """Rebuild the trained torch model of a model version from checkpoint.json and weights.bin."""
    try:
        ckpt = json.loads((version_dir / CHECKPOINT).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{version_dir}: cannot read {CHECKPOINT}: {exc}") from exc
    blob = np.memmap(version_dir / ckpt["weights"], dtype=np.uint8, mode="r")
    state = {}
    for name, t in ckpt["tensors"].items():
        raw = blob[t["offset"] : t["offset"] + t["length"]]
        state[name] = torch.from_numpy(np.frombuffer(raw.tobytes(), dtype=t["dtype"]).reshape(t["shape"]).copy())
    # versions written before the rows context or the conv networks existed have no "context" or "arch"
    # in their resolved config
    config = {"context": "none", "arch": "mlp", **ckpt["config"]}
    shape = ckpt.get("image_shape")
    model = VAE(TrainConfig.from_dict(config), ckpt["dim"], ckpt["levels"], tuple(shape) if shape else None)
    model.load_state_dict(state)
    return model.eval()


def read_verified(version_dir: Path) -> dict[str, Any]:
    """The manifest after checking its digest, its schema and every file's sha256; ExportError otherwise."""
    try:
        manifest, _ = read_manifest(version_dir)
        verify_files(version_dir, manifest)
    except ManifestError as exc:
        raise ExportError(f"{version_dir}: {exc}") from exc
    return manifest


def _map_calibration_or_none(model: VAE, calibration: dict[str, Any]) -> dict[str, Any] | None:
    """The anomaly-map calibration of an older version, or None (with a warning) when its data is gone."""
    from training.data import DataError
    from training.ood import map_calibration_for

    try:
        return map_calibration_for(model, calibration)
    except (DataError, OSError) as exc:
        print(f"warning: no anomaly-map calibration ({exc}); the version serves no anomaly maps", file=sys.stderr)
        return None


def _recalibrated(model: VAE, calibration: dict[str, Any]) -> dict[str, Any]:
    from training.data import DataError
    from training.ood import recalibrate

    try:
        return recalibrate(model, calibration)
    except (DataError, OSError) as exc:
        raise ExportError(f"cannot recalibrate: the training data cannot be read again ({exc})") from exc


def reexport(
    version_dir: Path, out: Path | None = None, force: bool = False, recalibrate: bool = False
) -> dict[str, Any]:
    """Export a version's torch checkpoint again with this exporter (into `out`, or in place).

    Graphs, weights and check scores are written anew and verified as at training time (on the
    manifest's check images); metrics, calibration, training and data records and the other files
    (plots, metrics.jsonl, OOD reports) carry over. For versions exported by an older vae-train: the
    model stays the same function, its graphs may run faster, and a version calibrated before anomaly
    maps gains their calibration when its training data can be read again (same validation images).
    `recalibrate` computes the whole calibration block again on those images (K and seed as before),
    so that the version gains the scores added since; ExportError when the data cannot be read.
    """
    manifest = read_verified(version_dir)
    model = load_checkpoint(version_dir)
    target = out or version_dir
    if target.resolve() == version_dir.resolve():
        force = True
    own = {CHECKPOINT, WEIGHTS, *GRAPH_FILES.values(), *HIERARCHY_GRAPH_FILES.values()}
    image = manifest["image"]
    calibration = manifest.get("calibration")
    if calibration and recalibrate:
        calibration = _recalibrated(model, calibration)
    elif calibration and not calibration.get("anomaly_map"):
        calibration = dict(calibration, anomaly_map=_map_calibration_or_none(model, calibration))
    # write_version copies the extra files into its staging directory before it replaces `target`,
    # so they can be read from `version_dir` even when re-exporting in place
    written = write_version(
        model,
        target,
        verify_images=np.asarray(manifest["check"]["images"], dtype=np.int64),
        metrics=manifest.get("metrics", {}),
        training=manifest.get("training", {}),
        data_info={
            **manifest.get("data", {}),
            "image_shape": (image["height"], image["width"], image.get("channels", 1)),
            "preprocessing": image.get("preprocessing", {}),
        },
        extra_files={f: version_dir / f for f in manifest["files"] if f not in own},
        calibration=calibration,
        force=force,
    )
    carried = {k: v for k, v in manifest.items() if k not in written}
    if carried:  # records added after training (vae-ood-eval's summary)
        written.update(carried)
        write_manifest(target, written)
    return written


def reexport_main(argv: list[str] | None = None) -> int:
    """`vae-export VERSION_DIR [--out DIR]`: re-export a model version from its checkpoint."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="vae-export", description=reexport.__doc__.split("\n")[0])
    p.add_argument("version_dir", type=Path, help="a model version directory, e.g. models/digits/1")
    p.add_argument("--out", type=Path, default=None, help="write here instead of replacing VERSION_DIR")
    p.add_argument("--force", action="store_true", help="overwrite --out if it holds a version")
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="calibrate the OOD scores again on the same validation images (needs the training data), so the "
        "version gains the scores added since it was trained",
    )
    args = p.parse_args(argv)
    try:
        m = reexport(args.version_dir, args.out, args.force, args.recalibrate)
    except ExportError as exc:
        print(f"vae-export: {exc}", file=sys.stderr)
        return 1
    print(
        f"exported {m['name']}/{m['version']} to {args.out or args.version_dir}: max |torch - onnxruntime| "
        f"{m['export_check']['max_abs_diff_log_likelihood_nats']:.2g} nats on {m['export_check']['images']} images"
    )
    return 0
