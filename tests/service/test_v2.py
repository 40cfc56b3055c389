"""The Open Inference Protocol (KServe V2): JSON and binary tensors, driven by Triton's own client."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.service.conftest import make_client

tritonclient_http = pytest.importorskip("tritonclient.http")


def test_tritonclient_drives_every_operation_and_matches_the_json_api(live, test_images):
    client = tritonclient_http.InferenceServerClient(url=f"127.0.0.1:{live.port}")
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "vae-serve" and "binary_tensor_data" in meta["extensions"]
    for op in ("encode", "decode", "score"):
        assert client.is_model_ready(f"digits-{op}")
    score_meta = client.get_model_metadata("digits-score")
    assert score_meta["inputs"] == [{"name": "x", "datatype": "INT64", "shape": [-1, 64]}]
    assert {o["name"] for o in score_meta["outputs"]} >= {"log_likelihood", "nll_bits_per_dim", "is_ood"}
    enc_meta = client.get_model_metadata("digits-encode", model_version="1")
    latent = enc_meta["outputs"][0]["shape"][1]
    assert enc_meta["outputs"][0] == {"name": "mu", "datatype": "FP32", "shape": [-1, latent]}
    assert client.get_model_config("digits-score")["max_batch_size"] == live.settings.max_batch

    x = test_images[:5].reshape(5, -1).astype(np.int64)
    with make_client(live.settings.models_dir) as rest:
        json_score = rest.post("/score", json={"images": x.tolist(), "num_samples": 500, "seed": 3}).json()
        json_enc = rest.post("/encode", json={"images": x.tolist()}).json()
        z = np.array(json_enc["mu"], dtype=np.float32)
        json_dec = rest.post("/decode", json={"z": z.tolist(), "mode": "mean"}).json()

    for binary in (True, False):
        inp = tritonclient_http.InferInput("x", list(x.shape), "INT64")
        inp.set_data_from_numpy(x, binary_data=binary)
        outs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in ("log_likelihood", "is_ood")]
        res = client.infer(
            "digits-score", [inp], outputs=outs, parameters={"num_samples": 500, "seed": 3}, request_id="r1"
        )
        assert res.get_response()["id"] == "r1"
        np.testing.assert_array_equal(
            res.as_numpy("log_likelihood"), [r["log_likelihood_nats"] for r in json_score["results"]]
        )
        np.testing.assert_array_equal(res.as_numpy("is_ood"), [r["is_ood"] for r in json_score["results"]])

        inp = tritonclient_http.InferInput("x", list(x.shape), "INT64")
        inp.set_data_from_numpy(x, binary_data=binary)
        res = client.infer("digits-encode", [inp])
        np.testing.assert_array_equal(res.as_numpy("mu"), np.array(json_enc["mu"], dtype=np.float32))

        zin = tritonclient_http.InferInput("z", list(z.shape), "FP32")
        zin.set_data_from_numpy(z, binary_data=binary)
        res = client.infer("digits-decode", [zin], outputs=[tritonclient_http.InferRequestedOutput("images")])
        np.testing.assert_array_equal(res.as_numpy("images").reshape(5, 8, 8), json_dec["images"])


def test_v2_errors_are_protocol_shaped(client):
    bad = client.post("/v2/models/nope-score/infer", json={"inputs": []})
    assert bad.status_code == 404 and set(bad.json()) == {"error"}
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "data": [99] * 64}]}
    r = client.post("/v2/models/digits-score/infer", json=body)
    assert r.status_code == 400 and "0..16" in r.json()["error"] and r.json()["error"].startswith("inputs[x]")
    ok = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}]}
    r = client.post("/v2/models/digits-score/infer", json={**ok, "parameters": {"num_samples": True}})
    assert r.status_code == 400 and "num_samples" in r.json()["error"]
    # the protocol's own timeout_s bounds: positive, at most the server's limit (no 1 s floor, unlike /score)
    for timeout, message in ((0, "timeout_s must be positive"), (31, "timeout_s may be at most 30 s")):
        r = client.post("/v2/models/digits-encode/infer", json={**ok, "parameters": {"timeout_s": timeout}})
        assert r.status_code == 400 and r.json()["error"].startswith(f"timeout_s: {message}")
    r = client.post("/v2/models/digits-encode/infer", json={**ok, "parameters": {"timeout_s": 0.5}})
    assert r.status_code == 200
    r = client.post(
        "/v2/models/digits-score/infer",
        json={"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "data": [0] * 63}]},
    )
    assert r.status_code == 400
    r = client.post("/v2/models/digits-score/infer", content=b"\xff", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post(
        "/v2/models/digits-score/infer",
        json={
            "inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}],
            "outputs": [{"name": "nope"}],
        },
    )
    assert r.status_code == 400 and "unknown outputs" in r.json()["error"]
    assert client.get("/v2/models/digits-score/versions/9").status_code == 404
    # digits to str.isdigit that int() refuses (a 500 before; schemathesis --seed 1054416319 found it)
    for version in ("%C2%B9", "%C2%B2", "%E2%91%A0"):  # superscript one and two, circled one
        r = client.get(f"/v2/models/digits-encode/versions/{version}")
        assert r.status_code == 404 and set(r.json()) == {"error"}, r.text
        assert client.get(f"/v2/models/digits-encode/versions/{version}/ready").status_code == 404
    assert client.get("/v2/models/digits/ready").status_code == 404


def test_binary_request_and_response_by_hand(client, test_images):
    x = test_images[:2].reshape(2, -1).astype("<i8")
    head = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [2, 64], "datatype": "INT64", "parameters": {"binary_data_size": x.nbytes}}
            ],
            "outputs": [{"name": "log_likelihood", "parameters": {"binary_data": True}}],
            "parameters": {"num_samples": 100},
        }
    ).encode()
    r = client.post(
        "/v2/models/digits-score/infer",
        content=head + x.tobytes(),
        headers={"inference-header-content-length": str(len(head)), "content-type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 16
    values = np.frombuffer(r.content[n:], dtype="<f8")
    plain = client.post("/score", json={"images": x.tolist(), "num_samples": 100}).json()
    np.testing.assert_array_equal(values, [res["log_likelihood_nats"] for res in plain["results"]])


def test_the_infer_lane_answers_as_the_routes_would(models_dir, monkeypatch):
    """POST .../infer skips the middleware stack and FastAPI's router (service.v2.InferLane): same answers
    as the routes (binary and JSON), same /metrics labels, the app's error handlers, the body limit; GET
    on an infer path is still the router's 405."""
    from service.core import InferenceCore

    ok = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}]}
    x = np.arange(128, dtype="<i8").reshape(2, 64) % 17
    head = json.dumps(
        {
            "inputs": [{"name": "x", "datatype": "INT64", "shape": [2, 64], "parameters": {"binary_data_size": 1024}}],
            "parameters": {"num_samples": 50, "binary_data_output": True},
        }
    ).encode()
    # with CORS on, a request with an Origin header takes the whole stack: the routes, not the lane
    with make_client(models_dir, max_body_bytes=4096, cors_origins="*") as c:
        for path in ("/v2/models/digits-encode/infer", "/v2/models/digits-encode/versions/1/infer"):
            r = c.post(path, json=ok)
            assert r.status_code == 200 and r.json()["model_version"] == "1"
        for body, headers in (
            (json.dumps(ok).encode(), {"content-type": "application/json"}),
            (head + x.tobytes(), {"inference-header-content-length": str(len(head))}),
        ):
            lane = c.post("/v2/models/digits-score/infer", content=body, headers=headers)
            routed = c.post("/v2/models/digits-score/infer", content=body, headers={**headers, "origin": "o"})
            assert lane.status_code == routed.status_code == 200
            assert lane.content == routed.content and lane.headers["content-type"] == routed.headers["content-type"]
            assert "access-control-allow-origin" in routed.headers  # it did take the routes
        assert c.post("/v2/models/digits-encode/versions/7/infer", json=ok).status_code == 404
        assert c.post("/v2/models/digits-encode/infer/extra", json=ok).status_code == 404
        assert c.get("/v2/models/digits-encode/infer").status_code == 405
        big = c.post(
            "/v2/models/digits-encode/infer", content=b"x" * 5000, headers={"content-type": "application/json"}
        )
        assert big.status_code == 413 and set(big.json()) == {"error"}
        metrics = c.get("/metrics").text
        # by the lane and by the routes alike: 4 score requests and 1 encode, and 1 encode
        for template, n in (("/v2/models/{model}/infer", 5), ("/v2/models/{model}/versions/{version}/infer", 1)):
            assert f'vae_requests_total{{endpoint="{template}",method="POST",status="200"}} {n}.0' in metrics

        async def broken(self, *args, **kwargs):
            raise RuntimeError("engine exploded")

        monkeypatch.setattr(InferenceCore, "encode", broken)
        r = c.post("/v2/models/digits-encode/infer", json=ok)
        assert r.status_code == 500 and r.json() == {"error": "internal server error; see the service log"}
