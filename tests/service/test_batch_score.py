"""vae-score: /score's numbers for every image of a folder or array source, torch-free, resumable."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.batch_score import ScoreError, score_to_csv
from service.main import create_app
from service.settings import Settings
from tests.training.test_data import write_idx
from vae_contract.formulas import SCORE_NAMES, levels_to_pixels

REPO = Path(__file__).resolve().parents[2]
K = 40


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A copy of the shipped digits/1 (17 grey levels, 8x8), so nothing here depends on training."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(REPO / "models" / "digits" / "1", root / "digits" / "1")
    return root


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images.astype(np.uint8)[1350:1362]  # 12 test digits, levels 0..16


def settings(models: Path, **overrides) -> Settings:
    return Settings(models_dir=models, intra_op_threads=1, **overrides)


def reference(models: Path) -> Settings:
    """onnxruntime fp32 only: no OpenVINO compile and parity check at every load (the tests that need no fast path)."""
    return settings(models, engine="onnxruntime")


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_every_field_matches_score_over_http(models, images, tmp_path):
    npz = tmp_path / "d.npz"
    np.savez(npz, images=images, levels=np.array(17))
    out = tmp_path / "s.csv"
    header = score_to_csv(models / "digits" / "1", f"npz:{npz}", out, k=K, seed=3, batch=5,
                          settings=settings(models), progress=False)  # fmt: skip
    rows = read(out)
    assert len(rows) == len(images) and [r["index"] for r in rows] == [str(i) for i in range(len(images))]
    assert header["columns"] == list(rows[0]) and header["engine"] in ("onnxruntime fp32", "openvino bf16")
    with TestClient(create_app(settings(models))) as client:
        for name in SCORE_NAMES:
            body = client.post(
                "/score", json={"images": images.tolist(), "num_samples": K, "seed": 3, "score": name}
            ).json()
            assert body["engine"] == header["engine"]
            for row, res in zip(rows, body["results"], strict=True):
                for key in ("log_likelihood_nats", "nll_nats", "nll_bits_per_dim", "elbo_nats", "ess"):
                    assert float(row[key]) == pytest.approx(res[key], rel=1e-12, abs=1e-12), key
                assert float(row[name]) == pytest.approx(res["score"], rel=1e-12, abs=1e-12)
                assert float(row[f"{name}_p_value"]) == pytest.approx(res["p_value"], rel=1e-12)
                assert row[f"{name}_is_ood"] == str(res["is_ood"]).lower()
                if name == body["score_name"] == "nll_bpd":  # the default score, at the default fpr
                    assert float(row["threshold"]) == pytest.approx(res["threshold"], rel=1e-12)
                    assert row["is_ood"] == row["nll_bpd_is_ood"] and row["score"] == row["nll_bpd"]


def test_an_interrupted_run_resumes_to_the_same_file(models, images, tmp_path):
    npz = tmp_path / "d.npz"
    np.savez(npz, images=images, levels=np.array(17))
    args = dict(k=K, batch=4, settings=reference(models), progress=False)
    whole, part = tmp_path / "whole.csv", tmp_path / "part.csv"
    score_to_csv(models / "digits" / "1", str(npz), whole, **args)
    score_to_csv(models / "digits" / "1", str(npz), part, **args)
    lines = part.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(lines[:6]) + lines[6][:9])  # 5 rows and a row cut short, as a kill leaves it
    score_to_csv(models / "digits" / "1", str(npz), part, **args)
    assert part.read_bytes() == whole.read_bytes()
    with pytest.raises(ScoreError, match="another run .*num_samples"):
        score_to_csv(models / "digits" / "1", str(npz), part, **{**args, "k": K + 1})
    score_to_csv(models / "digits" / "1", str(npz), part, **{**args, "k": K + 1}, overwrite=True)
    assert read(part)[0]["log_likelihood_nats"] != read(whole)[0]["log_likelihood_nats"]


def test_folder_idx_and_array_sources_agree(models, images, tmp_path):
    """PNG files decode as uploads do; an 8-bit IDX file is requantized to the model's 17 levels as training
    requantizes; both give the array's rows. A file that cannot be decoded gets a row with its error."""
    pixels = levels_to_pixels(images, 17)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(pixels[:4]):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    (folder / "99.png").write_bytes(b"not a png")
    write_idx(tmp_path / "d.idx", pixels[:4])
    np.save(tmp_path / "d.npy", images[:4])
    outs = {}
    for name, spec in (("png", f"folder:{folder}"), ("idx", f"idx:{tmp_path / 'd.idx'}"),
                       ("npy", f"npy:{tmp_path / 'd.npy'}")):  # fmt: skip
        score_to_csv(models / "digits" / "1", spec, tmp_path / f"{name}.csv", k=K, settings=reference(models),
                     progress=False, levels=17 if name == "npy" else None)  # fmt: skip
        outs[name] = read(tmp_path / f"{name}.csv")
    assert [r["source"] for r in outs["png"]] == ["00.png", "01.png", "02.png", "03.png", "99.png"]
    assert "cannot decode" in outs["png"][4]["error"] and outs["png"][4]["log_likelihood_nats"] == ""
    for a, b, c in zip(outs["png"], outs["idx"], outs["npy"]):
        assert a["log_likelihood_nats"] == b["log_likelihood_nats"] == c["log_likelihood_nats"]
    np.save(tmp_path / "big.npy", np.zeros((2, 9, 9), dtype=np.uint8))
    with pytest.raises(ScoreError, match="images are 9x9"):
        score_to_csv(models / "digits" / "1", str(tmp_path / "big.npy"), tmp_path / "x.csv", settings=reference(models))


