"""The convolutional default on 32x32 colour images: training throughput against a plain PyTorch loop of the
same network and loss, and scoring at K=1000 on onnxruntime fp32 and on the fast path the service picks
(OpenVINO bf16 where the CPU has bf16 instructions), with the fp32 path's share of the machine's
convolution rate and the fast path's parity with fp32 (nats per image). Where loading refuses the bf16
engine for its parity, that engine is built anyway and its speed and parity reported, labelled refused.

The convolution rate is onnxruntime's fp32 Conv on one representative layer (3x3, 64 -> 64 channels on
16x16 maps, a batch of 256), taken in the same interleaved rounds as the scoring rates; a graph's
convolution FLOPs are counted in torch (forward hooks on every Conv/Linear layer, multiply-adds x 2),
the encoder's once an image and the decoder's once an importance sample.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 32


def colour_images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """n 8-bit RGB crops (size x size) of scikit-learn's sample photos, regions 2-8x larger box-downscaled
    (scripts/make_patches.py --colour --scale 2 8); no download."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[i % len(photos)]
        r = int(rng.integers(2 * size, 8 * size))
        y, x = rng.integers(0, photo.shape[0] - r), rng.integers(0, photo.shape[1] - r)
        out[i] = np.asarray(Image.fromarray(photo[y : y + r, x : x + r]).resize((size, size), Image.Resampling.BOX))
    return out


