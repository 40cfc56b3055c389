"""The OOD flag end to end."""

import math

import numpy as np
import pytest


def test_score_flags_an_obvious_ood_image_and_passes_a_digit(client, test_images):
    manifest = client.get("/v1/models/digits/1").json()
    assert manifest["calibration"]["default_score"] == "nll_bpd"
    noise = np.random.default_rng(0).integers(0, 17, (8, 8)).tolist()
    r = client.post("/score", json={"images": [test_images[5].tolist(), noise], "num_samples": 500})
    body = r.json()
    assert body["score_name"] == "nll_bpd" and body["fpr"] == 0.01
    digit, odd = body["results"]
    assert digit["is_ood"] is False and digit["p_value"] > 0.01
    assert odd["is_ood"] is True and odd["score"] > odd["threshold"] and odd["p_value"] < 0.01
    for name in ("nll_bpd", "complexity", "typicality", "combined", "dose"):
        res = client.post("/score", json={"images": [noise], "score": name, "fpr": 0.05, "num_samples": 100}).json()
        assert res["score_name"] == name and res["results"][0]["is_ood"] is True


def test_elbo_gap_is_the_likelihood_less_the_elbo(client, test_images):
    """elbo_gap (bits/dim) from the same K samples as the log-likelihood and ELBO /score returns; dose combines
    it with complexity, as the manifest's dose block says."""
    manifest = client.get("/v1/models/digits/1").json()
    assert manifest["calibration"]["scores"]["dose"]["parts"] == ["nll_bpd", "complexity", "elbo_gap"]
    images = [img.tolist() for img in test_images[:3]]
    res = client.post("/score", json={"images": images, "score": "elbo_gap", "num_samples": 100}).json()
    assert res["score_name"] == "elbo_gap"
    for r in res["results"]:
        gap = (r["log_likelihood_nats"] - r["elbo_nats"]) / (64 * math.log(2))
        assert r["score"] == pytest.approx(gap, rel=1e-9) and r["score"] >= 0.0  # log-mean-exp >= mean
