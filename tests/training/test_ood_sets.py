"""The generated OOD sets of `vae-ood-eval` (training/ood_sets.py): shapes, levels, seeds; no model, no training."""

from __future__ import annotations

import numpy as np
import pytest

from training.ood_sets import SET_NAMES, digits_in_distribution, ood_sets, text_images

SIMPLE = ("digits", "silhouettes", "text")
SHAPES = [(28, 28, 1, 256), (32, 32, 3, 256), (16, 16, 3, 256), (8, 8, 1, 17), (20, 12, 3, 64)]
N = 24


def _test_images(h: int, w: int, c: int, levels: int) -> np.ndarray:
    return np.random.default_rng(5).integers(0, levels, size=(N, h, w, c)).astype(np.uint8)


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def generated(request):
    h, w, c, levels = request.param
    return request.param, ood_sets(_test_images(h, w, c, levels), levels, seed=3, dataset="folder:photos")


def test_every_set_is_shaped_like_the_test_images_with_the_models_levels(generated):
    (h, w, c, levels), sets = generated
    assert list(sets) == ["noise", "inverted", "constant", "shuffled", "smooth", "natural", *SIMPLE]
    assert tuple(sets) == SET_NAMES
    for name, images in sets.items():
        assert images.shape == (N, h, w, c), name
        assert np.issubdtype(images.dtype, np.integer), name
        assert images.min() >= 0 and images.max() <= levels - 1, name


@pytest.mark.parametrize("name", SIMPLE)
def test_simple_sets_differ_between_images_and_are_not_constant(generated, name):
    (h, w, c, levels), sets = generated
    images = sets[name].reshape(N, -1)
    assert len({img.tobytes() for img in images}) == N  # every image its own
    spread = images.max(1) - images.min(1)
    assert (spread >= (levels - 1) // 5).all()  # a shape or text on a background, not one level
    assert images.max() >= (levels - 1) // 2  # bright somewhere: the level range is used


@pytest.mark.parametrize("name", ["digits", "silhouettes"])
def test_digits_and_silhouettes_are_grey_light_on_dark(generated, name):
    (h, w, c, levels), sets = generated
    images = sets[name]
    assert (images == images[..., :1]).all()  # grey, in every channel
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    assert np.median(border) <= 0.15 * (levels - 1)  # a dark background


def test_text_is_coloured_for_a_colour_model():
    sets = ood_sets(_test_images(32, 32, 3, 256), 256, seed=0)
    text = sets["text"]
    assert (text != text[..., :1]).any(axis=(1, 2, 3)).mean() > 0.9  # RGB colours, not grey


@pytest.mark.parametrize("shape", [(28, 28, 1, 256), (16, 16, 3, 256)])
def test_sets_are_deterministic_for_a_seed(shape):
    h, w, c, levels = shape
    test = _test_images(h, w, c, levels)
    a, b = ood_sets(test, levels, seed=7), ood_sets(test, levels, seed=7)
    other = ood_sets(test, levels, seed=8)
    for name in SIMPLE:
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], other[name]), name


def test_new_sets_leave_the_earlier_sets_unchanged():
    """The simple sets draw from their own generators: the first six sets and their seeds are as before."""
    test = _test_images(28, 28, 1, 256)
    full, without = ood_sets(test, 256, seed=1), ood_sets(test, 256, seed=1, skip=SIMPLE)
    assert list(without) == ["noise", "inverted", "constant", "shuffled", "smooth", "natural"]
    for name, images in without.items():
        np.testing.assert_array_equal(full[name], images)


@pytest.mark.parametrize(
    "dataset",
    ["digits", "idx:data/mnist/train-images-idx3-ubyte", "idx:/x/MNIST-dir/train-images-idx3-ubyte.gz", "npy:usps.npy"],
)
def test_the_digits_set_is_left_out_for_a_digits_model(dataset):
    assert digits_in_distribution(dataset)
    sets = ood_sets(_test_images(8, 8, 1, 17), 17, seed=0, dataset=dataset)
    assert "digits" not in sets
    assert {"silhouettes", "text", "natural"} <= set(sets)


@pytest.mark.parametrize(
    "dataset", [None, "folder:photos", "idx:data/fashion-mnist/train-images-idx3-ubyte", "npz:kmnist.npz"]
)
def test_the_digits_set_stays_for_other_data(dataset):
    assert not digits_in_distribution(dataset)
    assert "digits" in ood_sets(_test_images(8, 8, 1, 17), 17, seed=0, dataset=dataset)


def test_skip_leaves_out_sets_by_name():
    sets = ood_sets(_test_images(8, 8, 1, 17), 17, seed=0, skip=["digits", "text"])
    assert "digits" not in sets and "text" not in sets and "silhouettes" in sets


def test_digits_keep_the_shape_of_the_bundled_digits_at_their_own_size():
    """At 8x8 and 17 levels the digits set is scikit-learn's digits themselves."""
    from sklearn.datasets import load_digits

    bundled = {img.astype(np.int64).tobytes() for img in load_digits().images}
    digits = ood_sets(_test_images(8, 8, 1, 17), 17, seed=0)["digits"]
    assert all(img[..., 0].tobytes() in bundled for img in digits)


def test_text_falls_back_to_the_bitmap_font(monkeypatch):
    """A Pillow without the scalable default font (before 10.1): the bitmap font's renderings, scaled."""
    from PIL import ImageFont

    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)  # Pillow >= 10.1: the bitmap

    def old_load_default(**kwargs):
        if kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return bitmap()

    monkeypatch.setattr(ImageFont, "load_default", old_load_default)
    assert not isinstance(ImageFont.load_default(), ImageFont.FreeTypeFont)
    for h, w, c in [(28, 28, 1), (16, 16, 3)]:
        images = text_images(8, h, w, 256, np.random.default_rng(0), c)
        assert images.shape == (8, h, w, c) and images.min() >= 0 and images.max() <= 255
        flat = images.reshape(8, -1)
        assert (flat.max(1) - flat.min(1) > 51).all()
        assert len({img.tobytes() for img in flat}) == 8


def test_the_report_lists_auroc_aupr_and_fpr_per_score_for_every_set():
    from training.ood_eval import markdown

    sets = list(ood_sets(_test_images(8, 8, 1, 17), 17, seed=0, dataset="folder:x"))
    metrics = {"auroc": 0.9, "aupr": 0.8, "fpr_at_95_tpr": 0.25}
    summary = {
        "K": 10,
        "test_images": N,
        "default_score": "nll_bpd",
        "ood_sets": sets,
        "results": {name: {s: metrics for s in ("nll_bpd", "complexity")} for name in sets},
        "test_flagged_fraction": {"nll_bpd": {"0.01": 0.0}, "complexity": {"0.01": 0.01}},
    }
    lines = markdown(summary).splitlines()
    header = next(line for line in lines if line.startswith("| OOD set"))
    assert header.count("AUROC / AUPR / FPR@95TPR") == 2
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "0.900" in line}
    assert list(rows) == sets
    assert all(row.count("0.900 / 0.800 / 0.250") == 2 for row in rows.values())
