"""docs/how-to/anomaly-maps.md says what the shipped model answers for the example images beside it
(docs/examples/digits) and shows the API's picture of that answer: these tests hold the page to both."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service.conftest import make_client

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "how-to" / "anomaly-maps.md"
EXAMPLES = REPO / "docs" / "examples" / "digits"
PICTURE = REPO / "docs" / "images" / "score-overlay.png"
NAMES = ["digit", "blob", "scratch", "missing"]


@pytest.fixture(scope="module")
def shipped() -> Iterator[TestClient]:
    # onnxruntime fp32, the engine the page names: the bf16 fast path moves the numbers slightly
    with make_client(REPO / "models", engine="onnxruntime") as c:
        yield c


def upload(client: TestClient, **headers: str):
    files = [("files", (f"{n}.png", (EXAMPLES / f"{n}.png").read_bytes(), "image/png")) for n in NAMES]
    r = client.post("/score/upload", files=files, data={"model": "digits", "anomaly_map": "true"}, headers=headers)
    assert r.status_code == 200, r.text
    return r


def levels_of(name: str) -> np.ndarray:
    pixels = np.asarray(Image.open(EXAMPLES / f"{name}.png"), dtype=np.float64)
    return np.floor(pixels * 16 / 255 + 0.5).astype(np.uint8)


def test_the_examples_are_test_digits_with_the_benchmarks_defects() -> None:
    from training.data import prepare
    from training.defects import make_defects

    data = prepare("digits")
    test = data.test[:4]
    assert np.array_equal(levels_of("digit"), test[0, ..., 0])
    for i, kind in enumerate(NAMES[1:]):
        bad, _ = make_defects(test[1 + i : 2 + i], data.levels, kind, 7 + i)
        assert np.array_equal(levels_of(kind), bad[0, ..., 0]), kind


def test_the_page_says_what_the_shipped_model_answers(shipped: TestClient) -> None:
    results = upload(shipped).json()["results"]
    masks = [np.array(r["anomaly_mask"]) for r in results]
    assert [r["is_ood"] for r in results] == [False, False, True, False]  # only the scratch flags its image
    assert masks[0].sum() == 0
    assert np.argwhere(masks[1]).tolist() == [[4, 4]]  # one pixel, just above the blob (rows 6-7, columns 3-5)
    assert np.argwhere(masks[2]).tolist() == [[3, 6], [3, 7]]  # the scratch's two right-hand pixels
    assert np.argwhere(masks[3]).tolist() == [[0, 5], [2, 4]]  # two of the missing region's five
    scratch = results[2]
    row = [round(v, 1) for v in scratch["anomaly_map"][3]]
    quoted = {
        f"{scratch['score']:.3f}",
        f"{scratch['threshold']:.3f}",
        f"{scratch['p_value']:.3f}",
        f"{scratch['pixel_threshold']:.3f}",
        "[" + ", ".join(f"{v:.1f}" for v in row) + "]",
        "[" + ", ".join(str(int(v)) for v in masks[2][3]) + "]",
    }
    text = PAGE.read_text()
    assert all(q in text for q in quoted), [q for q in quoted if q not in text]


def test_the_pages_picture_is_the_apis_answer(shipped: TestClient) -> None:
    r = upload(shipped, accept="image/png")
    assert r.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(Image.open(PICTURE)))
