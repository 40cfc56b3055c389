"""Calibration maths against hand-computed values, and the OOD flag end to end."""

import numpy as np
import pytest

from service.calibration import ScoreCalibration


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


def test_score_flags_an_obvious_ood_image_and_passes_a_digit(client, test_images):
    manifest = client.get("/v1/models/digits/1").json()
    assert manifest["calibration"]["default_score"] == "combined"
    noise = np.random.default_rng(0).integers(0, 17, (8, 8)).tolist()
    r = client.post("/score", json={"images": [test_images[5].tolist(), noise], "num_samples": 500})
    body = r.json()
    assert body["score_name"] == "combined" and body["fpr"] == 0.01
    digit, odd = body["results"]
    assert digit["is_ood"] is False and digit["p_value"] > 0.01
    assert odd["is_ood"] is True and odd["score"] > odd["threshold"] and odd["p_value"] < 0.01
    for name in ("nll_bpd", "complexity", "typicality", "combined"):
        res = client.post("/score", json={"images": [noise], "score": name, "fpr": 0.05, "num_samples": 100}).json()
        assert res["score_name"] == name and res["results"][0]["is_ood"] is True
