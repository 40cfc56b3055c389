"""make bench's report arithmetic, on made-up figures (the measurements themselves are not tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.inprocess import int8_engine, largest_decoder_layer, matrix_products
from bench.run import acceptance_ratios, encode_floor_lines, int8_lines, layer_matmul_lines

# step 2's in-process figures: openvino bf16 the fast path, 200 images/s at batch 1 (5 ms an image)
SCORING = {
    "fast_path": {"engine": "openvino", "precision": "bf16"},
    "engines": ["onnxruntime fp32", "openvino bf16"],
    "rates": {"1": {"onnxruntime fp32": 100.0, "openvino bf16": 200.0}},
}


def test_the_encode_batching_ratio_is_the_ratio_of_the_medians_of_alternating_turns():
    r = {
        "scoring": SCORING,
        "http": {
            "score_v2": {"1": {"requests_per_s": 150.0, "p50_ms": 6.0}, "8": {"requests_per_s": 180.0}},
            "encode_v2_batching_turns": {
                "concurrency": 32,
                "requests_per_s": {"on": [5000.0, 3000.0, 6000.0], "off": [2000.0, 2500.0, 1000.0]},
                "median_on": 5000.0,
                "median_off": 2000.0,
            },
        },
    }
    lines = acceptance_ratios(r)
    assert any("taken minutes apart: 180.0 images/s = 0.90x (200.0)" in line for line in lines)
    assert any("taken minutes apart: 6.0 ms = 1.20x (5.0 ms)" in line for line in lines)
    encode = [line for line in lines if line.startswith("- /encode")]
    assert len(encode) == 1 and "medians of 3 alternating turns" in encode[0] and ": 2.50x" in encode[0]


def test_the_http_score_ratios_are_ratios_of_the_medians_of_alternating_turns():
    r = {
        "scoring": SCORING,
        "http": {
            "score_v2_turns": {
                "engine": "openvino bf16",
                "inprocess_ms": [8.0, 10.0, 6.0],
                "c1_p50_ms": [9.0, 13.0, 12.0],
                "c8_images_per_s": [100.0, 90.0, 120.0],
                "median_inprocess_ms": 8.0,
                "median_c1_p50_ms": 12.0,
                "median_c8_images_per_s": 100.0,
            },
        },
    }
    lines = acceptance_ratios(r)
    assert any("3 turns alternating" in line and "(median 8.00 ms an image, 125.0 images/s" in line for line in lines)
    c8 = [line for line in lines if "concurrency 8: 100.0 images/s = 0.80x the in-process rate" in line]
    assert len(c8) == 1 and "own in-process time: 0.80x, 0.90x, 0.72x)" in c8[0]
    c1 = [line for line in lines if "concurrency 1: 12.0 ms = 1.50x the in-process single-image time" in line]
    assert len(c1) == 1 and "own in-process time: 1.12x, 1.30x, 2.00x)" in c1[0]


def test_the_layer_shape_share_names_the_shape_and_each_batch_size():
    scoring = {
        "rates": {
            "1": {"fp32_fraction_of_layer_matmul_rate": 0.412},
            "16": {"fp32_fraction_of_layer_matmul_rate": 0.5},
        },
        "layer_matmul": {"shape": "1000x512 @ 512x512", "gflops": {"1": 178.4, "16": 160.0}},
    }
    (line,) = [line for line in layer_matmul_lines(scoring) if line]
    assert "(1000x512 @ 512x512:" in line and "batch 1 / 16: 178.4 / 160.0 GFLOP/s" in line
    assert line.endswith("share of that rate: 41% / 50%.")
    assert layer_matmul_lines({"rates": {}}) == []  # results from before the figure existed


def test_the_largest_decoder_layer_is_read_from_the_shipped_graph():
    # models/digits/1: decoder 16 -> 512 -> 512 -> 384 (3 numbers x 2 components x 64 pixels)
    assert largest_decoder_layer(Path(__file__).resolve().parents[2] / "models" / "digits" / "1") == (512, 512)


def test_the_int8_line_gives_speed_and_accuracy_against_fp32():
    label = "onnxruntime int8"
    scoring = {
        "rates": {"1": {f"{label} / fp32": 1.5}, "16": {f"{label} / fp32": 1.91}},
        "int8": {
            "quantized": ["/net/net.3/Gemm", "/net/net.6/Gemm"],
            "parity": {
                "engine": label,
                "images": 447,
                "K": 1000,
                "mean_abs_diff_nats": 0.048,
                "mean_signed_diff_nats": -0.002,
                "worst_abs_diff_nats": 0.19,
            },
        },
    }
    (line,) = [line for line in int8_lines(scoring) if line]
    assert "/net/net.3/Gemm, /net/net.6/Gemm" in line and "batch 1 / 16 at 1.50x / 1.91x fp32" in line
    assert "mean |diff| 0.048 nats (signed -0.002), worst image 0.19 nats." in line
    assert int8_lines({"rates": {}}) == []


def test_the_int8_candidate_really_is_quantized(tmp_path):
    """The quantizer silently leaves nodes it cannot find alone: the bench's candidate must not be fp32."""
    import onnx

    shipped = Path(__file__).resolve().parents[2] / "models" / "digits" / "1"
    engine, quantized = int8_engine(shipped, 1, tmp_path)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "log_weights_int8.onnx")).graph.node]
    # the decoder's layers after its first (512 -> 512, 512 -> 384), named by their weights: node names follow
    # the exporter's trace order (the encoder's trunk is also "net")
    later = {"vae.decoder.net.3.weight", "vae.decoder.net.6.weight"}
    expected = [name for name, op, weight, _, _ in matrix_products(shipped) if op == "Gemm" and weight in later]
    assert len(expected) == 2 and quantized == expected and ops.count("MatMulInteger") == 2
    assert "log_weights" in engine.sessions


