"""Synthetic defects, the localisation metrics, the anomaly-map formulas, and vae-ood-eval's benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.defects import MAX_FPR, MIN_CHANGE, aupro, auroc, defect_kinds, make_defects
from vae_contract.formulas import (
    COMPRESSOR,
    MapPart,
    PixelNllAccumulator,
    anomaly_maps,
    expected_values,
    gaussian_blur,
    map_calibration_block,
    residual_maps,
)
from vae_contract.manifest import Calibration


def test_auroc_matches_its_definition():
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5  # ties count one half
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(size=300), rng.normal(1.0, size=200)
    from sklearn.metrics import roc_auc_score

    assert auroc(neg, pos) == pytest.approx(roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[neg, pos]))


def test_aupro_of_a_perfect_a_useless_and_a_partial_map():
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[0, 2:6, 2:6] = masks[1, 8:12, 1:3] = masks[2, 0:3, 10:16] = True
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0, abs=0.01)
    noise = np.random.default_rng(1).random(masks.shape)
    # a map unrelated to the defects: PRO follows the FPR, so the area up to 0.3 over 0.3 is about 0.15
    assert aupro(noise, masks) == pytest.approx(MAX_FPR / 2, abs=0.05)
    half = masks.astype(float)
    half[0] = 0.0  # one region of three missed entirely: about two thirds of the perfect area
    assert aupro(half, masks) == pytest.approx(2 / 3, abs=0.05)


@pytest.mark.parametrize("channels", [1, 3])
def test_defects_change_what_their_masks_say(channels):
    rng = np.random.default_rng(0)
    images = rng.integers(60, 200, size=(12, 28, 28, channels)).astype(np.uint8)
    for kind in defect_kinds(channels):
        bad, masks = make_defects(images, 256, kind, seed=3)
        again, masks_again = make_defects(images, 256, kind, seed=3)
        assert (bad == again).all() and (masks == masks_again).all()  # seeded
        changed = (np.abs(bad.astype(int) - images.astype(int)) >= MIN_CHANGE * 255).any(-1)
        assert (masks == changed).all() and masks.sum((1, 2)).min() >= 2, kind
        assert masks.mean() < 0.5, kind  # a defect, not a new image
    assert "colour_spot" in defect_kinds(3) and "colour_spot" not in defect_kinds(1)


def test_pixel_accumulator_in_chunks_equals_one_pass():
    rng = np.random.default_rng(0)
    log_w = rng.normal(-300, 5, size=(1000, 3))
    pix = -rng.gamma(2.0, size=(1000, 3, 20))
    whole = PixelNllAccumulator.empty(3, 20)
    whole.add(log_w, pix)
    chunked = PixelNllAccumulator.empty(3, 20)
    for i in range(0, 1000, 250):
        chunked.add(log_w[i : i + 250], pix[i : i + 250])
    w = np.exp(log_w - log_w.max(0))
    direct = -(w[..., None] * pix).sum(0) / w.sum(0)[:, None]
    np.testing.assert_allclose(chunked.expected_nll(), direct, rtol=1e-12)
    np.testing.assert_allclose(whole.expected_nll(), direct, rtol=1e-12)


def test_map_calibration_tabulates_the_validation_pixels():
    rng = np.random.default_rng(0)
    e = rng.gamma(2.0, size=(400, 64)) * np.linspace(0.1, 3, 64)
    r = rng.random((400, 64))
    block = map_calibration_block(e, r, (8, 8), k=100, seed=0)
    maps = anomaly_maps(e, r, (8, 8), block)
    assert maps.shape == (400, 8, 8)
    assert block["n"] == 400 * 64 and block["units"] == "nats" and set(block["parts"]) == {"nll", "residual"}
    assert block["parts"]["residual"]["blur_px"] == 1.0 and block["parts"]["nll"]["blur_px"] == 0.5
    # about 1% (5%) of the validation pixels lie above the 0.01 (0.05) threshold
    assert (maps > block["thresholds"]["0.01"]).mean() == pytest.approx(0.01, abs=0.002)
    assert (maps > block["thresholds"]["0.05"]).mean() == pytest.approx(0.05, abs=0.005)
    many, many_r = rng.gamma(2.0, size=(400, 784)), rng.random((400, 784))  # 313,600 values: 200,000 tabulated
    big = map_calibration_block(many, many_r, (28, 28), k=100, seed=0)
    assert big["n"] == 200_000 and big == map_calibration_block(many, many_r, (28, 28), k=100, seed=0)
    Calibration.model_validate({**_calibration_stub(), "anomaly_map": big})  # the manifest's schema takes it


def _calibration_stub() -> dict:
    table = {"probs": [0.0, 1.0], "values": [0.0, 1.0]}
    score = {"units": "bits/dim", "n": 2, "quantiles": table}
    return {
        "split": "val",
        "images": 2,
        "K": 10,
        "seed": 0,
        "default_score": "nll_bpd",
        "default_fpr": 0.01,
        "typicality_center_bpd": 0.0,
        "standardize": {},
        "compressor": COMPRESSOR,
        "scores": {"nll_bpd": score},
    }


def test_each_part_of_the_map_reads_its_own_tail():
    """A pixel far out in either part's validation tail is far out in the map; the map ranks by the larger
    surprise, and values past every validation value keep ranking higher (the exponential tail)."""
    rng = np.random.default_rng(1)
    e, r = rng.gamma(2.0, size=(300, 64)), rng.random((300, 64)) * 0.1
    block = map_calibration_block(e, r, (8, 8), k=100, seed=0)
    probe_e, probe_r = np.full((4, 64), np.median(e)), np.full((4, 64), np.median(r))
    probe_e[1, 27], probe_r[2, 27], probe_r[3, 27] = 40.0, 5.0, 50.0  # one pixel far out in one part each
    maps = anomaly_maps(probe_e, probe_r, (8, 8), block)
    cut = block["thresholds"]["0.01"]
    assert maps[0].max() < cut  # a typical image: nothing flagged
    for i in (1, 2, 3):
        assert maps[i].reshape(-1).argmax() == 27 and maps[i].max() > cut
    assert maps[3].max() > maps[2].max()
    part = MapPart.from_block(block["parts"]["nll"])
    smoothed = gaussian_blur(e.reshape(-1, 8, 8), part.blur_px)  # what the part's table is of
    probes = np.array([-1.0, np.median(smoothed), np.quantile(smoothed, 0.99), part.values[-1], part.values[-1] + 1])
    s = part.surprise(probes)
    assert s[0] == 0.0 and np.all(np.diff(s) > 0)
    assert s[1] == pytest.approx(np.log(2), abs=0.02)  # half the validation pixels lie above the median
    assert s[2] == pytest.approx(np.log(100), abs=0.05)  # and 1% above the 0.99 quantile


def test_a_block_without_parts_keeps_the_expected_nll_map():
    """Versions calibrated before the residual part keep their map: the expected NLL itself."""
    e = np.random.default_rng(2).gamma(2.0, size=(3, 64))
    legacy = {"units": "nats", "definition": "E_q[-log p(x_p|z)]", "quantiles": {"probs": [0, 1], "values": [0, 1]}}
    np.testing.assert_array_equal(anomaly_maps(e, None, (8, 8), legacy), e.reshape(3, 8, 8))
    with pytest.raises(ValueError, match="residual"):
        anomaly_maps(e, None, (8, 8), map_calibration_block(e, e, (8, 8), k=10, seed=0))


def test_gaussian_blur_matches_scipy_and_residuals_sum_channels():
    from scipy.ndimage import gaussian_filter

    m = np.random.default_rng(3).random((2, 9, 7))
    for sigma in (0.25, 0.5, 1.0, 2.0):
        want = gaussian_filter(m, sigma=(0, sigma, sigma), mode="nearest", truncate=4.0)
        np.testing.assert_allclose(gaussian_blur(m, sigma), want, atol=1e-12)
    x = np.array([[0, 255, 10, 20, 30, 40]])  # one row of 2 RGB pixels
    means = np.array([[0.0, 0.0, 10.0, 20.0, 30.0, 45.1]])
    np.testing.assert_allclose(residual_maps(x, means, 256, 3), [[1.0, 5.1 / 255]])
    probs = np.array([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]])
    np.testing.assert_allclose(expected_values(probs), [[0.5, 2.0]])


def test_ood_eval_writes_the_localisation_benchmark(version_dir: Path, tmp_path: Path):
    import shutil

    from training.ood_eval import LOCALISATION_PNG, evaluate_model
    from vae_contract.manifest import read_manifest, verify_files

    target = tmp_path / "digits" / "1"
    shutil.copytree(version_dir, target)
    summary = evaluate_model(
        target, k=50, held_out=False, log=lambda *_: None, localisation_images=40, localisation_k=50
    )
    loc = summary["localisation"]
    assert set(loc["results"]) == set(defect_kinds(1)) and loc["K"] == 50
    for r in loc["results"].values():
        assert 0.5 < r["pixel_auroc"] <= 1.0 and 0.0 <= r["aupro"] <= 1.0 and 0.0 <= r["image_auroc"] <= 1.0
    assert (target / LOCALISATION_PNG).stat().st_size > 10_000
    assert "## Localisation" in (target / "ood_report.md").read_text()
    manifest, _ = read_manifest(target)
    verify_files(target, manifest)
    assert json.loads(json.dumps(manifest["ood_eval"]["localisation"])) == loc


def test_the_residual_part_reads_the_same_reconstruction_in_torch_and_in_the_service(version_dir: Path):
    """vae-ood-eval's maps (torch) and the service's (onnxruntime) read x against the same E[x|z = mu(x)]."""
    import torch

    from service.batch_score import load_model
    from service.settings import Settings
    from training.data import prepare
    from training.evaluate import expected_images
    from training.export import load_checkpoint

    x = prepare("digits").test[:20].reshape(20, -1).astype(np.int64)
    torch_means = expected_images(load_checkpoint(version_dir), torch.from_numpy(x))
    mv = load_model(version_dir, Settings(models_dir=version_dir.parents[1], engine="onnxruntime"))
    service_means = mv.reconstruction_means(x)
    assert torch_means.shape == service_means.shape == (20, 64)
    np.testing.assert_allclose(service_means, torch_means, atol=1e-4)  # in levels, of 17
    assert np.abs(x - torch_means).mean() > 0.1  # a reconstruction, not the image itself
