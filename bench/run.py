"""`make bench`: speed and memory figures in one run, written to bench/results.json and bench/results.md.

Not a timed test: the machines are noisy, so figures are compared as ratios taken in the same run.
Sections: fp32 matmul rate and the scoring path's share of it; in-process scoring at K=1000 on every
engine (and the fast path's NLL difference from fp32 over the test split); over HTTP with Triton's
perf_analyzer in its own process (/v2 score and encode, concurrency 1, 8, 32; encode with batching off);
bounded overload runs (digits, and the 28x28, 256-level model, where max_queued_samples is minutes of
work); the service's peak memory at the largest K on that model; training throughput against a minimal
plain PyTorch loop; the conv default on 32x32 colour images (bench/conv.py: training against a plain
loop, scoring at K=1000 on each engine, its share of the machine's convolution rate, fast-path parity).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parent


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line)
        flags = next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split()
        info["bf16_instructions"] = [f for f in flags if "bf16" in f or f.startswith("amx")]
    except (OSError, StopIteration):
        pass
    from service.settings import available_cpus

    info["cpus"] = available_cpus()
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    try:
        import openvino

        info["openvino"] = openvino.__version__
    except ImportError:
        info["openvino"] = None
    return info


def tiny_large_model(root: Path) -> Path:
    """The MLP on 28x28 images with 256 levels (the 28x28 default before conv networks, kept so the memory and
    overload figures compare with earlier runs), trained one epoch on generated images: memory depends on
    the architecture and the request, not on how well the model is trained."""
    from bench.training import images_28x28, quick_version
    from training.config import TrainConfig
    from training.data import ImageData

    images = images_28x28(2600)
    data = ImageData(images[:2000], images[2000:2300], images[2300:], 256, "bench")
    cfg = TrainConfig(epochs=1, arch="mlp").resolve(256, 2000, data.shape)
    return quick_version(root / "mnist8" / "1", data, cfg)


def run(model: Path, quick: bool) -> dict[str, Any]:
    from bench import conv, inprocess, maps, scores, serving, training
    from training.data import prepare

    t_start = time.time()
    results: dict[str, Any] = {"model": str(model), "machine": machine()}
    test = prepare("digits").flat("test")
    threads = results["machine"]["cpus"]

    print("1/7 fp32 matmul rate and the graph's FLOPs", flush=True)
    rate = inprocess.matmul_rate(threads=threads)
    flops = inprocess.graph_flops(model, 1000)
    results["matmul"] = {"gflops": round(rate / 1e9, 1), "shape": "8192x1024 @ 1024x1024, onnxruntime MatMul"}
    results["flops"] = {k: round(v / 1e6, 4) for k, v in flops.items()} | {"units": "MFLOP", "K": 1000}

    print("2/7 in-process scoring, K=1000", flush=True)
    batches = [1, 16] if quick else [1, 16, 64]
    with tempfile.TemporaryDirectory() as int8_dir:
        sc = inprocess.scoring_rates(model, test, 1000, batches, threads, Path(int8_dir))
    for b, row in sc["rates"].items():
        fp32 = row["onnxruntime fp32"]  # against the matmul rates measured in turns with it
        achieved = fp32 * flops["per_image"] / 1e9  # GFLOP/s
        row["fp32_fraction_of_matmul_rate"] = round(achieved / sc["matmul_gflops"][b], 3)
        row["fp32_fraction_of_layer_matmul_rate"] = round(achieved / sc["layer_matmul"]["gflops"][b], 3)
        for name, v in list(row.items()):
            if name != "onnxruntime fp32" and not name.startswith("fp32_fraction"):
                row[f"{name} / fp32"] = round(v / fp32, 2)
    results["scoring"] = sc
    results["fast_path_parity"] = inprocess.fast_path_parity(model, test, 1000, threads)

    print("3/7 HTTP with perf_analyzer (in its own process)", flush=True)
    conc = [1, 8] if quick else [1, 8, 32]
    rows = test[:64]
    http: dict[str, Any] = {}
    with serving.Server(model.parent.parent) as server:
        http["score_v2"] = serving.perf_analyzer(server.url, "digits-score", "x", rows, conc)
        http["encode_v2"] = serving.perf_analyzer(server.url, "digits-encode", "x", rows, conc)
        http["server_memory_mb"] = server.memory_mb()
        # /score at concurrency 1 and 8 against the same images scored one at a time in this process, in
        # alternating turns: step 2's figures were taken minutes earlier, and this machine's speed moves
        # by tens of percent within that time (run to run, c1 p50 against them ranged 1.15x to 1.82x).
        timer, engine = inprocess.single_image_timer(model, rows, 1000, threads)
        turns_c: dict[str, list[float]] = {"inprocess_ms": [], "c1_p50_ms": [], "c8_images_per_s": []}
        for _ in range(1 if quick else 3):
            turns_c["inprocess_ms"].append(round(timer(2.0), 2))
            res = serving.perf_analyzer(server.url, "digits-score", "x", rows, [1, 8], window_ms=2000)
            turns_c["c1_p50_ms"].append(res["1"].get("p50_ms", float("nan")))
            turns_c["c8_images_per_s"].append(res["8"].get("requests_per_s", float("nan")))
        http["score_v2_turns"] = {
            "engine": engine,
            **turns_c,
            **{f"median_{name}": float(np.median(values)) for name, values in turns_c.items()},
        }
    # Batching on against off at concurrency 32, in alternating turns against two servers (both up, the
    # idle one waiting): one turn each swung the ratio from 2.0x to 3.2x between runs of one build. The
    # third server is the HTTP floor (bench/floor.py: the same server answering from a recording). Each
    # turn also reads the server's CPU time over the requests it served, which, unlike throughput, does
    # not depend on whether perf_analyzer or the server is the limit.
    names = ("on", "off", "floor")
    turns: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, dict[str, list[float]]] = {
        key: {name: [] for name in names}
        for key in ("server_cpu_us_per_request", "server_cores_busy", "perf_analyzer_cores_busy")
    }
    with (
        serving.Server(model.parent.parent) as on,
        serving.Server(model.parent.parent, batching="false") as off,
        serving.Server(model.parent.parent, floor=True) as floor,
    ):
        for _ in range(1 if quick else 3):
            for name, server in (("on", on), ("off", off), ("floor", floor)):
                res = serving.load_turn(server, "digits-encode", rows, 32, window_ms=3000)
                turns[name].append(res.get("requests_per_s", float("nan")))
                for key, values in cpu.items():
                    values[name].append(res.get(key, float("nan")))
    http["encode_v2_batching_turns"] = {
        "concurrency": 32,
        "requests_per_s": turns,
        **{f"median_{name}": float(np.median(values)) for name, values in turns.items()},
        **cpu,
        **{f"median_{key}": {name: float(np.median(v)) for name, v in values.items()} for key, values in cpu.items()},
    }
    results["http"] = http

    print("4/7 bounded overload, an abandoned request, a hot reload under load", flush=True)
    with serving.Server(model.parent.parent) as server:
        idle = server.memory_mb()
        img = [test[i].tolist() for i in range(32)]
        results["overload"] = serving.overload(server.url, img, 1000, 16 if quick else 64, 10 if quick else 30)
        results["overload"]["settings"] = "default settings; each request 32 images at K=1000"
        results["overload"]["server_memory_mb"] = {"idle": idle, "end_of_load": server.memory_mb()}
        time.sleep(3)
        results["overload"]["server_memory_mb"]["3_s_after"] = server.memory_mb()
        results["abandoned"] = serving.abandoned(server.url, [test[i].tolist() for i in range(100)], 10000)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        shutil.copytree(model, repo / "digits" / "1")
        with serving.Server(repo, api_keys="bench-key") as server:
            results["reload_under_load"] = serving.reload_under_load(server.url, repo, "bench-key", test[0].tolist())

    print("5/7 peak memory at the largest K on a 28x28, 256-level model, and overload on it", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        large = tiny_large_model(Path(tmp))
        # the whole request must run for its peak to count: on a slow machine it outlasts the default
        # 30 s deadline (a 504 part-way measured only the calls made until then)
        with serving.Server(large.parent.parent, request_timeout_s=3600) as server:
            import httpx

            from service.settings import Settings

            s = Settings()
            n = max(1, min(s.max_batch, s.max_request_samples // s.max_k))
            idle = server.memory_mb()
            imgs = np.random.default_rng(0).integers(0, 256, (n, 784)).tolist()
            t0 = time.perf_counter()
            r = httpx.post(server.url + "/score", json={"images": imgs, "num_samples": s.max_k}, timeout=3600)
            results["memory_large_model"] = {
                "request": f"{n} images x K={s.max_k} (the largest K, max_request_samples={s.max_request_samples})",
                "status": r.status_code,
                "seconds": round(time.perf_counter() - t0, 1),
                "idle_mb": idle,
                "after_mb": server.memory_mb(),
                "engine_memory_mb_setting": s.engine_memory_mb,
            }
        # overload where a queue of max_queued_samples is minutes of work: the deadline-based bound must
        # keep accepted requests inside their deadline (only 200s and 503s, no 504s)
        with serving.Server(large.parent.parent) as server:
            imgs = np.random.default_rng(1).integers(0, 256, (32, 784)).tolist()
            o = serving.overload(server.url, imgs, 1000, 8 if quick else 16, 10 if quick else 30)
            o["settings"] = "default settings; each request 32 images at K=1000 on the 28x28, 256-level model"
            results["overload_large_model"] = o

    print("6/7 training throughput", flush=True)
    results["training"] = training.measure(n_train=6000 if quick else 12000, epochs=1 if quick else 2)

    print("7/7 the conv default on 32x32 colour images: training, scoring, parity", flush=True)
    results["conv"] = conv.measure(threads, quick)
    print("anomaly maps: their cost on top of a score", flush=True)
    results["maps"] = [maps.measure(model, test, 1000, threads)]
    print("OOD scores: their cost against the likelihood alone", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ladder = scores.ladder_version(Path(tmp))
        results["scores"] = [
            scores.measure(model, test, 1000, threads, ("dose",)),
            scores.measure(ladder, test, 1000, threads, ("llr", "dose")),
        ]
    results["seconds"] = round(time.time() - t_start, 1)
    return results


def acceptance_ratios(r: dict[str, Any]) -> list[str]:
    """HTTP against in-process figures of the engine the server scored with, and encode batching on/off."""
    out = ["Ratios (same run):", ""]
    engine = r["scoring"]["fast_path"]["engine"] + " " + r["scoring"]["fast_path"]["precision"]
    if engine not in r["scoring"]["engines"]:
        engine = "onnxruntime fp32"
    inproc = r["scoring"]["rates"].get("1", {}).get(engine)
    score = r["http"].get("score_v2", {})
    c8, c1 = score.get("8", {}).get("requests_per_s"), score.get("1", {}).get("p50_ms")
    if inproc and c8:  # step 2's in-process figures were taken minutes before the HTTP runs
        out.append(f"- the table's /score at concurrency 8 against step 2's batch-1 rate of {engine}, taken "
                   f"minutes apart: {c8} images/s = {c8 / inproc:.2f}x ({inproc})")  # fmt: skip
    t = r["http"].get("score_v2_turns")
    if t:
        single = t["median_inprocess_ms"]
        out.append(
            f"- /score in {len(t['inprocess_ms'])} turns alternating with the same images scored one at a time "
            f"in-process on {t['engine']} (median {single:.2f} ms an image, {1000 / single:.1f} images/s; "
            f"turns {t['inprocess_ms']} ms); medians:"
        )
        out.append(
            f"  - concurrency 8: {t['median_c8_images_per_s']:.1f} images/s = "
            f"{t['median_c8_images_per_s'] * single / 1000:.2f}x the in-process rate (turns {t['c8_images_per_s']}; "
            f"each turn against its own in-process time: "
            f"{_ratios(c * i / 1000 for c, i in zip(t['c8_images_per_s'], t['inprocess_ms']))})"
        )
        out.append(
            f"  - p50 at concurrency 1: {t['median_c1_p50_ms']} ms = {t['median_c1_p50_ms'] / single:.2f}x the "
            f"in-process single-image time (turns {t['c1_p50_ms']}; each turn against its own in-process time: "
            f"{_ratios(c / i for c, i in zip(t['c1_p50_ms'], t['inprocess_ms']))})"
        )
    if inproc and c1:
        out.append(f"- the table's /score p50 at concurrency 1 against step 2's batch-1 rate, taken minutes "
                   f"apart: {c1} ms = {c1 * inproc / 1000:.2f}x ({1000 / inproc:.1f} ms)")  # fmt: skip
    turns = r["http"].get("encode_v2_batching_turns")
    if turns:
        on_off = turns["requests_per_s"]
        out.append(
            f"- /encode at concurrency 32, medians of {len(on_off['on'])} alternating turns: batching on "
            f"{turns['median_on']:.1f} requests/s, off {turns['median_off']:.1f}: "
            f"{turns['median_on'] / turns['median_off']:.2f}x (on {on_off['on']}, off {on_off['off']})"
        )
        out += encode_floor_lines(turns)
    return out


def encode_floor_lines(turns: dict[str, Any]) -> list[str]:
    """Where an encode request's cost goes: the server's CPU time a request served, against the floor's,
    and the most batching could gain on this machine (the floor against batching off).

    The floor (bench/floor.py) is the same server answering from a recording, so its CPU time a request
    is uvicorn's and the event loop's share; the rest is the service's own (its parse, render, the
    hand-off to the engine, and the engine). Throughputs cannot split this: on a 2-core machine the
    floor's throughput is perf_analyzer's limit, not the server's (see its cores busy). With one core's
    worth of interpreter-locked work a request, throughput is about one over the locked CPU time, so
    on/off in throughput follows the CPU ratio off/on where both servers keep one core busy.
    """
    us = turns.get("median_server_cpu_us_per_request")
    busy = turns.get("median_server_cores_busy")
    load = turns.get("median_perf_analyzer_cores_busy")
    if not us or not us.get("floor"):
        return []
    own_on, own_off = us["on"] - us["floor"], us["off"] - us["floor"]
    return [
        f"  - server CPU time a request served (all its threads, /proc; requests from /metrics), medians: "
        f"batching on {us['on']:.0f} us, off {us['off']:.0f} us (off/on {us['off'] / us['on']:.2f}x), the HTTP "
        f"floor (bench/floor.py: the same server answering every encode from a recording) {us['floor']:.0f} us; "
        f"the service's own beyond the floor: {own_on:.0f} us on, {own_off:.0f} us off "
        f"(turns: {turns['server_cpu_us_per_request']})",
        "  - cores busy over a turn (CPU seconds a second), server / perf_analyzer: "
        + ", ".join(f"{name} {busy[name]:.2f} / {load[name]:.2f}" for name in ("on", "off", "floor"))
        + f"; floor throughput {turns['median_floor']:.1f} requests/s (turns {turns['requests_per_s']['floor']})",
        # No service does less a request than the floor, which answers from a recording: its throughput
        # against batching off bounds what batching can gain on this machine with this load generator.
        f"  - the most batching could gain here: the floor's throughput against batching off, "
        f"{turns['median_floor'] / turns['median_off']:.2f}x (a service with no work of its own beyond HTTP); "
        f"in server CPU a request, off against the floor: {us['off'] / us['floor']:.2f}x",
    ]


def int8_lines(scoring: dict[str, Any]) -> list[str]:
    """The int8 candidate's speed and accuracy against fp32 (results without it: none)."""
    int8 = scoring.get("int8")
    if not int8:
        return []
    p, label = int8["parity"], int8["parity"]["engine"]
    speed = " / ".join(f"{row[f'{label} / fp32']:.2f}x" for row in scoring["rates"].values())
    return [
        "",
        f"int8 candidate ({label}: dynamic quantization of {', '.join(int8['quantized'])}, int8 weights per "
        f"output channel; measured, not served): batch {' / '.join(scoring['rates'])} at {speed} fp32; against "
        f"fp32 on the {p['images']} test images, same noise, K={p['K']}: mean |diff| {p['mean_abs_diff_nats']} "
        f"nats (signed {p['mean_signed_diff_nats']}), worst image {p['worst_abs_diff_nats']} nats.",
    ]


