"""The cost of an OOD score against the importance-sampled likelihood alone: the same images at the same K,
scored as the service scores them (`score_direct` on the engine the score needs, then
`ModelVersion.score_values`).

`dose` on a one-layer model adds only arithmetic to the likelihood's pass (elbo_gap comes from the same log
weights, complexity from zlib); on a model of several latent layers it needs LLR>k, the llr_log_weights
graph on onnxruntime fp32 (a second top-down and decoder pass a sample), where the likelihood alone runs
on the engine chosen at load. Reported: images/s of each, in interleaved turns, and each score's time over
`nll_bpd`'s. Target (issue 30): the default score at most 3x.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.inprocess import interleaved_rates, load


def ladder_version(root: Path) -> Path:
    """A 2-layer digits ladder, trained briefly and calibrated by the product's pipeline (dose needs the
    calibration's tables): cost depends on the architecture, not on how well it trained."""
    from training.config import TrainConfig
    from training.pipeline import run

    out = root / "ladder" / "1"
    cfg = TrainConfig.from_dict(
        {"dataset": "digits", "latent_layers": 2, "epochs": 2, "eval_k": 100, "calibration_images": 100}
    )
    run(cfg, out, plots=False, progress=False, log=lambda *_: None)
    return out


def measure(version_dir: Path, x: np.ndarray, k: int, threads: int, names: tuple[str, ...], images: int = 8) -> dict:
    from service.repository import images_per_call
    from service.scoring import score_direct
    from vae_contract.formulas import bits_per_dim, elbo_gap_bits_per_dim, llr_bits_per_dim, needs_llr

    mv = load(version_dir, threads)
    calib = mv.manifest["calibration"]
    xb = np.asarray(x[:images]).reshape(images, -1).astype(np.int64)

    def scorer(name: str) -> tuple[Any, float]:
        llr = needs_llr(name, calib)
        engine = mv.ref if llr else mv.scoring.engine
        per_call = images_per_call(engine, mv.score_rows, mv.chunk)

        def run() -> None:
            tasks = score_direct(
                engine, xb, k, [0] * images, mv.noise_dim, mv.chunk, per_call, llr_engine=mv.ref if llr else None
            )
            ll = np.array([t.acc.log_likelihood()[0] for t in tasks])
            nll = bits_per_dim(-ll, mv.dim)
            if name == "nll_bpd":
                return
            elbo = np.array([t.acc.elbo()[0] for t in tasks])
            ll_k = np.array([t.llr.log_likelihood()[0] for t in tasks if t.llr is not None]) if llr else None
            llr_bpd = llr_bits_per_dim(ll, ll_k, mv.dim) if ll_k is not None else None
            values = mv.score_values(nll, xb, llr_bpd, elbo_gap_bits_per_dim(ll, elbo, mv.dim))
            assert name in values, name

        return run, float(images)

    rates = interleaved_rates({name: scorer(name) for name in ("nll_bpd", *names)}, rounds=5)
    return {
        "model": f"{version_dir.parent.name}/{version_dir.name}",
        "latent_layers": int(mv.manifest.get("latent_layers", 1)),
        "default_score": calib["default_score"],
        "K": k,
        "images": images,
        "nll_bpd_engine": mv.scoring.info.label,
        "images_per_s": {name: round(v, 2) for name, v in rates.items()},
        "time_over_nll_bpd": {name: round(rates["nll_bpd"] / rates[name], 3) for name in names},
    }


def lines(results: list[dict[str, Any]]) -> list[str]:
    out = ["## OOD scores: cost against the likelihood alone", ""]
    for r in results:
        out.append(
            f"- {r['model']} ({r['latent_layers']} latent layer(s); its default score {r['default_score']}), "
            f"K={r['K']}, {r['images']} images: "
            + ", ".join(f"{name} {v} images/s" for name, v in r["images_per_s"].items())
            + f" (nll_bpd on {r['nll_bpd_engine']}); time / nll_bpd's: "
            + ", ".join(f"{name} **{v}x**" for name, v in r["time_over_nll_bpd"].items())
            + " (target for the default score <= 3x)"
        )
    return out + [""]
