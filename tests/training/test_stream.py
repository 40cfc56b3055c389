"""--stream: .npy and uncompressed IDX sources stay memory-mapped; each split is read a batch at a time, and
the model is the one trained from the same source held in memory."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tests.training.test_data import write_idx
from training.config import TrainConfig
from training.data import DataError, LazyRows, prepare
from training.pipeline import run
from vae_contract.formulas import levels_to_pixels

COMPARED = ("weights.bin", "log_weights.onnx", "checkpoint.json", "metrics.jsonl")


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return levels_to_pixels(load_digits().images.astype(np.uint8), 17)  # (1797, 8, 8), 8-bit


def test_streamed_splits_hold_the_in_memory_images(pixels, tmp_path):
    rng = np.random.default_rng(0)
    colour = np.stack([pixels, pixels // 2, 255 - pixels], axis=-1)  # (N, 8, 8, 3)
    colour[::7] = rng.integers(0, 256, colour[::7].shape)
    np.save(tmp_path / "c.npy", colour)
    write_idx(tmp_path / "g.idx", pixels)
    for spec, kw in ((f"npy:{tmp_path / 'c.npy'}", {}), (f"npy:{tmp_path / 'c.npy'}", {"channels": 1, "levels": 16}),
                     (f"idx:{tmp_path / 'g.idx'}", {"levels": 17})):  # fmt: skip
        a, b = prepare(spec, **kw), prepare(spec, stream=True, **kw)
        assert isinstance(b.train, LazyRows) and b.shape == a.shape and b.levels == a.levels
        assert b.preprocessing == a.preprocessing and b.split == a.split
        for part in ("train", "val", "test"):
            np.testing.assert_array_equal(getattr(b, part)[:], getattr(a, part))
            np.testing.assert_array_equal(b.flat(part), a.flat(part))
        picked = np.array([5, 0, 3, 3])
        np.testing.assert_array_equal(b.train[picked], a.train[picked])  # any order, repeats, as arrays index
    np.save(tmp_path / "f.npy", pixels.astype(np.float32))
    with pytest.raises(DataError, match="not an integer type"):
        prepare(f"npy:{tmp_path / 'f.npy'}", stream=True)
    bad = pixels.copy()
    bad[1500] = 17
    np.save(tmp_path / "b.npy", bad.astype(np.uint16) * 16)
    with pytest.raises(DataError, match="outside|range"):
        prepare(f"npy:{tmp_path / 'b.npy'}", stream=True)


def test_a_streamed_run_trains_the_same_model(pixels, tmp_path):
    np.save(tmp_path / "d.npy", pixels)
    cfg = TrainConfig(dataset=f"npy:{tmp_path / 'd.npy'}", levels=17, hidden=32, latent_dim=4, components=3,
                      epochs=3, iw_train=2, dropout=0.1, eval_k=10)  # fmt: skip
    outs = [tmp_path / "m" / str(i) for i in (1, 2)]
    run(cfg, outs[0], plots=False, progress=False, log=lambda *_: None)
    run(cfg, outs[1], plots=False, progress=False, log=lambda *_: None, stream=True)
    for name in COMPARED:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_a_streamed_folder_decoded_by_dataloader_workers_trains_the_same_model(request, tmp_path):
    from PIL import Image

    from tests.training.test_resume import in_a_fresh_process

    if in_a_fresh_process(request, __file__):  # DataLoader workers' SIGCHLD: see in_a_fresh_process
        return
    pixels = request.getfixturevalue("pixels")

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(pixels[:600]):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    cfg = TrainConfig(dataset=f"folder:{folder}", levels=17, hidden=32, latent_dim=4, components=3,
                      epochs=2, iw_train=2, dropout=0.1, eval_k=10)  # fmt: skip
    streamed = prepare(cfg.dataset, levels=17, stream=True)
    assert (
        isinstance(streamed.train, LazyRows) and streamed.preprocessing == prepare(cfg.dataset, levels=17).preprocessing
    )
    outs = [tmp_path / "m" / str(i) for i in (1, 2)]
    run(cfg, outs[0], plots=False, progress=False, log=lambda *_: None)
    run(cfg, outs[1], plots=False, progress=False, log=lambda *_: None, stream=True, data_workers=2)
    for name in COMPARED:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
