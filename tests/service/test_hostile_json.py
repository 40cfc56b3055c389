"""Hostile and pathological JSON on every JSON route of both protocols, over real keep-alive connections.

Each body gets a 4xx in its protocol's error shape, quickly, and the next request on the same connection
still works (a 500 used to make uvicorn drop it: the client's next request failed with "connection reset").
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from service.errors import BadRequest, InvalidInput
from service.http import JsonBudget, check_json_structure, parse_json
from service.openapi import BASE64_IMAGE
from tests.service.conftest import LiveServer

JSON_ROUTES = ["/encode", "/decode", "/sample", "/reconstruct", "/score"]
V2_ROUTES = ["/v2/models/digits-score/infer", "/v2/models/digits-decode/versions/1/infer"]


def nested(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


HOSTILE = {
    "nested_100k": nested(100_000),  # the 200 KB body: RecursionError, 500 and a reset connection
    "nested_objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "nested_in_field": b'{"images": ' + nested(20_000) + b"}",
    "nested_in_v2_data": b'{"inputs":[{"name":"x","datatype":"INT64","shape":[1,64],"data":' + nested(5000) + b"}]}",
    "long_string": b'{"images": ["' + b"A" * 200_000 + b'"]}',
    "long_key": b'{"' + b"k" * 200_000 + b'": 1}',
    "huge_integer": b'{"n": ' + b"9" * 100_000 + b"}",  # json.loads: ValueError past 4300 digits
    "huge_integer_pixel": b'{"images": [[' + b"9" * 5000 + b"]]}",
    "integer_past_64_bits": b'{"n": 123456789012345678901234567890, "seed": 99999999999999999999}',
    "overflowing_float": b'{"n": 1e400, "seed": -1e999999}',
    "nan_literals": b'{"n": NaN, "timeout_s": Infinity, "fpr": -Infinity}',
    "duplicate_keys": b'{"n": 1, "n": 2, "seed": 0, "seed": -1}',
    "invalid_utf8": b'{"images": ["\xff\xfe"]}',
    "lone_surrogate": b'{"model": "\\ud800"}',
    "byte_order_mark": b'\xef\xbb\xbf{"n": 1}',
    "empty": b"",
    "whitespace": b"  \n ",
    "null": b"null",
    "array": b"[]",
    "number": b"1",
    "trailing_garbage": b'{"n": 1} x',
    "many_images": b'{"images": [' + b",".join([b"[0]"] * 30_000) + b"]}",
    "many_empty_arrays": b"[" + b",".join([b"[]"] * 100_000) + b"]",
    "many_strings": b'{"images": [' + b",".join([b'""'] * 100_000) + b"]}",
    "many_keys": b"{" + b",".join(b'"k%d": 1' % i for i in range(20_000)) + b"}",
    "v2_huge_shape": b'{"inputs":[{"name":"x","datatype":"INT64","shape":[99999999999,99999999999],"data":[1]}]}',
    "v2_nan_parameter": b'{"parameters":{"timeout_s":NaN},"inputs":[{"name":"x","datatype":"INT64","shape":[1,1],'
    b'"data":[0]}]}',
}


@pytest.fixture(scope="module")
def server(models_dir):
    with LiveServer(models_dir) as live:
        yield live


def error_shape_ok(path: str, body: bytes) -> bool:
    doc = json.loads(body)
    if path.startswith("/v2/"):
        return isinstance(doc.get("error"), str) and bool(doc["error"])
    err = doc.get("error")
    return isinstance(err, dict) and isinstance(err.get("status"), int) and bool(err.get("message"))


@pytest.mark.parametrize("path", JSON_ROUTES + V2_ROUTES)
def test_hostile_bodies_get_4xx_in_the_protocols_shape_and_the_connection_survives(server, path):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for name, body in HOSTILE.items():
            start = time.perf_counter()
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
            took = time.perf_counter() - start
            assert 400 <= response.status < 500, (name, response.status, answer[:300])
            assert error_shape_ok(path, answer), (name, answer[:300])
            assert took < 5, (name, took)  # generous for a loaded CI machine; ~1-40 ms here
            conn.request("GET", "/healthz")  # the same connection, still usable
            follow = conn.getresponse()
            follow.read()
            assert follow.status == 200, name
    finally:
        conn.close()


def test_parse_json_refuses_what_the_standard_library_chokes_on():
    for body in (nested(100_000), b"9" * 10_000, b"NaN", b"1e400", b'"\\ud800"', b"\xef\xbb\xbf{}", b"{} x"):
        with pytest.raises(BadRequest):
            parse_json(body)
    with pytest.raises(BadRequest, match="not UTF-8"):
        parse_json(b'"\xff"')
    assert parse_json(b'{"a": 1, "a": 2}') == {"a": 2}  # the last duplicate wins, as with json.loads
    assert parse_json(nested(1000)) is not None  # deep but sane nesting still parses


def test_the_structure_budget_bounds_what_a_parsed_body_holds():
    budget = JsonBudget(containers=2000, strings=600)
    for hostile in (b"[" + b",".join([b"[]"] * 5000) + b"]", b"[" + b",".join([b'""'] * 5000) + b"]"):
        with pytest.raises(InvalidInput, match="arrays and objects"):
            check_json_structure(hostile, budget)
    # the worst bodies within the budget: ~20 bytes of objects a byte of numbers, ~100 a container or string
    worst = {
        "arrays": b'{"images": [' + b",".join([b"[]"] * 1997) + b"]}",
        "strings": b'{"images": [' + b",".join([b'""'] * 299) + b"]}",
        "rows": b'{"images": [' + b",".join([b"[1,1,1,1,1,1,1,1]"] * 1900) + b"]}",
        "small_ints": b'{"images": [[' + b",".join([b"1"] * 200_000) + b"]]}",
        "large_ints": b'{"images": [[' + b",".join([b"1000"] * 100_000) + b"]]}",
        "floats": b'{"images": [[' + b",".join([b"1.5"] * 100_000) + b"]]}",
    }
    for name, body in worst.items():
        check_json_structure(body, budget)
        tracemalloc.start()
        value = parse_json(body)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del value
        assert peak <= 24 * len(body) + 100 * (budget.containers + budget.strings), (name, peak / len(body))


def png_b64(mode: str, fmt: str) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).convert(mode).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_the_schema_describes_base64_images_as_they_are_accepted():
    pattern = re.compile(BASE64_IMAGE)
    for mode, fmt in (("L", "PNG"), ("RGB", "PNG"), ("L", "JPEG"), ("RGB", "JPEG")):
        data = png_b64(mode, fmt)
        assert pattern.match(data) and pattern.match(f"data:image/{fmt.lower()};base64,{data}"), (mode, fmt)
    # the case, and others a client could otherwise build from the schema
    for bad in ("data:image/png;base64,0", "AAAA", "iVBORw0KGgoA===", "iVBORw0KGgoAAAA", "R0lGODlhAQABAAAAACw="):
        assert not pattern.match(bad), bad


def test_the_schema_excludes_empty_files_and_malformed_v2_tensors(client):
    schema = client.get("/openapi.json").json()
    comps = schema["components"]["schemas"]
    for name, body in comps.items():
        if "files" in body.get("properties", {}):
            assert body["properties"]["files"]["items"]["minLength"] >= 67, name
    infer = schema["paths"]["/v2/models/{model}/infer"]["post"]["requestBody"]["content"]
    tensor = infer["application/json"]["schema"]["properties"]["inputs"]["items"]["anyOf"]
    for branch in tensor:
        props = branch["properties"]
        assert props["name"]["enum"] == ["x", "z"]
        assert set(props["datatype"]["enum"]) and props["shape"]["minItems"] >= 2
        assert props["shape"]["prefixItems"][0]["maximum"] == client.app.state.settings.max_batch
    assert "application/octet-stream" not in infer  # the binary extension is described in words, not as "any bytes"
    # the refusals that remain are still refusals, with the documented codes
    r = client.post("/score/upload", files={"files": ("a.png", b"", "image/png")})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_image"
    r = client.post("/score", json={"images": ["data:image/png;base64,0"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_image"
    r = client.post("/v2/models/digits-score/infer", json={"inputs": [{"name": "", "shape": [], "datatype": ""}]})
    assert r.status_code == 400 and "error" in r.json()


def test_integers_are_json_schema_integers_everywhere(client):
    """3.0 is an integer to JSON Schema, so the service takes it as one (pixels, V2 shapes, data, parameters)."""
    r = client.post("/score", json={"images": [[0.0] * 64], "num_samples": 10.0})
    assert r.status_code == 200, r.text
    body = {
        "parameters": {"num_samples": 10.0},
        "inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 64.0], "data": [1.0] * 64}],
    }
    r = client.post("/v2/models/digits-score/infer", json=body)
    assert r.status_code == 200, r.text
    assert client.post("/score", json={"images": [[0.5] * 64]}).status_code == 422


def test_a_bug_answers_500_and_keeps_the_connection(models_dir):
    from fastapi import APIRouter

    with LiveServer(models_dir) as live:
        router = APIRouter()

        @router.get("/boom")
        async def boom() -> dict:
            raise ZeroDivisionError("a bug")

        live.app.include_router(router)
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
        conn.request("GET", "/boom")
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 500 and answer["error"]["code"] == "internal_error"
        assert "a bug" not in json.dumps(answer)  # details stay in the log
        conn.request("GET", "/healthz")
        again = conn.getresponse()
        again.read()
        assert again.status == 200
        conn.close()
