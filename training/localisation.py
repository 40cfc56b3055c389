"""The localisation benchmark of `vae-ood-eval`: synthetic defects with known masks on held-out normal images,
scored by the version's anomaly maps (pixel AUROC, AUPRO) and its default score (image AUROC), per defect kind.

The maps are computed as the service computes them (vae_contract.formulas.anomaly_maps), on torch; writes
localisation.png beside the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.defects import MAX_FPR, aupro, auroc, defect_kinds, make_defects
from training.model import VAE
from training.ood import image_statistics, scores_of
from vae_contract.formulas import ScoreCalibration

Log = Callable[[str], None]


def maps_and_scores(
    model: VAE, images: np.ndarray, calib: dict[str, Any], k: int, seed: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Anomaly maps (N, H, W) and every image score of images (N, H, W, C), from one pass of K samples (and the
    reconstruction at mu(x) the map's residual part reads)."""
    x = images.reshape(len(images), -1).astype(np.int64)
    stats = image_statistics(model, x, k, seed, maps=True)
    maps = stats.anomaly_maps(model, x, calib["anomaly_map"])
    scores = scores_of(stats, images, calib)
    return maps, scores


def localisation_benchmark(
    model: VAE,
    calib: dict[str, Any],
    test: np.ndarray,
    pool: np.ndarray,
    levels: int,
    k: int,
    seed: int,
    log: Log = print,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, figure data): per defect kind, pixel AUROC over every pixel of the clean and defective images,
    AUPRO up to MAX_FPR, image AUROC of the default score, and the defects' size."""
    default = calib["default_score"]
    clean_maps, clean_scores = maps_and_scores(model, test, calib, k, seed)
    results: dict[str, dict[str, float]] = {}
    examples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for i, kind in enumerate(defect_kinds(test.shape[-1])):
        log(f"localisation: defect {kind!r} on {len(test)} images (K={k})")
        bad, masks = make_defects(test, levels, kind, seed + 1000 + i, pool)
        maps, scores = maps_and_scores(model, bad, calib, k, seed + 2000 + i)
        all_maps = np.concatenate([clean_maps, maps])
        all_masks = np.concatenate([np.zeros_like(masks), masks])
        results[kind] = {
            "pixel_auroc": auroc(all_maps[~all_masks], all_maps[all_masks]),
            "aupro": aupro(all_maps, all_masks),
            "image_auroc": auroc(clean_scores[default], scores[default]),
            "defect_pixels_mean": float(masks.sum((1, 2)).mean()),
        }
        examples[kind] = (bad[:3], maps[:3], masks[:3])
    summary = {
        "K": k,
        "seed": seed,
        "images": int(len(test)),
        "image_score": default,
        "max_fpr": MAX_FPR,
        "pixel_threshold_at_0.01": ScoreCalibration.from_block("anomaly_map", calib["anomaly_map"]).threshold(0.01),
        "results": results,
    }
    return summary, examples


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"## Localisation (synthetic defects on {summary['images']} held-out test images, K={summary['K']})",
        "",
        f"Pixel AUROC over every pixel of the clean and the defective images; AUPRO: per-region overlap "
        f"integrated up to {summary['max_fpr']:.0%} pixel FPR, divided by it; image AUROC of the default score "
        f"`{summary['image_score']}` (clean against defective).",
        "",
        "| defect | pixels changed (mean) | pixel AUROC | AUPRO | image AUROC |",
        "|---|---|---|---|---|",
    ]
    for kind, r in summary["results"].items():
        lines.append(
            f"| {kind} | {r['defect_pixels_mean']:.1f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
            f"{r['image_auroc']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def outline(ax: Any, mask: np.ndarray, colour: str, dashed: bool = False) -> None:
    """The boundary of a boolean (H, W) mask along its pixels' edges, on an imshow axis (pixel centres at
    integers): contoured on a nearest-neighbour upsampling, so a small image's outlines follow its pixels
    instead of cutting their corners."""
    up = 8
    h, w = mask.shape
    big = np.kron(np.asarray(mask, dtype=float), np.ones((up, up)))
    ys, xs = (np.arange(h * up) + 0.5) / up - 0.5, (np.arange(w * up) + 0.5) / up - 0.5
    style = "dashed" if dashed else "solid"
    ax.contour(xs, ys, big, levels=[0.5], colors=colour, linewidths=0.9, linestyles=style)


def figure(path: Path, examples: dict[str, Any], levels: int, threshold: float) -> None:
    """One row a defect kind: three defective images, each with its map overlaid and the true mask outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(examples)
    fig, axes = plt.subplots(len(kinds), 6, figsize=(9, 1.6 * len(kinds)), squeeze=False)
    top = 2.0 * threshold
    for row, kind in zip(axes, kinds):
        images, maps, masks = examples[kind]
        for j in range(3):
            img = images[j] / (levels - 1)
            shown = img[..., 0] if img.shape[-1] == 1 else img
            row[2 * j].imshow(shown, cmap="gray", vmin=0, vmax=1)
            outline(row[2 * j], masks[j], "lime")
            row[2 * j + 1].imshow(shown, cmap="gray", vmin=0, vmax=1)
            im = row[2 * j + 1].imshow(np.clip(maps[j], 0, top), cmap="inferno", vmin=0, vmax=top, alpha=0.7)
            outline(row[2 * j + 1], masks[j], "lime", dashed=True)
            outline(row[2 * j + 1], maps[j] > threshold, "cyan")
        row[0].set_ylabel(kind, fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("defect (true mask: green) | anomaly map (flagged at fpr 0.01: cyan; true mask dashed)", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="anomaly map (nats of surprise)")
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
