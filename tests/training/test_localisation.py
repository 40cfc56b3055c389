"""Synthetic defects, the localisation metrics, the anomaly-map formulas, and vae-ood-eval's benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.defects import MAX_FPR, MIN_CHANGE, aupro, auroc, defect_kinds, make_defects
from vae_contract.formulas import COMPRESSOR, PixelNllAccumulator, expected_values
from vae_contract.manifest import Calibration
from vae_contract.maps import (
    MAP_DEFINITION,
    MAP_PARTS,
    REFIT_FPR,
    TWO_PART_MAP_DEFINITION,
    TWO_PARTS,
    MapPart,
    anomaly_maps,
    gaussian_blur,
    map_calibration_block,
    map_means,
    map_reconstructions,
    refilled_images,
    residual_maps,
)

LEVELS = 17


def blurred_copy(x: np.ndarray) -> np.ndarray:
    """A stand-in reconstruction of 8x8 grey images (B, 64): each pixel the mean of its 3x3 neighbourhood, so it
    follows what it is shown, defects included, as a VAE's reconstruction does."""
    from scipy.ndimage import uniform_filter

    imgs = np.asarray(x, dtype=np.float64).reshape(-1, 8, 8)
    return uniform_filter(imgs, size=(1, 3, 3), mode="nearest").reshape(len(imgs), -1)


def calibrated(e: np.ndarray, x: np.ndarray, shape: tuple[int, int] = (8, 8), k: int = 100) -> dict:
    return map_calibration_block(e, x, blurred_copy if shape == (8, 8) else lambda v: v * 0.9, shape, LEVELS, 1, k, 0)


def maps_of(e: np.ndarray, x: np.ndarray, block: dict) -> np.ndarray:
    """The maps of images x (B, 64) with expected NLLs e, as the service and training compute them."""
    means = map_means(x, e, blurred_copy, (8, 8), block, LEVELS, 1)
    return anomaly_maps(e, residual_maps(x, means, LEVELS, 1) if means is not None else None, (8, 8), block)


