"""In-process figures: the machine's fp32 matmul rate, and scoring throughput at K=1000 on each engine.

Every engine scores through the service's own scoring code (service.scoring.score_direct: the contract's
noise, the version's chunk size), so the numbers are what /score computes, without HTTP.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def matmul_runner(m: int = 8192, k: int = 1024, n: int = 1024, threads: int = 0) -> tuple[Any, float]:
    """A call of onnxruntime's fp32 MatMul (the library the fp32 path runs on) on one large GEMM, and its FLOPs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["c"])],
        "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts)
    a = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)

    def run() -> None:
        sess.run(None, {"a": a})

    run()
    return run, 2.0 * m * k * n


def matmul_rate(m: int = 8192, k: int = 1024, n: int = 1024, threads: int = 0, seconds: float = 3.0) -> float:
    """fp32 FLOP/s of onnxruntime's MatMul on one large GEMM."""
    run, flops = matmul_runner(m, k, n, threads)
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        run()
        runs += 1
    return flops * runs / (time.perf_counter() - t0)


def interleaved_rates(
    fns: dict[str, tuple[Any, float]], rounds: int = 7, turn_s: float = 0.6, pause_s: float = 0.1
) -> dict[str, float]:
    """Units/s of each (function, units per call), measured in rounds in which every function takes a turn
    of at least `turn_s` (whole calls), after a pause that lets the previous library's worker threads go
    idle; each rate is the median over its turns. The machines here change speed by tens of percent
    within seconds: taking turns lets every function see the same machine, so the ratios hold."""
    per_turn: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, units) in fns.items():
            time.sleep(pause_s)
            calls, t0 = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - t0 < turn_s:
                fn()
                calls += 1
            per_turn[name].append(units * calls / (time.perf_counter() - t0))
    return {name: float(np.median(rates)) for name, rates in per_turn.items()}


def matrix_products(version_dir: Path) -> list[tuple[str, str, str, int, int]]:
    """(node, op, weight, outputs, inputs) of each Gemm/MatMul in log_weights.onnx that multiplies by a
    weight of the graph, in graph order (Gemm weights are (out, in), as torch's Linear exports them)."""
    import onnx

    model = onnx.load(str(version_dir / "log_weights.onnx"), load_external_data=False)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    return [
        (node.name, node.op_type, node.input[1], *shapes[node.input[1]])
        for node in model.graph.node
        if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and len(shapes.get(node.input[1], [])) == 2
    ]


def graph_flops(version_dir: Path, k: int) -> dict[str, float]:
    """MatMul/Gemm FLOPs of log_weights.onnx for one image and K samples, counted from the graph's weights:
    the encoder's layers run once per image, the decoder's once per sample."""
    enc = dec = 0.0
    for _, _, weight, n_out, n_in in matrix_products(version_dir):
        if ".encoder." in weight:
            enc += 2.0 * n_out * n_in
        else:
            dec += 2.0 * n_out * n_in
    return {"encoder_per_image": enc, "decoder_per_sample": dec, "per_image": enc + k * dec}


def largest_decoder_layer(version_dir: Path) -> tuple[int, int]:
    """(inputs, outputs) of the decoder's matrix product with the most FLOPs in log_weights.onnx: the GEMM
    shape that sets the fp32 path's speed, run once per importance sample."""
    decoder = [(n_in, n_out) for _, _, w, n_out, n_in in matrix_products(version_dir) if ".encoder." not in w]
    return max(decoder, key=lambda shape: shape[0] * shape[1], default=(0, 0))


INT8 = "onnxruntime int8"


