"""docs/how-to/anomaly-maps.md says what the shipped model answers for the example images beside it
(docs/examples/digits) and shows the API's picture of that answer: these tests hold the page to both."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service.conftest import make_client
from vae_contract.formulas import pixels_to_levels

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
    """An example file's grey levels as the service reads uploads (the contract's pixels_to_levels)."""
    return pixels_to_levels(np.asarray(Image.open(EXAMPLES / f"{name}.png")), 17)


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
    # the scratched digit's numbers as the page quotes them: to their printed digits, give or take a few units
    # of fp32 rounding on another CPU (onnxruntime's kernels differ between instruction sets)
    scratch, text = results[2], PAGE.read_text()
    for key in ("score", "threshold", "p_value", "pixel_threshold"):
        quoted = float(re.search(rf'"{key}": ([0-9.]+)', text).group(1))
        assert abs(quoted - scratch[key]) < 6e-4, (key, quoted, scratch[key])
    row = re.search(r"the map's row reads `\[([^\]]+)\]` and the mask's `\[([^\]]+)\]`", text)
    assert row, "the page no longer quotes the scratch's row"
    assert np.allclose([float(v) for v in row.group(1).split(",")], scratch["anomaly_map"][3], atol=0.051)
    assert [int(v) for v in row.group(2).split(",")] == masks[2][3].tolist()


def test_the_pages_picture_is_the_apis_answer(shipped: TestClient) -> None:
    r = upload(shipped, accept="image/png")
    assert r.headers["content-type"] == "image/png"
    got, shown = (np.asarray(Image.open(f), dtype=np.int64) for f in (io.BytesIO(r.content), PICTURE))
    assert got.shape == shown.shape
    assert np.abs(got - shown).max() <= 3  # the same picture, to a colour step or so of fp32 rounding
