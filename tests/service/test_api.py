"""The JSON API through TestClient on the model trained in this test session."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import error_of, make_client, png_b64

# --- health, models, metrics ------------------------------------------------------------------


def test_health_ready_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] and ready.json()["models"] == {"digits": [1]}
    listing = client.get("/v1/models").json()
    model = listing["models"][0]
    assert model["name"] == "digits" and model["newest"] == 1 and model["default"]
    brief = model["details"]["1"]
    assert brief["image"]["levels"] == 17 and brief["metrics"]["nll"]["K"] == 100
    assert len(brief["digest"]) == 64 and brief["scoring"]["engine"] in ("onnxruntime", "openvino")
    if brief["scoring"]["precision"] == "bf16":  # only the span the manifest names runs in bf16
        assert "bf16 between decoder_hidden and decoder_features, fp32 elsewhere" in brief["scoring"]["reason"]
    full = client.get("/v1/models/digits/1").json()
    assert full["digest"] == brief["digest"] and len(full["files"]["encoder.onnx"]) == 64
    error_of(client.get("/v1/models/digits/7"), 404, "unknown_version")


def test_no_paths_in_any_body(client, models_dir):
    for path in ("/readyz", "/v1/models", "/v1/models/digits/1"):
        assert str(models_dir) not in client.get(path).text


def test_openapi_documents_every_endpoint(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for p in [
        "/encode", "/decode", "/sample", "/reconstruct", "/score", "/healthz", "/readyz", "/v1/models", "/metrics",
        "/encode/upload", "/score/upload", "/reconstruct/upload", "/admin/reload", "/v2/models/{model}/infer",
    ]:  # fmt: skip
        assert p in paths, p
    score = paths["/score"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "413", "415", "422", "503", "504"} <= set(score)


def test_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn" not in page.text.lower()
    assert "/docs/assets/swagger-ui-bundle.js" in page.text
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200


# --- inputs -----------------------------------------------------------------------------------


def test_encode_accepts_every_input_form(client, test_images):
    img = test_images[0]
    forms = [img.tolist(), img.reshape(-1).tolist(), png_b64(img), "data:image/png;base64," + png_b64(img)]
    outs = [client.post("/encode", json={"images": [f]}) for f in forms]
    for r in outs:
        assert r.status_code == 200, r.text
    mus = [np.array(r.json()["mu"]) for r in outs]
    latent = client.get("/v1/models/digits/1").json()["latent_dim"]
    assert mus[0].shape == (1, latent)
    for mu in mus[1:]:
        np.testing.assert_allclose(mu, mus[0], atol=1e-6)  # PNG levels round-trip exactly
    up = client.post("/encode/upload", files=[("files", ("a.png", base64.b64decode(png_b64(img)), "image/png"))])
    assert up.status_code == 200
    np.testing.assert_allclose(up.json()["mu"], mus[0], atol=1e-6)


def test_jpeg_and_rgb_uploads_are_converted(client, test_images):
    rgb = np.stack([np.rint(test_images[1] * 255 / 16).astype(np.uint8)] * 3, axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    r = client.post(
        "/score/upload",
        files=[("files", ("a.jpg", buf.getvalue(), "image/jpeg"))],
        data={"num_samples": "50", "seed": "3"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["num_samples"] == 50 and math.isfinite(r.json()["results"][0]["nll_nats"])


# --- outputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mean", "mode", "sample", "probs"])
def test_decode_modes(client, mode):
    latent = client.get("/v1/models/digits/1").json()["latent_dim"]
    r = client.post("/decode", json={"z": [[0.0] * latent, [0.5] * latent], "mode": mode, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    images = np.array(body["images"])
    assert images.shape == (2, 8, 8) and images.min() >= 0 and images.max() <= 16
    if mode == "probs":
        probs = np.array(body["probs"])
        assert probs.shape == (2, 8, 8, 17)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
        np.testing.assert_array_equal(images, probs.argmax(-1))
    else:
        assert body["probs"] is None


def test_png_outputs_decode_to_the_right_size(client, test_images):
    r = client.post("/sample", json={"n": 1}, headers={"accept": "image/png"})
    assert r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (8, 8)
    r = client.post("/sample?scale=3", json={"n": 6}, headers={"accept": "image/png"})
    grid = Image.open(io.BytesIO(r.content))
    assert grid.size == ((3 * 9 - 1) * 3, (2 * 9 - 1) * 3)  # 3 columns x 2 rows with 1-pixel gaps, x3
    latent = client.get("/v1/models/digits/1").json()["latent_dim"]
    r = client.post("/decode", json={"z": [[0.0] * latent]}, headers={"accept": "image/png"})
    assert Image.open(io.BytesIO(r.content)).size == (8, 8)
    r = client.post("/reconstruct", json={"images": [test_images[0].tolist()]}, headers={"accept": "image/png"})
    assert Image.open(io.BytesIO(r.content)).size == (8, 8)


def test_sample_is_seeded_across_calls_and_restarts(client, models_dir):
    a = client.post("/sample", json={"n": 5, "seed": 11}).json()
    b = client.post("/sample", json={"n": 5, "seed": 11}).json()
    c = client.post("/sample", json={"n": 5, "seed": 12}).json()
    assert a == b and a["images"] != c["images"]
    assert np.array(a["z"]).shape[0] == 5
    longer = client.post("/sample", json={"n": 8, "seed": 11}).json()
    assert longer["images"][:5] == a["images"] and longer["z"][:5] == a["z"]  # sample i depends on (seed, i)
    with make_client(models_dir) as fresh:  # a restarted service
        assert fresh.post("/sample", json={"n": 5, "seed": 11}).json() == a


def test_reconstruct_json_and_upload(client, test_images):
    imgs = test_images[:3]
    r = client.post("/reconstruct", json={"images": imgs.tolist()})
    rec = np.array(r.json()["images"])
    assert rec.shape == (3, 8, 8)
    from training.data import prepare

    mean_image = np.rint(prepare("digits").train[..., 0].mean(0))
    assert np.abs(rec - imgs).mean() < 0.8 * np.abs(mean_image - imgs).mean()  # better than the average digit
    files = [("files", (f"{i}.png", base64.b64decode(png_b64(im)), "image/png")) for i, im in enumerate(imgs)]
    up = client.post("/reconstruct/upload", files=files)
    assert up.json()["images"] == r.json()["images"]


# --- score ------------------------------------------------------------------------------------


def test_score_fields(client, test_images):
    req = {"images": test_images[:4].tolist(), "num_samples": 300, "seed": 5}
    a = client.post("/score", json=req).json()
    assert a["num_samples"] == 300 and a["seed"] == 5 and a["engine"]
    for res in a["results"]:
        assert math.isclose(res["nll_nats"], -res["log_likelihood_nats"])
        assert math.isclose(res["nll_bits_per_dim"], res["nll_nats"] / (64 * math.log(2)))
        assert res["elbo_nats"] <= res["log_likelihood_nats"] + 1e-6  # Jensen: mean log w <= log mean w
        assert 1.0 <= res["ess"] <= 300
    assert client.post("/score", json=req).json() == a
    assert client.post("/score", json={**req, "seed": 6}).json() != a


def test_score_matches_training_evaluation(models_dir, version_dir, test_images):
    """The service's mean NLL over the test split (K=1000) agrees with torch's within 0.05 nats (fp32), and the
    fast path (when this machine has one) agrees with fp32 on the same noise within its load-time tolerance."""
    import torch

    from training.evaluate import log_likelihood
    from training.export import load_checkpoint

    model = load_checkpoint(version_dir)
    x = torch.from_numpy(test_images.reshape(len(test_images), -1).astype(np.int64))
    torch_nll = -log_likelihood(model, x, k=1000, seed=123).mean().item()
    body = {"images": test_images.tolist(), "num_samples": 1000, "seed": 0}
    means = {}
    for engine in ("onnxruntime", "auto"):
        with make_client(models_dir, engine=engine, max_batch=512) as c:
            r = c.post("/score", json=body).json()
            means[r["engine"]] = float(np.mean([res["nll_nats"] for res in r["results"]]))
            tolerance = c.app.state.settings.fast_path_mean_tolerance_nats
    fp32 = means.pop("onnxruntime fp32")
    assert abs(fp32 - torch_nll) < 0.05, (fp32, torch_nll)
    for engine, fast in means.items():
        assert abs(fast - fp32) <= tolerance, (engine, fast, fp32)


# --- errors: every client mistake is a 4xx with the one error shape ----------------------------


@pytest.mark.parametrize(
    "body,code,where",
    [
        ({"images": [[[0] * 7] * 8]}, "wrong_shape", "images[0]"),
        ({"images": [[0] * 63]}, "wrong_shape", "images[0]"),
        ({"images": [[[0] * 8] * 7 + [[0] * 7]]}, "wrong_shape", "images[0]"),
        ({"images": [[[0] * 8] * 8, [[17] * 8] * 8]}, "out_of_range", "images[1]"),
        ({"images": [[[-1] * 8] * 8]}, "out_of_range", "images[0]"),
        ({"images": ["not base64!"]}, "invalid_image", "images[0]"),
        ({"images": [base64.b64encode(b"hello world").decode()]}, "invalid_image", "images[0]"),
        ({"images": ["data:image/png;base64"]}, "invalid_image", "images[0]"),
        ({"images": [[0.5] * 64]}, "invalid_value", "images[0]"),
        ({"images": [[True] * 64]}, "invalid_value", "images[0]"),
        ({"images": [7]}, "invalid_input", "images[0]"),
        ({"images": []}, "invalid_request", "body.images"),
        ({"images": [[[0] * 8] * 8], "extra": 1}, "invalid_request", "body.extra"),
    ],
)
def test_bad_images(client, body, code, where):
    assert error_of(client.post("/encode", json=body), 422, code)["where"] == where


def test_floats_in_a_flat_list_give_one_error(client):
    err = error_of(client.post("/score", json={"images": [[0.5] * 64]}), 422, "invalid_value")
    assert "details" not in err or not err["details"]
    assert "0.5" in err["message"]


@pytest.mark.parametrize(
    "fmt,mode,ok",
    [("PNG", "L", True), ("PNG", "RGB", True), ("JPEG", "L", True), ("PNG", "RGBA", False), ("PNG", "LA", False),
     ("PNG", "I;16", False), ("GIF", "L", False), ("TIFF", "L", False), ("BMP", "L", False)],
)  # fmt: skip
def test_only_8bit_png_and_jpeg_are_accepted(client, test_images, fmt, mode, ok):
    r = client.post("/encode", json={"images": [png_b64(test_images[0], mode=mode, fmt=fmt)]})
    if ok:
        assert r.status_code == 200, r.text
    else:
        error_of(r, 422, "invalid_image")


def test_wrong_png_size(client):
    big = png_b64(np.zeros((10, 10), dtype=np.uint8))
    assert "8x8" in error_of(client.post("/score", json={"images": [big]}), 422, "wrong_shape")["message"]
    raw = base64.b64decode(big)
    error_of(client.post("/encode/upload", files=[("files", ("x.png", raw, "image/png"))]), 422, "wrong_shape")
    error_of(client.post("/encode/upload", files=[("files", ("x.png", b"junk", "image/png"))]), 422, "invalid_image")


def test_upload_under_the_wrong_field_names_the_right_one(client, test_images):
    raw = base64.b64decode(png_b64(test_images[0]))
    err = error_of(client.post("/score/upload", files=[("file", ("x.png", raw, "image/png"))]), 422)
    assert "'files'" in err["message"] and "file" in err["message"]
    assert "BytesIO" not in err["message"]


def test_bad_latents(client):
    latent = client.get("/v1/models/digits/1").json()["latent_dim"]
    raw = '{"z": [[' + ",".join(["NaN"] * latent) + "]]}"
    # NaN is no JSON (RFC 8259): refused as the body is parsed, as on the V2 lane
    sent = client.post("/decode", content=raw, headers={"content-type": "application/json"})
    err = error_of(sent, 400, "bad_request")
    assert "not valid JSON" in err["message"] and err["where"] == "body"
    # |z| is bounded by the schema (LATENT_LIMIT): an overflowing value is refused before any graph runs
    err = error_of(client.post("/decode", json={"z": [[1e39] * latent]}), 422, "invalid_request")
    assert err["where"] == "body.z[0][0]"
    error_of(client.post("/decode", json={"z": [[1e4 + 1] * latent]}), 422, "invalid_request")
    assert client.post("/decode", json={"z": [[1e4] * latent]}).status_code == 200
    error_of(client.post("/decode", json={"z": [[0.0] * (latent + 1)]}), 422, "wrong_shape")
    error_of(client.post("/decode", json={"z": [[0.0] * latent], "mode": "median"}), 422, "invalid_request")


def test_limits_and_unknowns(client):
    img = [[0] * 8] * 8
    error_of(client.post("/encode", json={"images": [img], "model": "nope"}), 404, "unknown_model")
    error_of(client.post("/encode", json={"images": [img], "version": 9}), 404, "unknown_version")
    error_of(client.post("/score", json={"images": [img], "num_samples": 5001}), 422, "k_too_large")
    error_of(client.post("/score", json={"images": [img], "num_samples": 0}), 422, "invalid_request")
    error_of(client.post("/score", json={"images": [img], "fpr": 1.5}), 422, "invalid_request")
    error_of(client.post("/score", json={"images": [img], "score": "magic"}), 422, "invalid_request")
    error_of(client.post("/score", json={"images": [img], "score": ""}), 422, "invalid_request")
    error_of(client.post("/score", json={"images": [img], "num_samples": True}), 422, "invalid_request")
    error_of(client.post("/score", json={"images": [img], "seed": True}), 422, "invalid_request")
    error_of(client.post("/sample", json={"n": True}), 422, "invalid_request")
    error_of(client.post("/sample", json={"n": 2.5}), 422, "invalid_request")
    error_of(client.post("/sample", json={"n": "2"}), 422, "invalid_request")
    # JSON Schema's integer includes 2.0 (JSON has one number type), so the schema and the service accept it
    as_float, as_int = (client.post("/sample", json={"n": n}).json()["images"] for n in (2.0, 2))
    assert as_float == as_int
    error_of(client.post("/score", json={"images": [img], "timeout_s": 0.5}), 422, "invalid_request")
    error_of(client.post("/encode", json={"images": [img] * 65}), 422, "batch_too_large")
    error_of(client.post("/sample", json={"n": 65}), 422, "batch_too_large")
    error_of(client.post("/sample", json={"n": 2, "seed": -1}), 422, "invalid_request")
    err = error_of(client.post("/score", json={"images": [img], "timeout_s": 10**6}), 422, "invalid_input")
    assert err["message"] == "timeout_s may be at most 30 s (the server's limit)" and err["where"] == "timeout_s"


def test_unparseable_bodies(client):
    headers = {"content-type": "application/json"}
    error_of(client.post("/encode", content=b"{not json", headers=headers), 400, "bad_request")
    error_of(client.post("/encode", content=b'{"images": ["\xff\xfe"]}', headers=headers), 400, "bad_request")
    err = error_of(client.post("/encode", content=json.dumps({"images": [[0] * 64]})), 415, "unsupported_media_type")
    assert "application/json" in err["message"]
    error_of(client.post("/encode", content=b"{}", headers={"content-type": "text/plain"}), 415)


def test_body_limits(client):
    big = b"x" * (300 * 1024)
    error_of(client.post("/encode", content=big, headers={"content-type": "application/json"}), 413, "body_too_large")

    def chunks():
        for _ in range(300):
            yield b"x" * 1024

    r = client.post("/encode", content=chunks(), headers={"content-type": "application/json"})
    error_of(r, 413, "body_too_large")  # no Content-Length: counted while it streams


def test_unknown_paths_and_methods(client):
    error_of(client.get("/nope"), 404)
    r = client.get("/encode")
    error_of(r, 405)
    assert r.headers["allow"] == "POST"


def test_metrics_count_requests_scores_and_batches(client, test_images):
    client.post("/score", json={"images": test_images[:2].tolist(), "num_samples": 10})
    client.post("/encode", json={"images": [[[99] * 8] * 8]})
    text = client.get("/metrics").text
    assert 'vae_requests_total{endpoint="/score",method="POST",status="200"}' in text
    assert 'vae_images_scored_total{model="digits"}' in text
    assert 'vae_errors_total{endpoint="/encode",status="422"}' in text
    assert 'vae_request_seconds_bucket{endpoint="/score"' in text
    assert 'vae_queue_seconds_count{op="score"}' in text and 'vae_batch_rows_count{op="score"}' in text
    assert "vae_queued_samples 0.0" in text
