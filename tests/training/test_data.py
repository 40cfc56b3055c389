import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import DataError, prepare, read_idx, requantize


def write_idx(path: Path, images: np.ndarray, compress: bool = False) -> None:
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">III", *images.shape) + images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def test_digits_split_is_the_seed_texts():
    data = prepare("digits")
    assert (len(data.train), len(data.val), len(data.test)) == (1000, 350, 447)
    assert data.levels == 17 and data.shape == (8, 8, 1) and data.dim == 64 and data.channels == 1
    assert data.train.dtype == np.uint8 and data.train.max() == 16
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(data.test[0, ..., 0], load_digits().images[1350])


def test_digits_classes_filter():
    data = prepare("digits", classes=[0, 1, 2, 3, 4])
    assert 0 < len(data.train) < 1000


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, size=(20, 5, 6), dtype=np.uint8)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    write_idx(path, images, compress)
    np.testing.assert_array_equal(read_idx(path), images)
    data = prepare(f"idx:{path}", split_seed=3)
    assert len(data.train) + len(data.val) + len(data.test) == 20 and data.levels == 256
    again = prepare(f"idx:{path}", split_seed=3)
    np.testing.assert_array_equal(data.test, again.test)  # the seeded split is deterministic


def test_idx_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x12\x34\x08\x03")
    with pytest.raises(DataError, match="bad.idx.*magic"):
        prepare(f"idx:{bad}")
    short = tmp_path / "short.idx"
    short.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 10, 4, 4) + b"\0" * 7)
    with pytest.raises(DataError, match="short.idx.*declares"):
        prepare(f"idx:{short}")
    broken_gz = tmp_path / "broken.idx.gz"
    broken_gz.write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(DataError, match="broken.idx.gz"):
        prepare(f"idx:{broken_gz}")
    with pytest.raises(DataError, match="no such file"):
        prepare(f"idx:{tmp_path / 'missing.idx'}")


def test_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / "rgb.jpg")
    data = prepare(f"folder:{tmp_path}", levels=4)  # one colour file among grey ones: auto keeps colour
    assert data.shape == (6, 6, 3) and data.levels == 4 and data.train.max() <= 3
    assert data.preprocessing["channels"] == 3 and data.preprocessing["convert"] is None
    grey = prepare(f"folder:{tmp_path}", levels=4, channels="1")
    assert grey.shape == (6, 6, 1) and grey.preprocessing["convert"] == "L"
    Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(DataError, match="odd.png.*--image-size"):
        prepare(f"folder:{tmp_path}")
    resized = prepare(f"folder:{tmp_path}", image_size=[4, 5])
    assert resized.shape == (4, 5, 3) and resized.preprocessing["resize"] == [4, 5]
    (tmp_path / "z_corrupt.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="z_corrupt.png"):
        prepare(f"folder:{tmp_path}", image_size=[4, 5])


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no PNG or JPEG"):
        prepare(f"folder:{tmp_path}")


def test_npz_and_npy_sources(tmp_path):
    rng = np.random.default_rng(0)
    parts = {k: rng.integers(0, 5, (n, 4, 4), dtype=np.uint8) for k, n in [("train", 8), ("val", 3), ("test", 4)]}
    np.savez(tmp_path / "fixed.npz", levels=5, **parts)
    data = prepare(f"npz:{tmp_path / 'fixed.npz'}")
    assert data.levels == 5 and data.split["kind"] == "fixed"
    np.testing.assert_array_equal(data.val[..., 0], parts["val"])
    np.savez(tmp_path / "one.npz", images=rng.integers(0, 256, (30, 4, 4), dtype=np.uint8))
    assert prepare(f"npz:{tmp_path / 'one.npz'}").split["kind"] == "seeded"
    np.save(tmp_path / "f.npy", rng.random((10, 4, 4)).astype(np.float32))
    with pytest.raises(DataError, match="f.npy.*float32.*not an integer"):
        prepare(f"npy:{tmp_path / 'f.npy'}")
    np.savez(tmp_path / "range.npz", levels=3, images=np.full((10, 2, 2), 7, dtype=np.uint8))
    with pytest.raises(DataError, match=r"\[7, 7\].*0\.\.2"):
        prepare(f"npz:{tmp_path / 'range.npz'}")
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 2, 2), dtype=np.uint8))
    with pytest.raises(DataError, match="no images"):
        prepare(f"npz:{tmp_path / 'empty.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.npz"):
        prepare(f"npz:{tmp_path / 'junk.npz'}")


def test_requantize_to_binary():
    x = np.array([0, 127, 128, 255], dtype=np.uint8)
    np.testing.assert_array_equal(requantize(x, 256, 2), [0, 0, 1, 1])
    np.testing.assert_array_equal(requantize(np.arange(17), 17, 17), np.arange(17))
    with pytest.raises(DataError, match="up to"):
        prepare("digits", levels=32)


def test_unknown_source():
    with pytest.raises(DataError, match="unknown data source"):
        prepare("mnist")


def test_channels_follow_the_data_and_convert_as_pillow_does(tmp_path):
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 256, (12, 5, 7, 3), dtype=np.uint8)
    for i, img in enumerate(colour):
        Image.fromarray(img).save(tmp_path / f"{i:02d}.png")
    data = prepare(f"folder:{tmp_path}")
    assert data.shape == (5, 7, 3) and data.dim == 105 and data.flat("train").shape[1] == 105
    everything = np.concatenate([data.train, data.val, data.test])
    assert sorted(map(bytes, everything)) == sorted(map(bytes, colour))  # colour kept exactly (PNG)
    grey = prepare(f"folder:{tmp_path}", channels="1")
    pillow = [np.asarray(Image.fromarray(img).convert("L")) for img in colour]
    assert sorted(map(bytes, np.concatenate([grey.train, grey.val, grey.test]))) == sorted(map(bytes, pillow))
    # colour files holding grey pictures are grey; grey arrays can be asked for in colour
    for i, img in enumerate(colour[:, :, :, :1]):
        Image.fromarray(np.repeat(img, 3, axis=2)).save(tmp_path / f"{i:02d}.png")
    assert prepare(f"folder:{tmp_path}").shape == (5, 7, 1)
    np.save(tmp_path / "c.npy", colour)
    assert prepare(f"npy:{tmp_path / 'c.npy'}").shape == (5, 7, 3)
    assert prepare(f"npy:{tmp_path / 'c.npy'}", channels="1").shape == (5, 7, 1)
    assert prepare("digits", channels="3").shape == (8, 8, 3)
    np.save(tmp_path / "bad.npy", rng.integers(0, 255, (4, 5, 7, 2), dtype=np.uint8))
    with pytest.raises(DataError, match="C 1 or 3"):
        prepare(f"npy:{tmp_path / 'bad.npy'}")
    with pytest.raises(DataError, match="resizes folder images only"):
        prepare(f"npy:{tmp_path / 'c.npy'}", image_size=[4, 4])