def test_the_command_is_torch_free_and_shows_progress(models, images, tmp_path):
    np.savez(tmp_path / "d.npz", images=images, levels=np.array(17))
    code = textwrap.dedent(f"""
        import sys
        from service.batch_score import main
        rc = main([{str(models / "digits" / "1")!r}, {str(tmp_path / "d.npz")!r}, "--out",
                   {str(tmp_path / "s.csv")!r}, "-k", "20", "--threads", "1", "--engine", "onnxruntime"])
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "training")))
        assert rc == 0 and not bad, (rc, bad)
        print("torch-free")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and "torch-free" in done.stdout, done.stderr[-2000:]
    assert "onnxruntime fp32, K=20" in done.stderr and "scoring: 12/12 images (100%)" in done.stderr


def test_shards_are_the_whole_run_in_parts(models, images, tmp_path):
    """--shard I/N: what each of N processes (or Kubernetes Indexed Job pods) scores; the parts' rows, with their
    global indices, make the single run's file."""
    np.savez(tmp_path / "d.npz", images=images, levels=np.array(17))
    args = dict(k=K, batch=4, settings=reference(models), progress=False)
    score_to_csv(models / "digits" / "1", str(tmp_path / "d.npz"), tmp_path / "whole.csv", **args)
    parts = []
    for i in range(5):
        out = tmp_path / f"part{i}.csv"
        score_to_csv(models / "digits" / "1", str(tmp_path / "d.npz"), out, shard=(i, 5), **args)
        parts.append(out.read_bytes().split(b"\n", 1))
    whole_head, whole_rows = (tmp_path / "whole.csv").read_bytes().split(b"\n", 1)
    assert all(head == whole_head for head, _ in parts)
    assert b"".join(rows for _, rows in parts) == whole_rows


def test_anomaly_maps_are_score_s_maps_and_resume(models, images, tmp_path):
    """--maps DIR: each image's map as /score's anomaly_map (same K, seed, engine), its flagged pixels in the CSV,
    and an interrupted run resumes to the same files."""
    npz = tmp_path / "d.npz"
    np.savez(npz, images=images, levels=np.array(17))
    out, maps = tmp_path / "s.csv", tmp_path / "maps"
    header = score_to_csv(models / "digits" / "1", f"npz:{npz}", out, k=K, seed=3, batch=5,
                          settings=reference(models), progress=False, maps_dir=maps)  # fmt: skip
    rows = read(out)
    assert header["anomaly_map_units"] == "nats" and "anomaly_pixels" in header["columns"]
    with TestClient(create_app(reference(models))) as client:
        body = client.post(
            "/score", json={"images": images.tolist(), "num_samples": K, "seed": 3, "anomaly_map": True}
        ).json()
    for i, (row, res) in enumerate(zip(rows, body["results"], strict=True)):
        amap = np.load(maps / row["anomaly_map_file"])
        assert row["anomaly_map_file"] == f"{i}.npy" and amap.shape == (8, 8) and amap.dtype == np.float32
        np.testing.assert_allclose(amap, np.array(res["anomaly_map"]), atol=1e-4)  # /score rounds to 4 decimals
        assert float(row["pixel_threshold"]) == pytest.approx(res["pixel_threshold"], rel=1e-12)
        assert int(row["anomaly_pixels"]) == int(np.sum(res["anomaly_mask"]))
        assert float(row["log_likelihood_nats"]) == pytest.approx(res["log_likelihood_nats"], rel=1e-12)
    # resumed from its first 5 rows: the same CSV and maps
    lines = out.read_text().splitlines(keepends=True)
    first = {f.name: f.read_bytes() for f in maps.iterdir()}
    out.write_text("".join(lines[:6]))
    score_to_csv(models / "digits" / "1", f"npz:{npz}", out, k=K, seed=3, batch=5, settings=reference(models),
                 progress=False, maps_dir=maps)  # fmt: skip
    assert out.read_text().splitlines(keepends=True) == lines
    assert {f.name: f.read_bytes() for f in maps.iterdir()} == first