def conv_runner(threads: int, n: int = 256, c: int = 64, hw: int = 16) -> tuple[Any, float]:
    """A call of onnxruntime's fp32 Conv (3x3, c -> c channels, hw x hw maps, padding 1, batch n), its FLOPs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((c, c, 3, 3), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["a", "w"], ["y"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, c, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, c, hw, hw])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts)
    a = np.random.default_rng(1).standard_normal((n, c, hw, hw), dtype=np.float32)

    def run() -> None:
        sess.run(None, {"a": a})

    run()
    return run, 2.0 * n * c * hw * hw * c * 9


def layer_flops(model: Any, dim: int) -> dict[str, float]:
    """FLOPs of the model's Conv, ConvTranspose and Linear layers for one image (encoder) and one sample of z
    (decoder), counted from a forward pass with hooks."""
    import torch
    from torch import nn

    counts = {"encoder": 0.0, "decoder": 0.0}

    def hook(part: str) -> Any:
        def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if isinstance(module, nn.Linear):
                macs = output.numel() * module.in_features
            elif isinstance(module, nn.ConvTranspose2d):  # each input value meets out_channels x kernel weights
                macs = inputs[0].numel() * module.out_channels // module.groups * int(np.prod(module.kernel_size))
            else:  # Conv2d: each output value sums in_channels x kernel products
                macs = output.numel() * module.in_channels // module.groups * int(np.prod(module.kernel_size))
            counts[part] += 2.0 * macs

        return count

    handles = [
        m.register_forward_hook(hook(part))
        for part, net in (("encoder", model.encoder), ("decoder", model.decoder))
        for m in net.modules()
        if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d)
    ]
    try:
        with torch.inference_mode():
            x = torch.zeros(1, dim, dtype=torch.int64)
            model.log_weights(x, torch.zeros(1, 1, model.cfg.latent_dim))
    finally:
        for h in handles:
            h.remove()
    return {"encoder_per_image": counts["encoder"], "decoder_per_sample": counts["decoder"]}


REFUSED = "openvino bf16 (refused at load)"


def refused_fast_path(version: Path, mv: Any, threads: int) -> Any | None:
    """The OpenVINO bf16 engine (the manifest's low-precision span) that loading refused for failing its parity
    check, built anyway so that its speed and parity can be reported; None where loading did not refuse one."""
    if "parity check failed" not in (mv.scoring.fallback or ""):
        return None
    from service.engine import OpenVinoEngine

    spec = mv.manifest["graphs"]["log_weights"]
    return OpenVinoEngine(version / spec["file"], "bf16", threads, spec.get("low_precision_span"))


def trained_version(root: Path, images: np.ndarray, epochs: int = 1) -> Path:
    """The default model for these images, trained `epochs` epochs and exported (bench.training.quick_version)."""
    from bench.training import quick_version
    from training.config import TrainConfig
    from training.data import ImageData

    n = len(images)
    data = ImageData(images[: n - 400], images[n - 400 : n - 200], images[n - 200 :], 256, "bench")
    cfg = TrainConfig(epochs=epochs, patience=epochs + 1).resolve(256, len(data.train), data.shape)
    return quick_version(root / "colour32" / "1", data, cfg)


def measure(threads: int, quick: bool = False) -> dict[str, Any]:
    import torch

    from bench import inprocess, training
    from service.scoring import score_direct
    from training.export import load_checkpoint

    n_train = 2000 if quick else 5000
    images = colour_images(n_train + 2000)
    out: dict[str, Any] = {"data": f"{SIZE}x{SIZE} RGB crops of the sample photos (bench.conv.colour_images)"}
    turns = 1 if quick else 3
    out["training"] = training.measure(n_train=n_train, epochs=1 if quick else 2, turns=turns, images=images)
    k = 1000
    with tempfile.TemporaryDirectory() as tmp:
        version = trained_version(Path(tmp), images[:2400])
        mv = inprocess.load(version, threads)
        model = load_checkpoint(version)
        flops = layer_flops(model, mv.dim)
        per_image = flops["encoder_per_image"] + k * flops["decoder_per_sample"]
        x = images[-64:].reshape(64, -1).astype(np.int64)
        engines = {"onnxruntime fp32": mv.ref}
        if mv.scoring.engine is not mv.ref:
            engines[mv.scoring.info.label] = mv.scoring.engine
        refused = refused_fast_path(version, mv, torch.get_num_threads() if threads == 0 else threads)
        if refused is not None:
            engines[REFUSED] = refused
        from service.repository import images_per_call

        rates: dict[str, dict[str, float]] = {}
        for b in [1, 16]:
            xb = x[:b]
            fns: dict[str, tuple[Any, float]] = {}
            for name, engine in engines.items():

                def served(e: Any = engine, xb: np.ndarray = xb) -> None:
                    per_call = images_per_call(e, mv.score_rows, mv.chunk)
                    score_direct(e, xb, k, [0] * len(xb), mv.latent_dim, mv.chunk, per_call)

                served()
                fns[name] = (served, len(xb))
            fns["conv_flops"] = conv_runner(torch.get_num_threads() if threads == 0 else threads)
            measured = inprocess.interleaved_rates(fns, rounds=3 if quick else 5)
            conv_rate = measured.pop("conv_flops")
            row = {name: round(v, 3) for name, v in measured.items()}
            row["conv_gflops"] = round(conv_rate / 1e9, 1)
            row["fp32_fraction_of_conv_rate"] = round(measured["onnxruntime fp32"] * per_image / conv_rate, 3)
            for name, v in measured.items():
                if name != "onnxruntime fp32":
                    row[f"{name} / fp32"] = round(v / measured["onnxruntime fp32"], 2)
            rates[str(b)] = row
        out["scoring"] = {
            "K": k,
            "model": {"arch": model.cfg.arch, "likelihood": model.cfg.likelihood, "context": model.cfg.context},
            "mflop_per_image": round(per_image / 1e6, 1),
            "flops": {name: round(v / 1e6, 3) for name, v in flops.items()} | {"units": "MFLOP"},
            "images_per_s": rates,
            "fast_path": mv.scoring.describe(),
        }
        out["fast_path_parity"] = inprocess.fast_path_parity(version, x, k, threads)
        if refused is not None:
            out["refused_fast_path_parity"] = inprocess.parity(mv.ref, refused, REFUSED, mv, x[:32], k)
    return out
