"""The bad-input matrix: many malformed or hostile requests, every one a 4xx in the protocol's error shape."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

IMG = [[0] * 8] * 8


def png(mode: str = "L", size=(8, 8), fmt: str = "PNG", bits: int = 8) -> bytes:
    arr = np.zeros(size[::-1], dtype=np.uint16 if bits == 16 else np.uint8)
    img = (
        Image.fromarray(arr, mode="I;16" if bits == 16 else None).convert(mode) if bits != 16 else Image.fromarray(arr)
    )
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


JSON = {"content-type": "application/json"}
REST_CASES = [
    # (path, raw body or JSON object, headers)
    ("/score", b"", JSON),
    ("/score", b"{", JSON),
    ("/score", b"\xff\xfe\x00", JSON),
    ("/score", b"[]", JSON),
    ("/score", b"null", JSON),
    ("/score", b'"images"', JSON),
    ("/score", json.dumps({"images": IMG}).encode(), {}),
    ("/score", json.dumps({"images": [IMG]}).encode(), {"content-type": "text/plain"}),
    ("/score", {"images": None}, None),
    ("/score", {"images": {}}, None),
    ("/score", {"images": [None]}, None),
    ("/score", {"images": [{}]}, None),
    ("/score", {"images": [[]]}, None),
    ("/score", {"images": [[[]]]}, None),
    ("/score", {"images": [[[[0]]]]}, None),
    ("/score", {"images": ["data:image/png;base64"]}, None),
    ("/score", {"images": ["data:image/png;base64,"]}, None),
    ("/score", {"images": ["data:text/plain;base64," + b64(png())]}, None),
    ("/score", {"images": ["=" * 12]}, None),
    ("/score", {"images": [b64(png(fmt="GIF"))]}, None),
    ("/score", {"images": [b64(png(fmt="TIFF"))]}, None),
    ("/score", {"images": [b64(png(fmt="BMP"))]}, None),
    ("/score", {"images": [b64(png("RGBA"))]}, None),
    ("/score", {"images": [b64(png("LA"))]}, None),
    ("/score", {"images": [b64(png(bits=16))]}, None),
    ("/score", {"images": [b64(png(size=(9, 8)))]}, None),
    ("/score", {"images": [b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)]}, None),
    ("/score", {"images": [[0.5] * 64]}, None),
    ("/score", {"images": [[True] * 64]}, None),
    ("/score", {"images": [["0"] * 64]}, None),
    ("/score", {"images": [[10**30] * 64]}, None),
    ("/score", {"images": [[-1] * 64]}, None),
    ("/score", {"images": [[[0] * 8] * 7 + [[0] * 9]]}, None),
    ("/score", {"images": [IMG], "num_samples": True}, None),
    ("/score", {"images": [IMG], "num_samples": "1000"}, None),
    ("/score", {"images": [IMG], "num_samples": 1.5}, None),
    ("/score", {"images": [IMG], "num_samples": -3}, None),
    ("/score", {"images": [IMG], "num_samples": 10**12}, None),
    ("/score", {"images": [IMG] * 64, "num_samples": 5001}, None),
    ("/score", {"images": [IMG], "seed": True}, None),
    ("/score", {"images": [IMG], "seed": -1}, None),
    ("/score", {"images": [IMG], "seed": 2**70}, None),
    ("/score", {"images": [IMG], "score": ""}, None),
    ("/score", {"images": [IMG], "score": None, "fpr": 0}, None),
    ("/score", {"images": [IMG], "fpr": 1}, None),
    ("/score", {"images": [IMG], "fpr": "0.1"}, None),
    ("/score", {"images": [IMG], "timeout_s": 0}, None),
    ("/score", {"images": [IMG], "timeout_s": 10**9}, None),
    ("/score", {"images": [IMG], "model": ""}, None),
    ("/score", {"images": [IMG], "model": "../etc"}, None),
    ("/score", {"images": [IMG], "version": 0}, None),
    ("/score", {"images": [IMG], "version": "1"}, None),
    ("/score", {"images": [IMG], "unknown": 1}, None),
    ("/encode", {"images": [IMG] * 65}, None),
    ("/decode", {"z": []}, None),
    ("/decode", {"z": [[]]}, None),
    ("/decode", {"z": [[0.0] * 3]}, None),
    ("/decode", {"z": [["a"] * 8]}, None),
    ("/decode", {"z": [[True] * 8]}, None),
    ("/decode", {"z": [[1e5] * 8]}, None),
    ("/decode", {"z": [[0.0] * 8], "mode": "median"}, None),
    ("/decode", b'{"z": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}', JSON),
    ("/decode", b'{"z": [[Infinity, 0, 0, 0, 0, 0, 0, 0]]}', JSON),
    ("/sample", {"n": 0}, None),
    ("/sample", {"n": 65}, None),
    ("/sample", {"n": True}, None),
    ("/sample", {"n": 2, "mode": "x"}, None),
    ("/reconstruct", {"images": [IMG], "mode": 3}, None),
    ("/sample?scale=0", {"n": 1}, None),
    ("/sample?scale=x", {"n": 1}, None),
    ("/admin/reload", {}, None),
]


@pytest.mark.parametrize("path,body,headers", REST_CASES, ids=[f"{i}:{c[0]}" for i, c in enumerate(REST_CASES)])
def test_rest_bad_input_is_a_4xx_with_the_error_shape(client, path, body, headers):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers=headers or {})
    else:
        r = client.post(path, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["status"] == r.status_code and err["code"] and err["message"]
    assert "Traceback" not in r.text and "object at 0x" not in r.text and "/tmp" not in r.text


UPLOAD_CASES = [
    [],
    [("file", ("a.png", png(), "image/png"))],
    [("files", ("a.png", b"", "image/png"))],
    [("files", ("a.png", b"junk", "image/png"))],
    [("files", ("a.gif", png(fmt="GIF"), "image/gif"))],
    [("files", ("a.png", png("RGBA"), "image/png"))],
    [("files", ("a.png", png(size=(28, 28)), "image/png"))],
]


@pytest.mark.parametrize("files", UPLOAD_CASES, ids=[str(i) for i in range(len(UPLOAD_CASES))])
def test_upload_bad_input_is_a_4xx(client, files):
    r = (
        client.post("/score/upload", files=files, data={"num_samples": "10"})
        if files
        else client.post("/score/upload", data={"num_samples": "10"})
    )
    assert 400 <= r.status_code < 500, r.text[:300]
    assert "BytesIO" not in r.text and "object at 0x" not in r.text


def valid_v2_body(**extra) -> bytes:
    """A valid digits-score request (one 8x8 image of zeros) with `extra` top-level fields set."""
    tensor = {"name": "x", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}
    return json.dumps({**extra, "inputs": [tensor]}).encode()


V2_CASES = [
    b"",
    b"{",
    b"[]",
    b'{"inputs": []}',
    b'{"inputs": [1]}',
    b'{"inputs": [{"name": "x"}]}',
    b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64"}]}',
    b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "BYTES", "data": []}]}',
    b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "data": [[1, 2], [3]]}]}',
    b'{"inputs": [{"name": "x", "shape": [-1, 64], "datatype": "INT64", "data": []}]}',
    b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "data": "abc"}]}',
    b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "data": [true]}]}',
    b'{"inputs": [{"name": "y", "shape": [1, 64], "datatype": "INT64", "data": [0]}]}',
    b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [' + b",".join([b"0.5"] * 64) + b"]}]}",
    b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "parameters": [1], "data": [0]}]}',
    b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "parameters": {"binary_data_size": 9}}]}',
    *(
        valid_v2_body(**extra)
        for extra in (
            {"parameters": 3},
            {"parameters": {"num_samples": "7"}},
            {"outputs": [{"name": "nope"}]},
            {"parameters": {"seed": -1}},
            {"outputs": 5},
        )
    ),
]


@pytest.mark.parametrize("body", V2_CASES, ids=[str(i) for i in range(len(V2_CASES))])
def test_v2_bad_input_is_a_4xx_with_the_v2_error_shape(client, body):
    r = client.post("/v2/models/digits-score/infer", content=body, headers=JSON)
    assert 400 <= r.status_code < 500, r.text[:300]
    assert set(r.json()) == {"error"} and r.json()["error"]


def test_bad_binary_framing_is_a_400(client):
    head = (
        b'{"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "parameters": {"binary_data_size": 512}}]}'
    )
    cases = [("99999", b""), ("abc", b""), (str(len(head)), b"\x00" * 10), (str(len(head)), b"\x00" * 600)]
    cases.append((b"\xb9", b""))  # latin-1 for '1' in superscript: str.isdigit takes it, int() does not
    for header, tail in cases:
        r = client.post(
            "/v2/models/digits-score/infer", content=head + tail, headers={"inference-header-content-length": header}
        )
        assert r.status_code == 400, r.text


def test_the_matrix_is_large():
    assert len(REST_CASES) + len(UPLOAD_CASES) + len(V2_CASES) + 4 >= 100
