"""The contract's formulas against hand-computed values."""

import zlib

import numpy as np
import pytest

from vae_contract.formulas import (
    COMPRESSOR,
    NOISE_BLOCK,
    PNG_FILTERS,
    ZLIB_RAW,
    ImportanceAccumulator,
    ScoreCalibration,
    compressed_bits,
    images_from_probs,
    importance_noise,
    quantile_table,
    raw_scores,
)


def table(values, n=None):
    values = np.sort(np.asarray(values, float))
    return ScoreCalibration("s", "bits/dim", n or len(values), np.linspace(0, 1, len(values)), values)


def test_p_values_by_hand():
    cal = table([1.0, 2.0, 3.0, 4.0])  # n = 4
    # (1 + #{scores >= s}) / (n + 1)
    np.testing.assert_allclose(cal.p_values(np.array([0.5, 1.0, 2.5, 4.0, 9.0])), [5 / 5, 5 / 5, 3 / 5, 2 / 5, 1 / 5])


def test_threshold_interpolates_like_numpy_quantile():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    cal = table(values)
    assert cal.threshold(0.25) == pytest.approx(4.0)  # Q(0.75): position 3 of 0..4
    assert cal.threshold(0.1) == pytest.approx(4.0 + 0.6 * 6.0)  # Q(0.9): between 4 and 10
    for fpr in (0.01, 0.05, 0.3):
        assert cal.threshold(fpr) == pytest.approx(np.quantile(values, 1 - fpr))


def test_p_values_from_a_quantile_summary():
    # n = 1000 scores summarised by 11 quantiles: counts read off the interpolated CDF
    cal = ScoreCalibration("s", "u", 1000, np.linspace(0, 1, 11), np.linspace(0, 10, 11))
    np.testing.assert_allclose(cal.p_values(np.array([5.0, 9.5, 20.0])), [501 / 1001, 51 / 1001, 1 / 1001])


def test_quantile_table_keeps_every_score_or_a_summary():
    t = quantile_table(np.array([3.0, 1.0, 2.0]))
    assert t == {"probs": [0.0, 0.5, 1.0], "values": [1.0, 2.0, 3.0]}
    big = quantile_table(np.arange(5000.0))
    assert len(big["probs"]) == 1001 and big["values"][0] == 0.0 and big["values"][-1] == 4999.0


def test_importance_noise_from_the_cache_is_the_noise_drawn_afresh_and_callers_cannot_change_it():
    from vae_contract.formulas import _noise_block

    _noise_block.cache_clear()
    first = importance_noise(11, 600, 4, start=250)
    first[:] = 0.0  # a caller writing into its noise must not change the next caller's
    again = importance_noise(11, 600, 4, start=250)
    assert _noise_block.cache_info().hits == 3
    fresh = np.concatenate(
        [np.random.default_rng([11, b]).standard_normal((NOISE_BLOCK, 4), dtype=np.float32) for b in (1, 2, 3)]
    )[:600]
    np.testing.assert_array_equal(again, fresh)


def test_importance_noise_is_blockwise_and_position_free():
    full = importance_noise(7, 1000, 3)
    assert full.shape == (1000, 3) and full.dtype == np.float32
    parts = [importance_noise(7, 250, 3, start=s) for s in range(0, 1000, 250)]
    np.testing.assert_array_equal(np.concatenate(parts), full)
    np.testing.assert_array_equal(importance_noise(7, 10, 3), full[:10])  # K=10 is a prefix of K=1000
    assert not np.array_equal(importance_noise(8, 10, 3), full[:10])
    with pytest.raises(ValueError):
        importance_noise(7, 10, 3, start=NOISE_BLOCK - 1)


def test_importance_accumulator_by_hand():
    log_w = np.log(np.array([[1.0, 2.0], [3.0, 2.0], [2.0, 2.0]]))  # K=3 samples of 2 images
    acc = ImportanceAccumulator.empty(2)
    acc.add(log_w[:2])
    acc.add(log_w[2:])
    np.testing.assert_allclose(acc.log_likelihood(), np.log([2.0, 2.0]))
    np.testing.assert_allclose(acc.elbo(), log_w.mean(0))
    np.testing.assert_allclose(acc.ess(), [36 / 14, 3.0])  # (sum w)^2 / sum w^2


def test_images_from_probs_modes():
    probs = np.array([[[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]])
    np.testing.assert_array_equal(images_from_probs(probs, "mode"), [[2, 0]])
    np.testing.assert_array_equal(images_from_probs(probs, "mean"), [[2, 0]])  # 1.6 -> 2, 0.5 -> 0 (round half even)
    draws = np.stack([images_from_probs(probs, "sample", np.random.default_rng(i)) for i in range(2000)])
    np.testing.assert_allclose((draws[:, 0, 0] == 2).mean(), 0.7, atol=0.04)


def test_fp32_parity_tolerance_scales_with_the_log_likelihood():
    from vae_contract.formulas import fp32_parity_tolerance

    tol = fp32_parity_tolerance(np.array([0.0, -85.0, -3000.0]))
    np.testing.assert_allclose(tol, [1e-3, 1e-3 + 1.7e-4, 7e-3])
    # never looser than a few fp32 ulps of the value itself would excuse, never tighter than 1e-3 nats
    assert np.all(tol >= 1e-3) and np.all(tol <= 1e-3 + 40 * np.spacing(np.float32(3000.0)))


def test_the_png_filter_coder_is_never_longer_than_raw_zlib_and_sees_smooth_images():
    """PNG_FILTERS takes the shortest of five filters, "none" (raw zlib) among them; a smooth gradient, many
    distinct bytes for raw zlib, is a few repeated residuals under the sub, up or Paeth filter."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = ((yy * 3 + xx * 5) % 256)[None, :, :, None].astype(np.uint8)
    noise = rng.integers(0, 256, (1, 32, 32, 3))
    colour = np.stack([smooth[..., 0], 255 - smooth[..., 0], smooth[..., 0] // 2], axis=-1)
    for images in (smooth, noise, colour):
        raw, filtered = compressed_bits(images, ZLIB_RAW), compressed_bits(images, PNG_FILTERS)
        assert np.all(filtered <= raw)
        assert raw[0] == 8 * len(zlib.compress(images[0].astype(np.uint8).tobytes(), 9))
    assert compressed_bits(smooth, PNG_FILTERS)[0] < 0.1 * compressed_bits(smooth, ZLIB_RAW)[0]
    assert compressed_bits(colour, PNG_FILTERS)[0] < 0.1 * compressed_bits(colour, ZLIB_RAW)[0]  # each channel
    assert COMPRESSOR == PNG_FILTERS  # what new calibrations record
    # rows (N, D) are one image row each; (N, H, W) grey images as (N, H, W, 1)
    np.testing.assert_array_equal(compressed_bits(smooth[..., 0]), compressed_bits(smooth))
    np.testing.assert_array_equal(compressed_bits(smooth.reshape(1, -1)), compressed_bits(smooth.reshape(1, 1, -1, 1)))
    with pytest.raises(ValueError, match="unknown compressor"):
        compressed_bits(smooth, "gzip")


def test_complexity_follows_the_calibrations_compressor():
    """A version calibrated with raw zlib keeps raw zlib's complexity (its thresholds were taken with it)."""
    images = np.random.default_rng(1).integers(0, 17, (4, 8, 8, 1))
    nll = np.full(4, 2.0)
    for coder in (ZLIB_RAW, PNG_FILTERS):
        scores = raw_scores(nll, images, compressor=coder)
        np.testing.assert_allclose(scores["complexity"], nll - compressed_bits(images, coder) / 64)