def layer_matmul_lines(scoring: dict[str, Any]) -> list[str]:
    """The fp32 path's share of the matmul rate at its own largest GEMM shape (results without it: none)."""
    layer = scoring.get("layer_matmul")
    if not layer:
        return []
    batches = list(scoring["rates"])
    shares = [scoring["rates"][b]["fp32_fraction_of_layer_matmul_rate"] for b in batches]
    return [
        "",
        f"The same MatMul at the shape the fp32 path multiplies most ({layer['shape']}: its calls' rows by the "
        f"decoder's largest layer), in the same rounds, batch {' / '.join(batches)}: "
        f"{' / '.join(str(layer['gflops'][b]) for b in batches)} GFLOP/s; the fp32 path's share of that rate: "
        f"{' / '.join(f'{s:.0%}' for s in shares)}.",
    ]


def _ratios(ratios: Any) -> str:
    return ", ".join(f"{x:.2f}x" for x in ratios)


def markdown(r: dict[str, Any]) -> str:
    from bench import maps, scores

    m = r["machine"]
    lines = [
        f"# vae-serve benchmark ({m.get('cpu', '?')}, {m['cpus']} CPUs, "
        f"bf16: {', '.join(m.get('bf16_instructions', [])) or 'no'})",
        "",
        f"fp32 matmul rate (onnxruntime, {r['matmul']['shape']}): **{r['matmul']['gflops']} GFLOP/s**. "
        f"log_weights graph: {r['flops']['decoder_per_sample']} MFLOP per importance sample, "
        f"{r['flops']['per_image']} MFLOP per image at K=1000.",
        "",
        "## In-process scoring, K=1000 (images/s)",
        "",
        "For each batch size the engines and the two fp32 matmuls take turns of 0.6 s, seven rounds; each figure is "
        "the median of its turns.",
        "",
    ]
    rates = r["scoring"]["rates"]
    engines = r["scoring"]["engines"]
    lines += ["| batch | " + " | ".join(engines) + " | fp32 matmul GFLOP/s | fp32 share of matmul rate | "
              + " | ".join(f"{e} / fp32" for e in engines[1:]) + " |"]  # fmt: skip
    lines += ["|---" * (3 + 2 * len(engines) - 1) + "|"]
    for b, row in rates.items():
        cells = [f"{row[e]:.1f}" for e in engines] + [f"{r['scoring']['matmul_gflops'][b]}"]
        cells += [f"{row['fp32_fraction_of_matmul_rate']:.0%}"]
        cells += [f"{row[f'{e} / fp32']:.2f}x" for e in engines[1:]]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += layer_matmul_lines(r["scoring"])
    p = r["fast_path_parity"]
    if "mean_abs_diff_nats" in p:
        lines += [
            "",
            f"Fast path ({p['engine']}) against fp32 on the {p['images']} test images, same noise, K={p['K']}: "
            f"mean |diff| {p['mean_abs_diff_nats']} nats (signed {p['mean_signed_diff_nats']}), "
            f"worst image {p['worst_abs_diff_nats']} nats.",
        ]
    else:
        lines += ["", f"Fast path: {p.get('note')}"]
    lines += int8_lines(r["scoring"])
    lines += ["", "## Over HTTP (perf_analyzer, /v2, one image a request)", ""]
    lines += ["| operation | concurrency | requests/s | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for op, per in r["http"].items():
        if not isinstance(per, dict) or op in ("server_memory_mb", "encode_v2_batching_turns", "score_v2_turns"):
            continue
        for c, v in per.items():
            if "error" in v:
                lines.append(f"| {op} | {c} | error: {v['error'][:80]} | | | |")
            else:
                lines.append(f"| {op} | {c} | {v['requests_per_s']} | {v['p50_ms']} | {v['p95_ms']} | {v['p99_ms']} |")
    lines += ["", *acceptance_ratios(r)]
    o = r["overload"]
    lines += [
        "",
        f"## Overload: {o.get('clients')} clients for {o.get('seconds')} s ({o.get('settings')})",
        "",
        f"statuses {o.get('statuses')}; accepted p50 {o.get('accepted_p50_ms')} ms, p99 {o.get('accepted_p99_ms')} ms; "
        f"/healthz (probed from a process of its own every 50 ms) p99 {o.get('healthz_p99_ms')} ms, "
        f"max {o.get('healthz_max_ms')} ms; server memory {o.get('server_memory_mb')} MB.",
    ]
    ol = r.get("overload_large_model")
    if ol:
        lines += [
            "",
            f"Overload on the 28x28, 256-level model: {ol.get('clients')} clients for {ol.get('seconds')} s "
            f"({ol.get('settings')}): statuses {ol.get('statuses')}; accepted p50 {ol.get('accepted_p50_ms')} ms, "
            f"p99 {ol.get('accepted_p99_ms')} ms; /healthz p99 {ol.get('healthz_p99_ms')} ms, "
            f"max {ol.get('healthz_max_ms')} ms.",
        ]
    a, rl = r["abandoned"], r["reload_under_load"]
    lines += [
        "",
        f"Abandoned request ({a['request']}, hung up after 1 s with {a['queued_when_abandoned']:.0f} samples queued): "
        f"the server was idle again {a['idle_after_s']} s later.",
        "",
        f"Hot reload under load: {rl['requests']} requests during two reloads (version 2 added, then removed): "
        f"statuses {rl['statuses']}.",
    ]
    mem = r["memory_large_model"]
    lines += [
        "",
        f"## Memory, 28x28 256-level model: {mem['request']}: status {mem['status']}"
        + (f" after {mem['seconds']} s" if "seconds" in mem else "")
        + f", idle {mem['idle_mb']} MB, after {mem['after_mb']} MB (VmHWM = peak)",
        "",
    ]
    t = r["training"]
    lines += [
        f"## Training ({t['data']}; {t['model']})",
        "",
        f"product loop {t['product_images_per_s']} images/s, "
        f"plain PyTorch loop {t['plain_loop_images_per_s']} images/s: "
        f"**{t['ratio_product_over_plain']}x**"
        + (
            f" (medians of {t['turns']} alternating turns after a warm-up of both; each turn "
            f"{_ratios(t['ratio_each_turn'])})."
            if "ratio_each_turn" in t
            else "."
        ),
        "",
    ]
    if "conv" in r:
        lines += conv_lines(r["conv"])
    if "maps" in r:
        lines += maps.lines(r["maps"])
    if "scores" in r:
        lines += scores.lines(r["scores"])
    lines += [f"Total bench time {r['seconds']} s."]
    return "\n".join(lines) + "\n"


def conv_lines(c: dict[str, Any]) -> list[str]:
    """The conv default on 32x32 colour: training ratio, scoring rates, conv-rate share, fast-path parity."""
    t, s, parity = c["training"], c["scoring"], c["fast_path_parity"]
    lines = [
        f"## The conv default on {c['data']}",
        "",
        f"Training ({t['data']}; {t['model']}): product loop {t['product_images_per_s']} images/s, plain PyTorch "
        f"loop {t['plain_loop_images_per_s']} images/s: **{t['ratio_product_over_plain']}x**"
        + (f" (turns {_ratios(t['ratio_each_turn'])})." if "ratio_each_turn" in t else "."),
        "",
        f"Scoring at K={s['K']} ({s['model']}; {s['mflop_per_image']} MFLOP an image, {s['flops']}):",
        "",
    ]
    for b, row in s["images_per_s"].items():
        lines.append(
            f"- batch {b}: "
            + ", ".join(
                f"{name} {v}" for name, v in row.items() if not name.startswith(("conv_", "fp32_")) and "/" not in name
            )
            + " images/s"
            + "".join(f"; {name} {v}x" for name, v in row.items() if "/" in name)
            + f"; fp32 share of the conv rate ({row['conv_gflops']} GFLOP/s, onnxruntime 3x3 Conv "
            f"64->64 on 16x16 x 256): **{row['fp32_fraction_of_conv_rate']:.0%}**"
        )
    if "mean_abs_diff_nats" in parity:
        lines.append(
            f"- fast path parity ({parity['engine']}, {parity['images']} images, K={parity['K']}): mean "
            f"|d log p| {parity['mean_abs_diff_nats']} nats, worst {parity['worst_abs_diff_nats']} nats"
        )
    else:
        lines.append(f"- fast path: {parity.get('note', parity)}")
    refused = c.get("refused_fast_path_parity")
    if refused:
        lines.append(
            f"- {refused['engine']}, measured anyway: parity on {refused['images']} images, K={refused['K']}: mean "
            f"|d log p| {refused['mean_abs_diff_nats']} nats, worst {refused['worst_abs_diff_nats']} nats"
        )
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/digits/1"))
    p.add_argument("--quick", action="store_true", help="fewer batch sizes, concurrencies and seconds")
    args = p.parse_args()
    results = run(args.model, args.quick)
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (OUT / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
