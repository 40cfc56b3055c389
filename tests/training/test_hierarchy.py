"""Hierarchical (ladder) VAEs, --latent-layers N: the top-down loop, LLR>k, and the llr and dose scores end to end.

One small 2-layer digits model is trained, exported, verified and served once for the module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings
from training.config import ConfigError, TrainConfig
from training.data import prepare
from training.export import load_checkpoint
from training.model import VAE, LatentLayer, diag_gaussian_log_prob
from training.pipeline import run
from vae_contract.formulas import (
    dose_parts,
    dose_scores,
    needs_llr,
    quantile_table,
    score_block,
    two_sided_log_p,
    upper_tail_log_p,
)
from vae_contract.manifest import ManifestError, noise_width, validate_manifest

SMALL = dict(hidden=48, latent_dim=4, components=3, epochs=6, eval_k=40, ema=0.0, dropout=0.0, iw_train=2, seed=0)


def model(layers: int, **kw) -> VAE:
    cfg = TrainConfig(latent_layers=layers, **{**SMALL, **kw}).resolve(17, 1000, (8, 8, 1))
    torch.manual_seed(0)
    return VAE(cfg, 64, 17, (8, 8, 1)).eval()


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    cfg = TrainConfig(dataset="digits", latent_layers=2, **SMALL)
    run(cfg, root / "ladder" / "1", plots=False, progress=False, log=lambda *_: None)
    return root


def test_config_refuses_impossible_hierarchies():
    with pytest.raises(ConfigError, match="llr_k must be below latent_layers"):
        TrainConfig(latent_layers=2, llr_k=2)
    with pytest.raises(ConfigError, match="several latent layers"):
        TrainConfig(ood_score="llr")
    with pytest.raises(ConfigError, match="at most 8"):
        TrainConfig(latent_layers=9)
    with pytest.raises(ConfigError, match="positive integer"):
        TrainConfig(latent_layers=0)


def test_one_layer_keeps_the_single_gaussian_posterior():
    """latent_layers=1 is the model it always was: z = mu + sigma eps, log p(z) - log q(z|x), one encoder output."""
    m = model(1)
    x = torch.from_numpy(prepare("digits").test[:5].reshape(5, -1).astype(np.int64))
    eps = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mu, log_var = m.encoder.net(m.encoder.scale(x)).chunk(2, dim=-1)
        z = mu + torch.exp(0.5 * log_var) * eps
        want = m.decoder.log_prob(x, z) + (m.prior.log_prob(z) - diag_gaussian_log_prob(z, mu, log_var))
        got = m.log_weights(x, eps)
    assert m.noise_dim == 4 and not m.layers
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ladder_posterior_is_the_precision_weighted_product():
    gen = torch.Generator().manual_seed(0)
    mu_h, lv_h, mu_p, lv_p = (torch.randn(50, 4, generator=gen, dtype=torch.float64) * 3 for _ in range(4))
    mu, lv = LatentLayer.posterior((mu_h, lv_h), (mu_p, lv_p))
    prec = torch.exp(-lv_h) + torch.exp(-lv_p)
    torch.testing.assert_close(lv, -torch.log(prec))
    torch.testing.assert_close(mu, (mu_h * torch.exp(-lv_h) + mu_p * torch.exp(-lv_p)) / prec)


def test_llr_terms_share_the_noise_and_draw_the_bottom_layers_from_the_prior():
    m = model(3, llr_k=2)
    x = torch.from_numpy(prepare("digits").test[:4].reshape(4, -1).astype(np.int64))
    eps = torch.randn(5, 4, m.noise_dim, generator=torch.Generator().manual_seed(2))
    assert m.noise_dim == 12
    with torch.no_grad():
        full, part = m.llr_terms(x, eps)
        torch.testing.assert_close(full, m.log_weights(x, eps))
        # the new layers' priors start as N(0, I): with the bottom two layers from the prior, z is their noise
        z, ratio = m.latent_terms(x, eps, from_prior=2)
        torch.testing.assert_close(z, eps[..., 8:12])
        mu, log_var = m.encoder(x)
        top = mu + torch.exp(0.5 * log_var) * eps[..., :4]
        torch.testing.assert_close(ratio, m.prior.log_prob(top) - diag_gaussian_log_prob(top, mu, log_var))
        torch.testing.assert_close(part, m.decoder.log_prob(x, z) + ratio)


def test_two_sided_p_values_and_dose():
    rng = np.random.default_rng(0)
    half = rng.standard_normal(500)
    values = np.r_[half, -half]  # a symmetric sample: its table's tails mirror each other
    table = score_block("nll_bpd", values)
    lo, hi = values.min(), values.max()
    inside = two_sided_log_p(np.array([np.median(values), -1.0, 1.0, lo, hi]), table)
    assert inside[0] == pytest.approx(0.0, abs=1e-2)  # the median: p = 1
    assert inside[1] == pytest.approx(inside[2], abs=1e-9)  # both tails alike
    assert inside[3] == pytest.approx(-math.log(1001), abs=1e-9) and inside[4] == inside[3]  # floored at 1 / (n + 1)
    beyond = two_sided_log_p(np.array([10.0, 20.0, -10.0]), table)
    assert beyond[1] < beyond[0] < inside[4] and beyond[2] < inside[3]  # far-off images keep ranking
    tables = {"nll_bpd": table, "complexity": score_block("complexity", values)}
    scores = {"nll_bpd": np.array([9.0, 9.0, 9.0]), "complexity": np.array([0.0, -4.0, 4.0])}
    assert dose_parts({**scores, "elbo_gap": scores["complexity"]}) == ("nll_bpd", "complexity", "elbo_gap")
    nll_alone = dose_scores({**scores, "nll_bpd": np.array([-9.0, 0.0, 9.0])}, tables, ("nll_bpd",))
    assert nll_alone[0] == 0.0 and nll_alone[2] > 5  # nll_bpd's upper tail: too likely is complexity's call
    dose = dose_scores(scores, tables, ("complexity",))  # complexity's two tails
    assert dose[1] > dose[0] < dose[2] and dose[1] == pytest.approx(dose[2]) and dose[0] < 0.01
    llr = {"llr": np.array([0.0, 0.0, 5.0])}
    with_llr = dose_scores({**scores, **llr}, {**tables, "llr": table}, ("complexity", "llr"))
    assert with_llr[2] > dose[2] and with_llr[0] == pytest.approx(dose[0], abs=0.01)
    legacy = {**tables, "dose": score_block("dose", values)}  # calibrated before dose recorded its parts
    assert needs_llr("llr", {}) and not needs_llr("dose", {"scores": legacy}) and not needs_llr("dose", {"scores": {}})
    assert needs_llr("dose", {"scores": {**legacy, "llr": table}}) and not needs_llr("nll_bpd", {"scores": legacy})
    upper = upper_tail_log_p(np.array([-20.0, lo, np.median(values), hi, 10.0]), table)  # elbo_gap's one tail
    assert upper[0] == upper[1] == 0.0 and upper[2] == pytest.approx(math.log(0.5), abs=1e-2)
    assert upper[3] == inside[4] and upper[4] == beyond[0]  # the upper end as in two_sided_log_p
    gap = {"elbo_gap": np.array([0.0, -9.0, 9.0])}  # typical, far below (an encoder better than usual), far above
    with_gap = dose_scores({**scores, **gap}, {**tables, "elbo_gap": table}, ("complexity", "elbo_gap"))
    assert with_gap[1] == pytest.approx(dose[1], abs=1e-12)  # a low gap adds nothing
    assert with_gap[0] == pytest.approx(dose[0] - math.log(0.5), abs=0.02) and with_gap[2] > dose[2] + 5
    recorded = {**legacy, "llr": table, "dose": {**legacy["dose"], "parts": ["complexity", "elbo_gap"]}}
    assert not needs_llr("dose", {"scores": recorded})  # the recorded parts decide, not what else is calibrated
    assert quantile_table(values)["values"] == table["quantiles"]["values"]


def test_two_layer_model_trains_exports_and_serves_llr_and_dose(two_layers):
    version = two_layers / "ladder" / "1"
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["latent_layers"] == 2 and manifest["llr_k"] == 1 and noise_width(manifest) == 8
    assert manifest["graphs"]["llr_log_weights"]["inputs"]["eps"] == ["K", "batch", 8, "float32"]
    assert manifest["graphs"]["encoder"]["outputs"]["mu"] == ["batch", 4, "float32"]
    check = manifest["export_check"]
    assert check["max_abs_diff_llr_log_likelihoods_nats"] <= check["tolerance_nats"]
    calibrated = manifest["calibration"]["scores"]
    assert {"llr", "dose"} <= set(calibrated) and calibrated["llr"]["units"] == "bits/dim"
    assert load_checkpoint(version).cfg.latent_layers == 2

    bad = {**manifest, "graphs": {k: v for k, v in manifest["graphs"].items() if k != "llr_log_weights"}}
    with pytest.raises(ManifestError, match="llr_log_weights"):
        validate_manifest(bad)

    x = prepare("digits").test[:6, :, :, 0]
    with TestClient(create_app(Settings(models_dir=two_layers, intra_op_threads=1))) as client:
        got = {}
        for score in ("nll_bpd", "llr", "dose"):
            r = client.post("/score", json={"images": x.tolist(), "num_samples": 300, "seed": 1, "score": score})
            assert r.status_code == 200, r.text
            body = r.json()
            got[score] = [res["score"] for res in body["results"]]
            if score != "nll_bpd":
                assert body["engine"] == "onnxruntime fp32" and body["score_units"] == calibrated[score]["units"]
        with_maps = client.post(
            "/score",
            json={"images": x.tolist(), "num_samples": 300, "seed": 1, "score": "dose", "anomaly_map": True},
        ).json()
        assert [r["score"] for r in with_maps["results"]] == got["dose"]  # maps change no score
        v2 = client.post(
            "/v2/models/ladder-score/infer",
            json={
                "inputs": [{"name": "x", "shape": [6, 64], "datatype": "INT64", "data": x.reshape(-1).tolist()}],
                "parameters": {"num_samples": 300, "seed": 1, "score": "llr"},
            },
        )
        assert v2.status_code == 200, v2.text
        out = {o["name"]: o["data"] for o in v2.json()["outputs"]}
        np.testing.assert_allclose(out["score"], got["llr"], rtol=1e-12)
        desc = client.get("/v1/models").json()
        assert "latent_layers" in json.dumps(desc)
    assert np.all(np.isfinite(got["llr"])) and np.all(np.array(got["dose"]) >= 0)


def test_a_one_layer_model_refuses_llr_with_a_clear_422(models_dir):
    with TestClient(create_app(Settings(models_dir=models_dir, intra_op_threads=1))) as client:
        x = prepare("digits").test[:2, :, :, 0].tolist()
        r = client.post("/score", json={"images": x, "num_samples": 10, "score": "llr"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "uncalibrated_score", r.text


def test_a_conv_colour_ladder_is_written_verified_and_served(tmp_path):
    """Conv networks, colour, the logistic mixture with the rows context, three latent layers: every graph
    verified against torch (the llr graph included) and loaded by the service (its check scores reproduced)."""
    from service.repository import load_version
    from tests.training.test_conv_and_colour import perturbed, tiny
    from training.export import write_version

    shape = (9, 7, 3)
    m = perturbed(tiny(shape, 256, conv_widths=[4, 8], latent_layers=3, llr_k=2))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.layers.parameters():  # the layers' priors start as N(0, I): make every path count
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    x = np.random.default_rng(0).integers(0, 256, (4, math.prod(shape)))
    out = tmp_path / "photos" / "1"
    manifest = write_version(m, out, verify_images=x, metrics={}, training={}, data_info={"image_shape": list(shape)})
    assert manifest["latent_layers"] == 3 and manifest["llr_k"] == 2 and noise_width(manifest) == 9
    check = manifest["export_check"]
    assert check["max_abs_diff_llr_log_likelihoods_nats"] <= check["tolerance_nats"]
    served = load_version(out, Settings(models_dir=tmp_path, intra_op_threads=1, engine="onnxruntime"), "photos", 1)
    assert served.noise_dim == 9 and served.latent_dim == 3 and served.has_llr
    log_w, log_w_llr = served.ref.llr_log_weights(x, np.zeros((2, 4, 9), np.float32))
    assert log_w.shape == log_w_llr.shape == (2, 4) and np.all(np.isfinite(log_w_llr))


def test_free_bits_only_shift_the_loss_of_layers_below_their_floor():
    one, two = model(1), model(2)
    assert one.cfg.free_bits == 0.0 and two.cfg.free_bits == 2.0  # auto: free bits for several layers only
    x = torch.from_numpy(prepare("digits").test[:8].reshape(8, -1).astype(np.int64))
    eps = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        log_w, correction = one.training_terms(x, eps[..., :4], 0.5)
        assert correction is None and torch.equal(log_w, one.log_weights(x, eps[..., :4], 0.5))
        log_w, correction = two.training_terms(x, eps, 0.5)
        torch.testing.assert_close(log_w, two.log_weights(x, eps, 0.5))
        _, terms = two.top_down(x, eps)
        kl = [-t.mean().item() for t in terms]
        assert correction is not None
        assert correction.item() == pytest.approx(0.5 * sum(max(0.0, 2.0 - k) for k in kl), rel=1e-5, abs=1e-6)
    roomy = VAE(two.cfg.replace(free_bits=0.0), 64, 17, (8, 8, 1))
    assert roomy.training_terms(x, eps)[1] is None


def test_the_default_score_follows_how_much_the_likelihood_measures_complexity():
    from training.ood import COMPLEXITY_AWARE_SCORE, choose_default_score
    from vae_contract.formulas import compressed_bits

    rng = np.random.default_rng(0)
    # images from flat to noisy: zlib's length grows with the noise
    x = np.stack([np.clip(8 + rng.normal(0, s, 64), 0, 16).round() for s in np.linspace(0, 6, 200)]).astype(np.uint8)
    zlib_bpd = compressed_bits(x) / 64
    name, rule = choose_default_score(0.5 * zlib_bpd + rng.normal(0, 0.05, 200), x)  # NLL follows complexity
    assert name == COMPLEXITY_AWARE_SCORE and rule["nll_zlib_correlation"] > 0.9 and rule["threshold"] == 0.65
    name, rule = choose_default_score(rng.normal(2.0, 0.3, 200), x)  # NLL independent of it
    assert name == "nll_bpd" and abs(rule["nll_zlib_correlation"]) < 0.3
    assert choose_default_score(np.full(200, 2.0), x)[0] == "nll_bpd"  # no spread: no evidence either way


def test_vae_score_gives_a_ladders_llr_and_dose_as_score_does(two_layers, tmp_path):
    import csv

    from service.batch_score import score_to_csv

    x = prepare("digits").test[:5]
    npz = tmp_path / "x.npz"
    np.savez(npz, images=x[..., 0], levels=np.array(17))
    settings = Settings(models_dir=two_layers, intra_op_threads=1)
    header = score_to_csv(two_layers / "ladder" / "1", f"npz:{npz}", tmp_path / "s.csv", k=50, seed=2,
                          settings=settings, progress=False)  # fmt: skip
    with (tmp_path / "s.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert header["engine"] == "onnxruntime fp32"
    with TestClient(create_app(settings)) as client:
        for name in ("llr", "dose"):
            body = client.post(
                "/score", json={"images": x[..., 0].tolist(), "num_samples": 50, "seed": 2, "score": name}
            ).json()
            assert body["engine"] == header["engine"]
            for row, res in zip(rows, body["results"], strict=True):
                assert float(row[name]) == pytest.approx(res["score"], rel=1e-12, abs=1e-12)
                assert float(row["nll_bits_per_dim"]) == pytest.approx(res["nll_bits_per_dim"], rel=1e-12)
