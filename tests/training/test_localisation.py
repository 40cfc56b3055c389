"""Synthetic defects, the localisation metrics, the anomaly-map formulas, and vae-ood-eval's benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.defects import MAX_FPR, MIN_CHANGE, aupro, auroc, defect_kinds, make_defects
from vae_contract.formulas import PixelNllAccumulator, anomaly_maps, map_calibration_block


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
    block = map_calibration_block(e, k=100, seed=0)
    maps = anomaly_maps(e)
    assert block["n"] == 400 * 64 and block["units"] == "nats"
    # about 1% (5%) of the validation pixels lie above the 0.01 (0.05) threshold
    assert (maps > block["thresholds"]["0.01"]).mean() == pytest.approx(0.01, abs=0.002)
    assert (maps > block["thresholds"]["0.05"]).mean() == pytest.approx(0.05, abs=0.005)
    many = rng.gamma(2.0, size=(400, 784))  # 313,600 values: a seeded 200,000 of them are tabulated
    big = map_calibration_block(many, k=100, seed=0)
    assert big["n"] == 200_000 and big == map_calibration_block(many, k=100, seed=0)
    assert big["thresholds"]["0.01"] == pytest.approx(np.quantile(many, 0.99), rel=0.02)


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