def validation_like(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n smooth 8x8 images in 0..16 and expected NLLs that vary from pixel to pixel."""
    from scipy.ndimage import gaussian_filter

    x = np.rint(np.clip(gaussian_filter(rng.random((n, 8, 8)), sigma=(0, 1.5, 1.5)) * 40 - 12, 0, 16))
    e = rng.gamma(2.0, size=(n, 64)) * np.linspace(0.1, 3, 64)
    return x.reshape(n, 64).astype(np.int64), e


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
    x, e = validation_like(rng, 400)
    block = calibrated(e, x)
    maps = maps_of(e, x, block)
    assert maps.shape == (400, 8, 8)
    assert block["n"] == 400 * 64 and block["units"] == "nats" and list(block["parts"]) == list(MAP_PARTS)
    assert list(MAP_PARTS) == ["nll", "residual", "residual_fine"] and block["definition"] == MAP_DEFINITION
    assert block["parts"]["residual"]["blur_px"] == 1.0 and block["parts"]["nll"]["blur_px"] == 0.5
    assert block["parts"]["residual_fine"]["blur_px"] == 0.0  # the same residual, read unsmoothed
    assert block["refit"]["fpr"] == REFIT_FPR and block["refit"]["residual"]["blur_px"] == 1.0
    assert block["refit"]["fill"] == [int(v) for v in np.rint(x.mean(0))] and map_reconstructions(block) == 2
    # about 1% (5%) of the validation pixels lie above the 0.01 (0.05) threshold
    assert (maps > block["thresholds"]["0.01"]).mean() == pytest.approx(0.01, abs=0.002)
    assert (maps > block["thresholds"]["0.05"]).mean() == pytest.approx(0.05, abs=0.005)
    many = rng.gamma(2.0, size=(400, 784))  # 313,600 values: 200,000 tabulated
    many_x = rng.integers(0, LEVELS, size=(400, 784))
    big = calibrated(many, many_x, (28, 28))
    assert big["n"] == 200_000 and big == calibrated(many, many_x, (28, 28))
    Calibration.model_validate({**_calibration_stub(), "anomaly_map": big})  # the manifest's schema takes it


def test_the_first_pass_flags_its_share_of_validation_pixels_and_refills_only_them():
    rng = np.random.default_rng(4)
    x, e = validation_like(rng, 400)
    block = calibrated(e, x)
    refilled = refilled_images(x, e, blurred_copy(x), (8, 8), block, LEVELS, 1)
    fill = np.broadcast_to(np.asarray(block["refit"]["fill"]), x.shape)
    changed = refilled != x  # flagged pixels whose value the fill moved
    assert np.all(refilled[changed] == fill[changed])  # a flagged value becomes the fill, the others stay
    assert 0.005 < changed.mean() <= REFIT_FPR + 0.002  # REFIT_FPR of the pixels, less those already at the fill


def test_the_second_pass_reconstructs_the_image_with_the_first_pass_flags_refilled():
    """The first pass is the map read against mu(x) with refit's residual table; the pixels it puts above refit's
    threshold (here mostly a far-level block's) are set to the fill, and the residual reads that image's
    reconstruction. (What it buys on real models: docs/quality.md's localisation table.)"""
    rng = np.random.default_rng(5)
    x, e = validation_like(rng, 400)
    block = calibrated(e, x)
    test_x, test_e = validation_like(rng, 50)
    bad = test_x.reshape(-1, 8, 8).copy()
    bad[:, 3:5, 3:5] = np.where(bad[:, 3:5, 3:5].mean((1, 2), keepdims=True) > 8, 0, 16)  # a 2x2 block, far level
    bad = bad.reshape(-1, 64)
    region = np.zeros((8, 8), dtype=bool)
    region[3:5, 3:5] = True
    first_block = {"parts": {"nll": block["parts"]["nll"], "residual": block["refit"]["residual"]}}
    first = anomaly_maps(test_e, residual_maps(bad, blurred_copy(bad), LEVELS, 1), (8, 8), first_block)
    flags = first > block["refit"]["threshold"]
    refilled = refilled_images(bad, test_e, blurred_copy(bad), (8, 8), block, LEVELS, 1)
    np.testing.assert_array_equal(refilled, np.where(flags.reshape(50, 64), block["refit"]["fill"], bad))
    # the block is flagged, and less of the rest (the copy's blur spreads the block's residual)
    assert flags[:, region].mean() > 0.9 and flags[:, region].mean() > 2 * flags[:, ~region].mean()
    second = map_means(bad, test_e, blurred_copy, (8, 8), block, LEVELS, 1)
    np.testing.assert_array_equal(second, blurred_copy(refilled))


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
    x, e = validation_like(rng, 300)
    block = calibrated(e, x)
    r = residual_maps(x, blurred_copy(x), LEVELS, 1)
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


def test_the_unsmoothed_residual_keeps_a_thin_line_the_smoothed_one_spreads():
    """residual_fine reads the second pass's residual unsmoothed beside the smoothed part: on a 1-pixel line it
    ranks the line's pixels above their neighbours better than the two-part map does (on real models: scratches
    on a grass texture from AUPRO 0.829 to 0.871, docs/quality.md). A block calibrated before residual_fine
    (its two parts) keeps its map, the larger of those two surprises."""
    rng = np.random.default_rng(6)
    x, e = validation_like(rng, 400)
    block = calibrated(e, x)
    test_x, test_e = validation_like(rng, 60)
    bad = test_x.reshape(-1, 8, 8).copy()
    bad[:, 2:6, 4] = np.where(bad[:, 2:6, 4].mean(1, keepdims=True) > 8, 0, 16)  # a vertical line, far level
    bad = bad.reshape(-1, 64)
    line = np.zeros((60, 8, 8), dtype=bool)
    line[:, 2:6, 4] = True
    beside = np.zeros_like(line)
    beside[:, 1:7, 3:6] = True
    beside &= ~line  # the pixels around the line, where a smoothed residual spreads it
    means = map_means(bad, test_e, blurred_copy, (8, 8), block, LEVELS, 1)
    residual = residual_maps(bad, means, LEVELS, 1)
    two = {**block, "definition": TWO_PART_MAP_DEFINITION, "parts": {n: block["parts"][n] for n in TWO_PARTS}}
    three_map, two_map = (anomaly_maps(test_e, residual, (8, 8), b) for b in (block, two))
    surprises = [
        MapPart.from_block(two["parts"][n]).surprise(gaussian_blur(v.reshape(-1, 8, 8), two["parts"][n]["blur_px"]))
        for n, v in (("nll", test_e), ("residual", residual))
    ]
    np.testing.assert_array_equal(two_map, np.maximum(*surprises))
    assert np.all(three_map >= two_map)  # a third surprise can only raise a pixel
    gap = [auroc(m[beside], m[line]) for m in (two_map, three_map)]
    assert gap[1] > gap[0] + 0.05, gap


def test_the_manifest_checks_the_refit_block(version_dir: Path):
    """A refit's fill holds one level per image value, and a refit needs the map's parts."""
    import copy

    from vae_contract.manifest import ManifestError, validate_manifest

    manifest = json.loads((version_dir / "manifest.json").read_text())
    validate_manifest(manifest)
    fill = manifest["calibration"]["anomaly_map"]["refit"]["fill"]
    assert len(fill) == 64 and 0 <= min(fill) and max(fill) < LEVELS
    for bad_fill in (fill[:-1], [*fill[:-1], LEVELS], [-1, *fill[1:]]):
        broken = copy.deepcopy(manifest)
        broken["calibration"]["anomaly_map"]["refit"]["fill"] = bad_fill
        with pytest.raises(ManifestError, match="refit.fill"):
            validate_manifest(broken)
    no_parts = copy.deepcopy(manifest)
    no_parts["calibration"]["anomaly_map"].pop("parts")
    with pytest.raises(ManifestError, match="refit needs"):
        validate_manifest(no_parts)
    two_parts = copy.deepcopy(manifest)  # as calibrated before residual_fine: still valid
    two_parts["calibration"]["anomaly_map"]["parts"].pop("residual_fine")
    validate_manifest(two_parts)
    two_parts["calibration"]["anomaly_map"]["parts"].pop("residual")
    with pytest.raises(ManifestError, match="parts must be"):
        validate_manifest(two_parts)


def test_a_block_without_parts_keeps_the_expected_nll_map():
    """Versions calibrated before the residual part keep their map: the expected NLL itself."""
    x, e = validation_like(np.random.default_rng(2), 3)
    legacy = {"units": "nats", "definition": "E_q[-log p(x_p|z)]", "quantiles": {"probs": [0, 1], "values": [0, 1]}}
    assert map_reconstructions(legacy) == 0 and map_means(x, e, blurred_copy, (8, 8), legacy, LEVELS, 1) is None
    np.testing.assert_array_equal(anomaly_maps(e, None, (8, 8), legacy), e.reshape(3, 8, 8))
    with pytest.raises(ValueError, match="residual"):
        anomaly_maps(e, None, (8, 8), calibrated(e, x, k=10))


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
    """vae-ood-eval's maps (torch) and the service's (onnxruntime) read x against the same reconstructions: E[x|z =
    mu(x)], and the second pass's of the same refilled images."""
    import torch

    from service.batch_score import load_model
    from service.settings import Settings
    from training.data import prepare
    from training.evaluate import expected_images, importance_pass
    from training.export import load_checkpoint
    from training.ood import reconstructor
    from vae_contract.manifest import read_manifest

    model = load_checkpoint(version_dir)
    x = prepare("digits").test[:20].reshape(20, -1).astype(np.int64)
    bad = make_defects(x.reshape(20, 8, 8, 1), LEVELS, "scratch", seed=0)[0].reshape(20, -1).astype(np.int64)
    torch_means = expected_images(model, torch.from_numpy(x))
    mv = load_model(version_dir, Settings(models_dir=version_dir.parents[1], engine="onnxruntime"))
    service_means = mv.reconstruction_means(x)
    assert torch_means.shape == service_means.shape == (20, 64)
    np.testing.assert_allclose(service_means, torch_means, atol=1e-4)  # in levels, of 17
    assert np.abs(x - torch_means).mean() > 0.1  # a reconstruction, not the image itself
    block = read_manifest(version_dir)[0]["calibration"]["anomaly_map"]
    assert map_reconstructions(block) == mv.map_reconstructions == 2
    e = importance_pass(model, torch.from_numpy(bad), 50, seed=0).expected_nll
    refilled = mv.refilled_images(e, bad, mv.reconstruction_means(bad))
    assert (refilled != bad).any()  # the scratches flag pixels
    torch_second = map_means(bad, e, reconstructor(model), (8, 8), block, LEVELS, 1)
    np.testing.assert_allclose(mv.map_means(e, bad), torch_second, atol=1e-4)
    np.testing.assert_allclose(torch_second, expected_images(model, torch.from_numpy(refilled)), atol=1e-4)
