"""Anomaly maps on /score, /score/upload and the V2 score model: shape, units, masks, pictures and bad input."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import error_of, make_client, png_b64
from vae_contract.manifest import read_manifest, write_manifest


def score(client, images, **kw):
    body = {"images": np.asarray(images).tolist(), "num_samples": 200, "anomaly_map": True, **kw}
    r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def with_defect(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[5:8, 0:3] = 16 - (out[5:8, 0:3] > 8) * 16  # a 3x3 block, each pixel flipped to the far end
    return out


def test_maps_have_the_image_shape_and_a_mask_at_the_calibrated_pixel_threshold(client, test_images, version_dir):
    manifest, _ = read_manifest(version_dir)
    block = manifest["calibration"]["anomaly_map"]
    body = score(client, test_images[:3])
    for res in body["results"]:
        amap, mask = np.array(res["anomaly_map"]), np.array(res["anomaly_mask"])
        assert amap.shape == mask.shape == (8, 8)
        assert np.isfinite(amap).all() and set(np.unique(mask)) <= {0, 1}
        # the threshold is the table's 1 - fpr quantile (default fpr 0.01), and the mask is the map above it
        assert res["pixel_threshold"] == pytest.approx(block["thresholds"]["0.01"], rel=1e-3, abs=1e-3)
        assert (mask == (amap > res["pixel_threshold"])).all()
    # the engine that ran the pixel graph: the fast path's where its maps passed the check at load, else fp32
    scoring = client.get("/v1/models").json()["models"][0]["details"]["1"]["scoring"]
    assert body["engine"] == (scoring["anomaly_maps"] or {}).get("engine", "onnxruntime fp32")
    # a looser fpr flags more pixels
    loose = score(client, test_images[:3], fpr=0.2)["results"]
    assert loose[0]["pixel_threshold"] < body["results"][0]["pixel_threshold"]
    # deterministic: the same request gives the same maps
    again = score(client, test_images[:3])
    assert [r["anomaly_map"] for r in again["results"]] == [r["anomaly_map"] for r in body["results"]]


def test_the_score_itself_does_not_change_with_the_map(client, test_images):
    x = test_images[:4]
    plain = client.post("/score", json={"images": x.tolist(), "num_samples": 200}).json()["results"]
    mapped = score(client, x)["results"]
    for a, b in zip(plain, mapped):  # another graph of the same model, maybe on another engine (fp32 against bf16)
        assert b["nll_nats"] == pytest.approx(a["nll_nats"], rel=2e-3)
        assert a.get("anomaly_map") is None  # null unless asked for


def test_a_defect_lights_up_where_it_is(client, test_images):
    clean = test_images[:16]
    bad = np.stack([with_defect(img) for img in clean])
    maps = np.array([r["anomaly_map"] for r in score(client, bad)["results"]])
    region = np.zeros((8, 8), dtype=bool)
    region[5:8, 0:3] = True
    changed = bad != clean  # pixels the defect actually changed
    inside = maps[changed & region[None]]
    outside = maps[~np.broadcast_to(region, maps.shape)]
    assert inside.mean() > outside.mean() + 1.0, (inside.mean(), outside.mean())


def test_png_overlay_grid(client, test_images):
    body = {"images": test_images[:2].tolist(), "num_samples": 100, "anomaly_map": True}
    r = client.post("/score", json=body, headers={"accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.mode == "RGB" and img.height > 2 * 160 and img.width > 2 * 160  # two rows of input | overlay
    # without anomaly_map, Accept: image/png on /score still answers JSON (there is no picture of a score)
    r = client.post("/score", json={**body, "anomaly_map": False}, headers={"accept": "image/png"})
    assert r.headers["content-type"].startswith("application/json")


def test_upload_with_anomaly_map(client, test_images):
    files = [("files", (f"{i}.png", png_b64_bytes(img), "image/png")) for i, img in enumerate(test_images[:2])]
    r = client.post("/score/upload", files=files, data={"anomaly_map": "true", "num_samples": "100"})
    assert r.status_code == 200, r.text
    assert np.array(r.json()["results"][1]["anomaly_map"]).shape == (8, 8)
    r = client.post("/score/upload", files=files, data={"anomaly_map": "maybe", "num_samples": "100"})
    assert r.status_code == 422


def png_b64_bytes(img: np.ndarray) -> bytes:
    import base64

    return base64.b64decode(png_b64(img))


@pytest.mark.parametrize("value", [1, 0, "true", None, [True], {"on": True}])
def test_a_non_boolean_anomaly_map_is_refused(client, test_images, value):
    body = {"images": test_images[:1].tolist(), "num_samples": 10, "anomaly_map": value}
    error_of(client.post("/score", json=body), 422)


def test_k_limits_hold_with_maps(client, test_images):
    body = {"images": test_images[:1].tolist(), "num_samples": 10**6, "anomaly_map": True}
    error_of(client.post("/score", json=body), 422, "k_too_large")


def test_a_version_exported_before_maps_answers_422(version_dir: Path, tmp_path: Path, test_images):
    old = tmp_path / "models" / "old" / "1"
    shutil.copytree(version_dir, old)
    manifest, _ = read_manifest(old)
    del manifest["graphs"]["pixel_log_weights"]
    del manifest["files"]["pixel_log_weights.onnx"]
    (old / "pixel_log_weights.onnx").unlink()
    manifest["calibration"].pop("anomaly_map")
    write_manifest(old, manifest)
    with make_client(tmp_path / "models") as c:
        assert c.get("/v1/models").json()["models"][0]["details"]["1"]["anomaly_maps"] is False
        x = test_images[:1].tolist()
        err = error_of(c.post("/score", json={"images": x, "anomaly_map": True}), 422, "no_anomaly_map")
        assert "vae-export" in err["message"]
        assert c.post("/score", json={"images": x, "num_samples": 10}).status_code == 200  # scores still work
        meta = c.get("/v2/models/old-score").json()
        assert "anomaly_map" not in {o["name"] for o in meta["outputs"]}


def test_a_version_calibrated_before_the_second_pass_keeps_its_one_pass_map(
    version_dir: Path, tmp_path: Path, test_images
):
    """A block with parts and no refit (calibrated before the second reconstruction) is served as it was
    defined: the residual against mu(x) alone, one reconstruction."""
    from service.batch_score import load_model
    from service.repository import images_per_call
    from service.scoring import score_direct
    from service.settings import Settings
    from vae_contract.maps import ONE_PASS_MAP_DEFINITION, anomaly_maps, residual_maps

    old = tmp_path / "models" / "old" / "1"
    shutil.copytree(version_dir, old)
    manifest, _ = read_manifest(old)
    block = manifest["calibration"]["anomaly_map"]
    refit = block.pop("refit")
    block["parts"].pop("residual_fine")  # one-pass blocks predate it
    block["parts"]["residual"], block["definition"] = refit["residual"], ONE_PASS_MAP_DEFINITION
    write_manifest(old, manifest)
    bad = np.stack([with_defect(img) for img in test_images[:4]])
    with make_client(tmp_path / "models", engine="onnxruntime") as c:
        served = np.array([r["anomaly_map"] for r in score(c, bad, seed=3)["results"]])
    mv = load_model(old, Settings(models_dir=tmp_path / "models", engine="onnxruntime"))
    assert mv.map_reconstructions == 1
    x = bad.reshape(4, -1).astype(np.int64)
    per_call = images_per_call(mv.ref, mv.score_rows, mv.chunk)
    tasks = score_direct(mv.ref, x, 200, [3] * 4, mv.latent_dim, mv.chunk, per_call, mv.ref, 64)
    e = np.concatenate([t.pixels.expected_nll() for t in tasks if t.pixels is not None])
    one_pass = anomaly_maps(e, residual_maps(x, mv.reconstruction_means(x), 17, 1), (8, 8), block)
    np.testing.assert_allclose(served, one_pass, atol=1e-4)  # /score rounds to 4 decimals


def test_v2_score_model_serves_maps_by_parameter_or_output_name(client, test_images):
    meta = client.get("/v2/models/digits-score").json()
    outs = {o["name"]: o for o in meta["outputs"]}
    assert outs["anomaly_map"] == {"name": "anomaly_map", "datatype": "FP32", "shape": [-1, 8, 8]}
    assert outs["anomaly_mask"]["datatype"] == "BOOL"
    x = test_images[:2].reshape(2, -1)
    tensor = {"name": "x", "datatype": "INT64", "shape": list(x.shape), "data": x.ravel().tolist()}
    plain = client.post("/v2/models/digits-score/infer", json={"inputs": [tensor]}).json()
    assert "anomaly_map" not in {o["name"] for o in plain["outputs"]}
    for body in (
        {"inputs": [tensor], "parameters": {"anomaly_map": True, "num_samples": 100}},
        {"inputs": [tensor], "parameters": {"num_samples": 100}, "outputs": [{"name": "anomaly_map"}]},
    ):
        r = client.post("/v2/models/digits-score/infer", json=body)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert out["anomaly_map"]["shape"] == [2, 8, 8] and len(out["anomaly_map"]["data"]) == 128
        assert r.json()["parameters"]["pixel_threshold"] > 0
    bad = {"inputs": [tensor], "parameters": {"anomaly_map": "yes"}}
    assert client.post("/v2/models/digits-score/infer", json=bad).status_code in (400, 422)


def test_openapi_documents_the_fields(client):
    schema = client.get("/openapi.json").json()
    req = schema["components"]["schemas"]["ScoreRequest"]["properties"]["anomaly_map"]
    assert req["type"] == "boolean" and req["default"] is False
    assert "anomaly_map" in schema["components"]["schemas"]["ImageScore"]["properties"]
    assert json.dumps(schema["paths"]["/score"]["post"]["responses"]["200"]["content"]).count("image/png") == 1
