"""`vae-ood-eval MODEL_DIR`: how well each OOD score separates test data from generated OOD sets.

The sets (training/ood_sets.py) go both ways: harder than the data (noise, shuffled, inverted, photo
patches) and simpler (constant, smooth blobs, upscaled digits, clothing silhouettes, rendered text).
Everything is generated or ships with the dependencies (scikit-learn's digits and sample images, Pillow's
default font); nothing is downloaded. Writes ood_report.md and ood_roc.png beside the model and a summary into
its manifest (and the files' sha256 into its file list); with anomaly maps, also the localisation
benchmark (training/localisation.py) and its figure localisation.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.config import TrainConfig
from training.data import digits_labels, prepare, prepare_config
from training.export import ExportError, load_checkpoint, read_verified
from training.localisation import figure as localisation_figure
from training.localisation import localisation_benchmark
from training.localisation import markdown as localisation_markdown
from training.ood import model_scores
from training.ood_sets import SET_NAMES, ood_sets
from training.pipeline import run
from vae_contract.manifest import sha256_file, write_manifest

HELD_OUT_IN, HELD_OUT_OUT = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


def roc_metrics(scores_in: np.ndarray, scores_out: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR (OOD as the positive class) and the FPR at 95% TPR."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]
    s = np.r_[scores_in, scores_out]
    fpr, tpr, _ = roc_curve(y, s)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr": float(average_precision_score(y, s)),
        "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
    }


def score_all(model, images: np.ndarray, k: int, seed: int, calib: dict[str, Any]) -> dict[str, np.ndarray]:
    return model_scores(model, images, k, seed, calib)


def held_out_class_scores(cfg: TrainConfig, k: int, seed: int, log) -> dict[str, Any]:
    """Train the same configuration on digits 0-4 only; score test digits 0-4 (in) against 5-9 (out).

    The held-out model trains like any other: by epochs and early stopping, never by the clock, so
    the figures reproduce.
    """
    with tempfile.TemporaryDirectory() as tmp:
        sub = cfg.replace(classes=HELD_OUT_IN, max_minutes=None, eval_k=min(cfg.eval_k, k))
        log(f"held-out classes: training the same configuration on digits {HELD_OUT_IN}")
        manifest = run(sub, Path(tmp) / "heldout" / "1", plots=False, progress=False, log=lambda *_: None)
        model = load_checkpoint(Path(tmp) / "heldout" / "1")
    calib = manifest["calibration"]
    test = prepare("digits").test
    labels = digits_labels("test")
    inside = score_all(model, test[np.isin(labels, HELD_OUT_IN)], k, seed, calib)
    outside = score_all(model, test[np.isin(labels, HELD_OUT_OUT)], k, seed + 1, calib)
    return {"in": inside, "out": outside}


LOCALISATION_PNG = "localisation.png"


def evaluate_model(
    model_dir: Path,
    k: int = 1000,
    seed: int = 0,
    held_out: bool = True,
    log=print,
    localisation_images: int = 200,
    localisation_k: int = 100,
    skip_sets: tuple[str, ...] | list[str] = (),
    images: int = 0,
) -> dict[str, Any]:
    """Score the test split against every OOD set (less `skip_sets`; the `digits` set is left out by itself
    where the model's dataset is digits) and write the report, the ROC figure and the manifest summary."""
    manifest = read_verified(model_dir)
    calib = manifest.get("calibration")
    if not calib:
        raise ExportError(f"{model_dir}: the manifest has no calibration block; re-export the model")
    model = load_checkpoint(model_dir)
    cfg = model.cfg
    data = prepare_config(cfg)
    test = data.test
    if 0 < images < len(test):  # a seeded subsample of the test split; each OOD set is as large
        test = test[np.sort(np.random.default_rng(seed + 7).permutation(len(test))[:images])]
    t0 = time.monotonic()
    log(f"scoring the test split ({len(test)} of {len(data.test)} images, K={k})")
    test_scores = score_all(model, test, k, seed, calib)
    results: dict[str, dict[str, dict[str, float]]] = {}
    curves: dict[str, tuple[dict, dict]] = {}
    sets = ood_sets(test, data.levels, seed, dataset=cfg.dataset, skip=skip_sets)
    if not sets:
        raise ExportError(f"every OOD set is skipped ({', '.join(skip_sets)}): nothing to evaluate")
    for i, (name, images) in enumerate(sets.items()):
        log(f"scoring OOD set {name!r}")
        out_scores = score_all(model, images, k, seed + 10 + i, calib)
        results[name] = {s: roc_metrics(test_scores[s], out_scores[s]) for s in test_scores}
        curves[name] = (test_scores, out_scores)
    if held_out and cfg.dataset == "digits" and cfg.classes is None:
        ho = held_out_class_scores(cfg, k, seed + 100, log)
        results["held_out_classes"] = {s: roc_metrics(ho["in"][s], ho["out"][s]) for s in ho["in"]}
        curves["held_out_classes"] = (ho["in"], ho["out"])
    localisation = None
    if calib.get("anomaly_map") and localisation_images:
        sub = data.test[np.sort(np.random.default_rng(seed + 3).permutation(len(data.test))[:localisation_images])]
        pool = data.val[: max(1, min(len(data.val), 1000))]  # pasted patches come from other (validation) images
        localisation, examples = localisation_benchmark(
            model, calib, sub, pool, data.levels, localisation_k, seed + 3, log
        )
        threshold = localisation["pixel_threshold_at_0.01"]
        localisation_figure(model_dir / LOCALISATION_PNG, examples, data.levels, threshold)
    elif localisation_images:
        log("localisation: skipped, the version has no anomaly-map calibration (re-export it with vae-export)")
    flagged = {}
    for s, block in calib["scores"].items():
        flagged[s] = {fpr: float(np.mean(test_scores[s] > thr)) for fpr, thr in block["thresholds"].items()}
    summary = {
        "K": k,
        "seed": seed,
        "test_images": int(len(test)),
        "ood_sets": list(sets),
        "default_score": calib["default_score"],
        "results": results,
        "test_flagged_fraction": flagged,
        "seconds": round(time.monotonic() - t0, 1),
        **({"localisation": localisation} if localisation else {}),
    }
    write_outputs(model_dir, manifest, summary, curves)
    return summary


def markdown(summary: dict[str, Any]) -> str:
    scores = list(next(iter(summary["results"].values())))
    lines = [
        f"# OOD evaluation (K={summary['K']} importance samples, {summary['test_images']} test images in-distribution)",
        "",
        f"Default score: `{summary['default_score']}`. Higher score = more anomalous; OOD is the positive class.",
        "",
        "| OOD set | " + " | ".join(f"{s} AUROC / AUPR / FPR@95TPR" for s in scores) + " |",
        "|---|" + "---|" * len(scores),
    ]
    for name, per_score in summary["results"].items():
        cells = [f"{m['auroc']:.3f} / {m['aupr']:.3f} / {m['fpr_at_95_tpr']:.3f}" for m in per_score.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Fraction of the in-distribution test split flagged at the calibrated thresholds:",
        "",
        "| score | " + " | ".join(f"fpr {f}" for f in next(iter(summary["test_flagged_fraction"].values()))) + " |",
        "|---|" + "---|" * len(next(iter(summary["test_flagged_fraction"].values()))),
    ]
    for s, per in summary["test_flagged_fraction"].items():
        lines.append(f"| {s} | " + " | ".join(f"{v:.3%}" for v in per.values()) + " |")
    text = "\n".join(lines) + "\n"
    if "localisation" in summary:
        text += "\n" + localisation_markdown(summary["localisation"])
    return text


def write_outputs(model_dir: Path, manifest: dict, summary: dict, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    (model_dir / "ood_report.md").write_text(markdown(summary))
    names = list(curves)
    cols = 4
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        s_in, s_out = curves[name]
        for score in s_in:
            y = np.r_[np.zeros(len(s_in[score])), np.ones(len(s_out[score]))]
            fpr, tpr, _ = roc_curve(y, np.r_[s_in[score], s_out[score]])
            auc = summary["results"][name][score]["auroc"]
            ax.plot(fpr, tpr, label=f"{score} ({auc:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_title(name)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(model_dir / "ood_roc.png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    manifest["ood_eval"] = summary
    for fname in ("ood_report.md", "ood_roc.png", LOCALISATION_PNG):
        if fname == LOCALISATION_PNG and "localisation" not in summary:
            continue
        manifest["files"][fname] = sha256_file(model_dir / fname)
    write_manifest(model_dir, manifest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vae-ood-eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model_dir", type=Path, help="a model version directory, e.g. models/digits/1")
    p.add_argument("--k", type=int, default=1000, help="importance samples K per image")
    p.add_argument("--seed", type=int, default=0, help="seed of the OOD sets and of the importance samples")
    p.add_argument(
        "--images",
        type=int,
        default=0,
        help="score a seeded subsample of this many test images, and OOD sets as large (0: the whole test split)",
    )
    p.add_argument(
        "--no-held-out",
        action="store_true",
        help="skip the held-out-class model (digits: trains the model's configuration on digits 0-4)",
    )
    p.add_argument(
        "--localisation-images",
        type=int,
        default=200,
        help="held-out test images that get each synthetic defect for the localisation benchmark (0: skip it)",
    )
    p.add_argument(
        "--localisation-k", type=int, default=100, help="importance samples K per image of the localisation benchmark"
    )
    p.add_argument(
        "--skip-set",
        action="append",
        default=[],
        choices=SET_NAMES,
        metavar="NAME",
        help="leave out a generated OOD set (repeatable), e.g. digits for digit data the dataset name does not"
        " reveal (the digits set is left out by itself for digits and MNIST-like datasets); one of"
        f" {', '.join(SET_NAMES)}",
    )
    args = p.parse_args(argv)
    try:
        summary = evaluate_model(
            args.model_dir,
            args.k,
            args.seed,
            not args.no_held_out,
            localisation_images=args.localisation_images,
            localisation_k=args.localisation_k,
            skip_sets=args.skip_set,
            images=args.images,
        )
    except ExportError as exc:
        print(f"vae-ood-eval: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(summary))
    written = ["ood_report.md", "ood_roc.png"] + ([LOCALISATION_PNG] if "localisation" in summary else [])
    print("wrote " + ", ".join(str(args.model_dir / f) for f in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
