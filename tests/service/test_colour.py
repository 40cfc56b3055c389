"""Colour end to end: a model trained on a folder of RGB photos (resized to 8x8 in training), served over
both protocols: H x W x C arrays, flat arrays, base64 PNG/JPEG, multipart files, colour PNG out, V2
tensors [N, H, W, C]; and what files of the wrong mode or size become."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import TINY
from tests.service.conftest import make_client

SIZE = 8


@pytest.fixture(scope="module")
def colour_models(tmp_path_factory) -> tuple:
    """colour/1: trained on 12x12 crops of scikit-learn's sample photos, resized to 8x8 by --image-size."""
    from sklearn.datasets import load_sample_images

    from training.config import TrainConfig
    from training.pipeline import run

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("photos")
    for i in range(240):
        photo = photos[i % 2]
        y, x = rng.integers(0, photo.shape[0] - 12), rng.integers(0, photo.shape[1] - 12)
        Image.fromarray(photo[y : y + 12, x : x + 12]).save(folder / f"{i:03d}.png")
    root = tmp_path_factory.mktemp("colour-models")
    cfg = TrainConfig.from_dict(
        {
            **TINY,
            "dataset": f"folder:{folder}",
            "image_size": [SIZE, SIZE],
            "levels": 16,
            "context": "none",
            "epochs": 5,
            "calibration_images": 0,
        }
    )
    manifest = run(cfg, root / "colour" / "1", plots=False, progress=False, log=lambda *_: None)
    return root, manifest


@pytest.fixture(scope="module")
def colour(colour_models) -> TestClient:
    with make_client(colour_models[0], max_batch=64) as c:
        yield c