def test_the_encode_floor_lines_put_the_servers_cpu_a_request_against_the_floors():
    def medians(on: float, off: float, floor: float) -> dict[str, float]:
        return {"on": on, "off": off, "floor": floor}

    turns = {
        "requests_per_s": {"on": [5000.0], "off": [2000.0], "floor": [10000.0]},
        "median_on": 5000.0,
        "median_off": 2000.0,
        "median_floor": 10000.0,
        "server_cpu_us_per_request": {"on": [200.0], "off": [600.0], "floor": [50.0]},
        "median_server_cpu_us_per_request": medians(200.0, 600.0, 50.0),
        "median_server_cores_busy": medians(1.0, 1.2, 0.5),
        "median_perf_analyzer_cores_busy": medians(0.5, 0.3, 1.2),
    }
    cpu, busy, ceiling = encode_floor_lines(turns)
    assert "batching on 200 us, off 600 us (off/on 3.00x)" in cpu
    assert "floor (bench/floor.py" in cpu and "50 us" in cpu
    assert "150 us on, 550 us off" in cpu  # beyond the floor
    assert "on 1.00 / 0.50, off 1.20 / 0.30, floor 0.50 / 1.20" in busy
    assert "floor throughput 10000.0 requests/s" in busy
    assert "floor's throughput against batching off, 5.00x" in ceiling  # 10000 / 2000
    assert "off against the floor: 12.00x" in ceiling  # 600 / 50 us
    older = {k: v for k, v in turns.items() if "cpu" not in k and "busy" not in k}
    assert encode_floor_lines(older) == []  # results from before the CPU figures: no lines


def test_the_score_cost_runs_each_score_as_served_and_times_it_against_the_likelihood():
    """bench.scores on the shipped model: dose from the same pass as nll_bpd (elbo_gap and complexity are
    arithmetic on it), reported as images/s and a time ratio per score."""
    from bench import scores
    from training.data import prepare

    test = prepare("digits").flat("test")
    shipped = Path(__file__).resolve().parents[2] / "models" / "digits" / "1"
    r = scores.measure(shipped, test, 50, 1, ("dose",), images=2)
    assert set(r["images_per_s"]) == {"nll_bpd", "dose"} and all(v > 0 for v in r["images_per_s"].values())
    rates = r["images_per_s"]
    assert r["time_over_nll_bpd"]["dose"] == pytest.approx(rates["nll_bpd"] / rates["dose"], rel=0.01)
    line = "\n".join(scores.lines([r]))
    assert "digits/1 (1 latent layer(s); its default score nll_bpd), K=50, 2 images" in line and "dose **" in line
