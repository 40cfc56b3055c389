"""The cost of an anomaly map on top of a score: the same images at the same K, scored with and without maps.

A map request runs the pixel_log_weights graph on the pixel engine (the fast path where its check passed, else
onnxruntime fp32), then the map's residual part (two encoder and two decoder rows an image, on onnxruntime fp32)
and combines the parts; a plain score runs log_weights on the engine chosen at load (OpenVINO bf16 where the
CPU has it, else the faster fp32 engine).
Reported: images/s of each, in interleaved turns, and two ratios: map against the plain score on the same
engine (what the extra output and the per-pixel averaging cost), and map against the plain score as served
(what a user pays for asking). Target (issue 31): at most 1.2x.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.inprocess import interleaved_rates, load


def measure(version_dir: Path, x: np.ndarray, k: int, threads: int, images: int = 8) -> dict[str, Any]:
    from service.repository import images_per_call
    from service.scoring import score_direct

    mv = load(version_dir, threads)
    xb = np.asarray(x[:images]).reshape(images, -1).astype(np.int64)
    pixels = mv.height * mv.width

    def scorer(engine: Any, pixel_engine: Any | None) -> Any:
        per_call = images_per_call(engine, mv.score_rows, mv.chunk)

        def run() -> None:
            tasks = score_direct(engine, xb, k, [0] * images, mv.latent_dim, mv.chunk, per_call, pixel_engine, pixels)
            if pixel_engine is not None:  # the map itself: its parts (the residual reads a reconstruction) combined
                expected = np.concatenate([t.pixels.expected_nll() for t in tasks if t.pixels is not None])
                mv.anomaly_maps(expected, xb, mv.map_means(expected, xb))

        return run, float(images)

    served, served_map = mv.scoring.info.label, mv.pixel_engine.info.label
    fns = {
        "score, onnxruntime fp32": scorer(mv.ref, None),
        "score with map, onnxruntime fp32": scorer(mv.ref, mv.ref),
    }
    if mv.scoring.engine is not mv.ref:
        fns[f"score, {served}"] = scorer(mv.scoring.engine, None)
    if mv.pixel_engine is not mv.ref:
        fns[f"score with map, {served_map}"] = scorer(mv.pixel_engine, mv.pixel_engine)
    rates = interleaved_rates(fns, rounds=5)
    return {
        "model": f"{version_dir.parent.name}/{version_dir.name}",
        "K": k,
        "images": images,
        "images_per_s": {name: round(v, 2) for name, v in rates.items()},
        "map_over_score_same_engine": round(
            rates["score, onnxruntime fp32"] / rates["score with map, onnxruntime fp32"], 3
        ),
        "map_over_score_as_served": round(rates[f"score, {served}"] / rates[f"score with map, {served_map}"], 3),
        "served_engine": served,
        "map_engine": served_map,
    }


def lines(results: list[dict[str, Any]]) -> list[str]:
    out = ["## Anomaly maps: cost on top of a score", ""]
    for r in results:
        out.append(
            f"- {r['model']}, K={r['K']}, {r['images']} images: "
            + ", ".join(f"{name} {v} images/s" for name, v in r["images_per_s"].items())
            + f"; map / score on the same engine **{r['map_over_score_same_engine']}x**, map / score as served "
            f"({r['served_engine']}, maps on {r['map_engine']}) **{r['map_over_score_as_served']}x** (target <= 1.2x)"
        )
    return out + [""]