def rgb_image(seed: int, size: tuple[int, int] = (SIZE, SIZE), mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def levels_of(img: Image.Image) -> np.ndarray:
    return np.floor(np.asarray(img.convert("RGB"), dtype=np.float64) * 15 / 255 + 0.5).astype(int)


def test_the_manifest_says_channels_and_preprocessing(colour_models, colour):
    _, manifest = colour_models
    image = manifest["image"]
    assert (image["height"], image["width"], image["channels"], image["dim"]) == (SIZE, SIZE, 3, SIZE * SIZE * 3)
    assert image["preprocessing"]["mode"] == "RGB" and image["preprocessing"]["resize"] == [SIZE, SIZE]
    assert manifest["format_version"] == 3
    described = colour.get("/v1/models/colour/1").json()
    assert described["image"]["channels"] == 3


def test_every_input_form_gives_the_same_colour_numbers(colour):
    img = rgb_image(1)
    arr = levels_of(img)  # (8, 8, 3)
    forms = [arr.tolist(), arr.reshape(-1).tolist(), base64.b64encode(encoded(img)).decode()]
    results = [colour.post("/encode", json={"images": [f]}) for f in forms]
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    mus = [np.asarray(r.json()["mu"]) for r in results]
    for mu in mus[1:]:
        np.testing.assert_array_equal(mu, mus[0])
    up = colour.post("/encode/upload", files={"files": ("a.png", encoded(img), "image/png")})
    np.testing.assert_array_equal(np.asarray(up.json()["mu"]), mus[0])
    # a grey H x W array is no colour image
    r = colour.post("/encode", json={"images": [arr[..., 0].tolist()]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "wrong_shape"
    assert "8 rows of 8 pixels of 3 integers" in r.json()["error"]["message"]


def test_files_are_converted_and_resized_as_the_manifest_says(colour):
    img = rgb_image(2)
    base = colour.post("/score", json={"images": [levels_of(img).tolist()], "num_samples": 20}).json()
    # JPEG decodes (lossy); a grey file is repeated into RGB; a file of another size is resized (Lanczos)
    for blob in (encoded(img, "JPEG"), encoded(img.convert("L")), encoded(img.resize((20, 13)))):
        r = colour.post("/score/upload", files={"files": ("x", blob, "image/png")}, data={"num_samples": "20"})
        assert r.status_code == 200, r.text
    grey = colour.post(
        "/score/upload", files={"files": ("g.png", encoded(img.convert("L")), "image/png")}, data={"num_samples": "20"}
    ).json()
    repeated = np.repeat(np.asarray(img.convert("L"), dtype=np.float64)[..., None], 3, axis=2)
    as_array = colour.post(
        "/score", json={"images": [np.floor(repeated * 15 / 255 + 0.5).astype(int).tolist()], "num_samples": 20}
    ).json()
    assert grey["results"][0]["nll_nats"] == as_array["results"][0]["nll_nats"]
    assert base["results"][0]["nll_nats"] != grey["results"][0]["nll_nats"]
    # refused, saying what the model takes: alpha, 16-bit, CMYK
    rgba = encoded(img.convert("RGBA"))
    wide = encoded(Image.fromarray(np.full((SIZE, SIZE), 40000, dtype=np.uint16)))
    cmyk = encoded(img.convert("CMYK"), "JPEG")
    for blob in (rgba, wide, cmyk):
        r = colour.post("/encode/upload", files={"files": ("x", blob, "image/png")})
        assert r.status_code == 422, r.text
        assert "8x8 (WxH) RGB colour images" in r.json()["error"]["message"]


def test_outputs_are_colour_arrays_and_pngs(colour):
    r = colour.post("/sample", json={"n": 4, "seed": 3})
    images = np.asarray(r.json()["images"])
    assert images.shape == (4, SIZE, SIZE, 3) and images.min() >= 0 and images.max() <= 15
    png = colour.post("/sample", json={"n": 1, "seed": 3}, headers={"accept": "image/png"})
    decoded = Image.open(io.BytesIO(png.content))
    assert decoded.mode == "RGB" and decoded.size == (SIZE, SIZE)
    np.testing.assert_array_equal(levels_of(decoded), images[0])
    grid = colour.post("/sample", json={"n": 4, "seed": 3}, headers={"accept": "image/png"}, params={"scale": 2})
    assert Image.open(io.BytesIO(grid.content)).size == (2 * (2 * SIZE + 1), 2 * (2 * SIZE + 1))
    rec = colour.post("/reconstruct", json={"images": [levels_of(rgb_image(4)).tolist()], "mode": "probs"})
    assert np.asarray(rec.json()["probs"]).shape == (1, SIZE, SIZE, 3, 16)


def test_v2_takes_and_describes_colour_tensors(colour):
    meta = colour.get("/v2/models/colour-score").json()
    assert meta["parameters"]["image"] == {"height": SIZE, "width": SIZE, "channels": 3, "levels": 16}
    arr = levels_of(rgb_image(5))
    body = {
        "inputs": [{"name": "x", "datatype": "INT64", "shape": [1, SIZE, SIZE, 3], "data": arr.reshape(-1).tolist()}]
    }
    r = colour.post("/v2/models/colour-score/infer", json={**body, "parameters": {"num_samples": 20}})
    assert r.status_code == 200, r.text
    rest = colour.post("/score", json={"images": [arr.tolist()], "num_samples": 20}).json()
    v2_ll = next(o for o in r.json()["outputs"] if o["name"] == "log_likelihood")["data"][0]
    assert v2_ll == rest["results"][0]["log_likelihood_nats"]
    flat = {
        "inputs": [{"name": "x", "datatype": "INT64", "shape": [1, SIZE * SIZE * 3], "data": arr.reshape(-1).tolist()}]
    }
    assert colour.post("/v2/models/colour-encode/infer", json=flat).status_code == 200
    grey_shape = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, SIZE, SIZE], "data": [0] * SIZE * SIZE}]}
    r = colour.post("/v2/models/colour-encode/infer", json=grey_shape)
    assert r.status_code == 400 and "[N, 8, 8, 3]" in r.json()["error"]


def test_a_grey_model_takes_colour_files_as_grey_and_refuses_colour_arrays(client):
    img = rgb_image(6)
    r = client.post("/encode/upload", files={"files": ("c.png", encoded(img), "image/png")})
    assert r.status_code == 200, r.text
    r = client.post("/encode", json={"images": [levels_of(img).tolist()]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "wrong_shape"