def int8_engine(version_dir: Path, threads: int, out_dir: Path) -> tuple[Any, list[str]]:
    """onnxruntime on log_weights.onnx with the decoder's matrix products after its first (the span the
    bf16 path runs in bf16) quantized to int8 by onnxruntime's dynamic quantization: int8 weights per
    output channel, activations quantized per call. A candidate measured by the bench, not served."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from service.engine import OrtEngine

    decoder = [name for name, op, w, _, _ in matrix_products(version_dir) if op == "Gemm" and ".decoder." in w]
    nodes = [f"{name}_MatMul" for name in decoder[1:]]  # the quantizer turns each Gemm into MatMul + Add
    quantize_dynamic(
        version_dir / "log_weights.onnx",
        out_dir / "log_weights_int8.onnx",
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_quantize=nodes,
    )
    return OrtEngine(out_dir, {"log_weights": "log_weights_int8.onnx"}, threads), decoder[1:]


def load(version_dir: Path, threads: int) -> Any:
    """The version as the service loads it (engines, parity check, fast-path choice), with `threads` a call."""
    from service.repository import load_version
    from service.settings import Settings

    settings = Settings(models_dir=version_dir.parent.parent, intra_op_threads=threads)
    return load_version(version_dir, settings, version_dir.parent.name, int(version_dir.name))


def scoring_rates(
    version_dir: Path, x: np.ndarray, k: int, batches: list[int], threads: int, int8_dir: Path | None = None
) -> dict[str, Any]:
    """Images/s at K for each batch size on: onnxruntime fp32, the fast path chosen at load, an int8
    candidate (with `int8_dir` to write its graph in; its parity on x too), and eager PyTorch."""
    import torch

    from service.repository import images_per_call
    from training.export import load_checkpoint

    mv = load(version_dir, threads)
    engines = {"onnxruntime fp32": mv.ref}
    if mv.scoring.engine is not mv.ref:
        engines[mv.scoring.info.label] = mv.scoring.engine
    int8: dict[str, Any] = {}
    if int8_dir is not None:
        engine, quantized = int8_engine(version_dir, threads, int8_dir)
        engines[INT8] = engine
        int8 = {"quantized": quantized, "parity": parity(mv.ref, engine, INT8, mv, x, k)}
    torch.set_num_threads(threads)
    model = load_checkpoint(version_dir)
    out: dict[str, Any] = {
        "K": k,
        "chunk": mv.chunk,
        "images_per_call": {name: images_per_call(e, mv.score_rows, mv.chunk) for name, e in engines.items()},
        "rates": {},
        "matmul_gflops": {},  # measured in the same rounds as each batch's rates
    }
    # The same MatMul at the shape the fp32 path multiplies most: its calls' rows by the decoder's largest
    # layer. On cache-starved machines this small GEMM runs faster than the large reference one, so the
    # share against it says how far the fp32 path is from its own matrix products' speed.
    n_in, n_out = largest_decoder_layer(version_dir)
    rows = images_per_call(mv.ref, mv.score_rows, mv.chunk) * mv.chunk
    out["layer_matmul"] = {"shape": f"{rows}x{n_in} @ {n_in}x{n_out}", "gflops": {}}
    layer = matmul_runner(rows, n_in, n_out, threads=torch.get_num_threads())
    for b in batches:
        row = _rates_for_batch(engines, model, mv, x[:b], k, layer)
        out["matmul_gflops"][str(b)] = round(row.pop("matmul_flops") / 1e9, 1)
        out["layer_matmul"]["gflops"][str(b)] = round(row.pop("layer_matmul_flops") / 1e9, 1)
        out["rates"][str(b)] = {name: round(v, 2) for name, v in row.items()}
    out["engines"] = list(engines) + ["pytorch eager fp32"]
    out["fast_path"] = mv.scoring.describe()
    if int8:
        out["int8"] = int8
    return out


def _rates_for_batch(
    engines: dict[str, Any], model: Any, mv: Any, xb: np.ndarray, k: int, layer: tuple[Any, float]
) -> dict[str, float]:
    """Images/s of each engine and of eager PyTorch, and the fp32 matmul rates (FLOP/s) of the large
    reference GEMM and of `layer`, in interleaved rounds."""
    import torch

    from service.repository import images_per_call
    from service.scoring import score_direct
    from training.evaluate import importance_log_likelihood

    b = len(xb)
    fns: dict[str, tuple[Any, float]] = {}
    for name, engine in engines.items():

        def served(e: Any = engine) -> None:  # with the images per call the service would give this engine
            score_direct(e, xb, k, [0] * b, mv.latent_dim, mv.chunk, images_per_call(e, mv.score_rows, mv.chunk))

        served()  # warm up
        fns[name] = (served, b)
    xt = torch.from_numpy(xb)

    def eager() -> None:
        importance_log_likelihood(
            model.log_weights, xt, mv.latent_dim, k, chunk=mv.chunk, seed=0, batch=mv.score_images_per_call
        )

    eager()
    fns["pytorch eager fp32"] = (eager, b)
    fns["matmul_flops"] = matmul_runner(threads=torch.get_num_threads())
    fns["layer_matmul_flops"] = layer
    return interleaved_rates(fns)


def single_image_timer(version_dir: Path, x: np.ndarray, k: int, threads: int) -> tuple[Any, str]:
    """A function of a turn's length in seconds that scores one image after another on the engine the service
    chooses (as /score runs it, without HTTP) and returns the median time of one image in ms; and that
    engine's name."""
    from service.scoring import score_direct

    mv = load(version_dir, threads)
    engine, per_call = mv.scoring.engine, mv.score_images_per_call

    def turn(seconds: float) -> float:
        times: list[float] = []
        t0 = time.perf_counter()
        while not times or time.perf_counter() - t0 < seconds:
            row = x[len(times) % len(x)][None]
            t1 = time.perf_counter()
            score_direct(engine, row, k, [0], mv.latent_dim, mv.chunk, per_call)
            times.append(time.perf_counter() - t1)
        return float(np.median(times)) * 1000

    turn(0.2)  # warm up
    return turn, mv.scoring.info.label


