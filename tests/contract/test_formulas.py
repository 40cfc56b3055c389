"""The contract's formulas against hand-computed values."""

import numpy as np
import pytest

from vae_contract.formulas import (
    NOISE_BLOCK,
    ImportanceAccumulator,
    ScoreCalibration,
    images_from_probs,
    importance_noise,
    quantile_table,
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
