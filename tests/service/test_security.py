"""Access control: optional API keys, the admin endpoint, CORS."""

from __future__ import annotations

import pytest

from tests.service.conftest import error_of, make_client

IMG = {"images": [[[0] * 8] * 8], "num_samples": 10}
V2 = {
    "inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 64], "data": [0] * 64}],
    "parameters": {"num_samples": 10},
}


@pytest.fixture(scope="module")
def keyed(models_dir, tmp_path_factory):
    keyfile = tmp_path_factory.mktemp("keys") / "keys.txt"
    keyfile.write_text("# one key a line\nfile-key\n")
    with make_client(models_dir, api_keys="k1,k2", api_keys_file=keyfile) as c:
        yield c


def test_liveness_and_readiness_need_no_key(keyed):
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert keyed.get(path).status_code == 200, path


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/openapi.json", "/docs", "/v2", "/v2/models/digits-score"])
def test_everything_else_needs_a_key(keyed, path):
    r = keyed.get(path)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert keyed.get(path, headers={"authorization": "Bearer nope"}).status_code == 403
    assert keyed.get(path, headers={"authorization": "Bearer k2"}).status_code == 200


def test_keys_from_env_and_file(keyed):
    error_of(keyed.post("/score", json=IMG), 401, "unauthenticated")
    error_of(keyed.post("/score", json=IMG, headers={"authorization": "Bearer k3"}), 403, "forbidden")
    error_of(keyed.post("/score", json=IMG, headers={"authorization": "Basic k1"}), 401)
    for key in ("k1", "file-key"):
        assert keyed.post("/score", json=IMG, headers={"authorization": f"Bearer {key}"}).status_code == 200
    for path in ("/v2/models/digits-score/infer", "/v2/models/digits-score/versions/1/infer"):  # the V2 lane
        r = keyed.post(path, json={})
        assert r.status_code == 401
        assert r.json() == {"error": "this endpoint needs an API key: Authorization: Bearer <key>"}
        assert keyed.post(path, json={}, headers={"authorization": "Bearer k3"}).json() == {
            "error": "the API key is not valid"
        }
        r = keyed.post(path, json=V2, headers={"authorization": "Bearer file-key"})
        assert r.status_code == 200 and r.json()["outputs"][0]["name"] == "log_likelihood"


def test_admin_always_needs_a_key(client, keyed):
    error_of(client.post("/admin/reload"), 403, "forbidden")  # no keys configured: admin is closed
    error_of(keyed.post("/admin/reload"), 401)
    assert keyed.post("/admin/reload", headers={"authorization": "Bearer k1"}).status_code == 200


def test_cors_is_off_by_default_and_configurable(client, models_dir):
    pre = {"origin": "https://app.example", "access-control-request-method": "POST"}
    r = client.options("/score", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    with make_client(models_dir, cors_origins="https://app.example") as c:
        r = c.options("/score", headers={**pre, "access-control-request-headers": "content-type"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.options("/score", headers={**pre, "origin": "https://evil.example"})
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"
        # V2 inference from a browser takes the whole stack (the infer lane leaves it to CORSMiddleware)
        path = "/v2/models/digits-score/infer"
        r = c.options(path, headers={**pre, "access-control-request-headers": "content-type"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        browser = c.post(path, json=V2, headers={"origin": "https://app.example"})
        assert browser.status_code == 200 and browser.headers["access-control-allow-origin"] == "https://app.example"
        direct = c.post(path, json=V2)
        assert direct.status_code == 200 and "access-control-allow-origin" not in direct.headers
        assert browser.json() == direct.json()