def fast_path_parity(version_dir: Path, x: np.ndarray, k: int, threads: int) -> dict[str, Any]:
    """|log p(x)| difference of the fast path from fp32, same noise, over the given images (nats)."""
    mv = load(version_dir, threads)
    if mv.scoring.engine is mv.ref:
        why = mv.scoring.fallback or "no fast path on this machine: " + mv.scoring.reason
        return {"engine": mv.scoring.info.label, "note": why}
    return parity(mv.ref, mv.scoring.engine, mv.scoring.info.label, mv, x, k)


def parity(ref_engine: Any, engine: Any, label: str, mv: Any, x: np.ndarray, k: int) -> dict[str, Any]:
    """|log p(x)| difference of `engine` from the fp32 reference, same noise, over the images x (nats)."""
    from service.repository import images_per_call
    from service.scoring import score_direct

    seeds = list(range(len(x)))
    ref = score_direct(
        ref_engine, x, k, seeds, mv.latent_dim, mv.chunk, images_per_call(ref_engine, mv.score_rows, mv.chunk)
    )
    fast = score_direct(engine, x, k, seeds, mv.latent_dim, mv.chunk, images_per_call(engine, mv.score_rows, mv.chunk))
    diff = np.array([abs(a.acc.log_likelihood()[0] - b.acc.log_likelihood()[0]) for a, b in zip(ref, fast)])
    signed = np.array([b.acc.log_likelihood()[0] - a.acc.log_likelihood()[0] for a, b in zip(ref, fast)])
    return {
        "engine": label,
        "images": int(len(x)),
        "K": k,
        "mean_abs_diff_nats": round(float(diff.mean()), 5),
        "mean_signed_diff_nats": round(float(signed.mean()), 5),
        "worst_abs_diff_nats": round(float(diff.max()), 5),
    }


if __name__ == "__main__":
    print(json.dumps({"matmul_gflops": matmul_rate() / 1e9}, indent=2))
