"""vae-score: /score's numbers for every image of a folder or array source, torch-free, resumable."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service import batch_score
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
        calibrated = json.loads((models / "digits" / "1" / "manifest.json").read_text())["calibration"]["scores"]
        assert set(calibrated) <= set(SCORE_NAMES) and f"{next(iter(calibrated))}_p_value" in rows[0]
        for name in calibrated:  # every score the version can give (a column each)
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


def _typed(cell: str, arrow_type: str):
    """A CSV cell as the Parquet column of `arrow_type` holds it (an empty cell: a value the row lacks)."""
    if arrow_type == "string":
        return cell
    if cell == "":
        return None
    return {"int64": int, "double": float, "bool": {"true": True, "false": False}.get}[arrow_type](cell)


def test_parquet_holds_the_csv_s_values_with_their_types(models, images, tmp_path):
    """--out *.parquet: the CSV's columns, in order, typed (int64 index and pixel counts, float64 numbers, bool
    flags, strings), value for value the CSV's, an undecodable file's numbers null."""
    import pyarrow.parquet as pq

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(levels_to_pixels(images, 17)[:4]):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    (folder / "99.png").write_bytes(b"not a png")
    args = dict(k=K, seed=3, batch=3, settings=reference(models), progress=False)
    header = score_to_csv(models / "digits" / "1", f"folder:{folder}", tmp_path / "s.csv", maps_dir=tmp_path / "m1",
                          **args)  # fmt: skip
    score_to_csv(models / "digits" / "1", f"folder:{folder}", tmp_path / "s.parquet", maps_dir=tmp_path / "m2", **args)
    table = pq.read_table(tmp_path / "s.parquet")
    types = {field.name: str(field.type) for field in table.schema}
    assert list(types) == header["columns"] and "anomaly_pixels" in types
    assert (types["index"], types["source"], types["nll_nats"], types["is_ood"], types["anomaly_pixels"]) == (
        "int64", "string", "double", "bool", "int64")  # fmt: skip
    assert set(types.values()) == {"int64", "string", "double", "bool"}
    csv_rows, parquet_rows = read(tmp_path / "s.csv"), table.to_pylist()
    assert len(parquet_rows) == len(csv_rows) == 5 and "cannot decode" in parquet_rows[4]["error"]
    assert parquet_rows[4]["log_likelihood_nats"] is None and parquet_rows[4]["anomaly_map_file"] is None
    for row, cells in zip(parquet_rows, csv_rows, strict=True):
        for name, cell in cells.items():
            value = row[name] if types[name] != "string" else (row[name] or "")
            assert value == _typed(cell, types[name]), (name, cell, row[name])


def test_an_interrupted_parquet_run_resumes_to_the_same_file(models, images, tmp_path, monkeypatch):
    """Each flushed batch is a part file beside the output; an interrupted run's parts are kept (a half-written
    one is not), the run goes on from the first row they lack, and the parts are combined into the same file as
    an uninterrupted run's. Shards' files, concatenated, are the whole run's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    npz = tmp_path / "d.npz"
    np.savez(npz, images=images, levels=np.array(17))
    args = dict(k=K, batch=4, settings=reference(models), progress=False)
    whole, part = tmp_path / "whole.parquet", tmp_path / "part.parquet"
    score_to_csv(models / "digits" / "1", str(npz), whole, **args)

    score_rows, starts = batch_score.score_rows, []

    def counted(*a, **kw):
        starts.append(a[-1])  # first_index
        if len(starts) == 3 and interrupt:
            raise KeyboardInterrupt
        return score_rows(*a, **kw)

    monkeypatch.setattr(batch_score, "score_rows", counted)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        score_to_csv(models / "digits" / "1", str(npz), part, **args)
    parts = tmp_path / "part.parquet.parts"
    assert not part.exists() and sorted(p.name for p in parts.iterdir()) == [
        "000000000000.parquet",
        "000000000004.parquet",
    ]
    (parts / "000000000008.tmp").write_bytes(b"PAR1 cut short")  # a part an interruption left half-written
    interrupt, starts[:] = False, []
    score_to_csv(models / "digits" / "1", str(npz), part, **args)
    assert starts == [8] and not parts.exists()
    assert part.read_bytes() == whole.read_bytes()
    assert pq.read_table(part).equals(pq.read_table(whole))
    score_to_csv(models / "digits" / "1", str(npz), part, **args)  # complete: nothing scored again
    assert starts == [8] and part.read_bytes() == whole.read_bytes()
    with pytest.raises(ScoreError, match="another run .*num_samples"):
        score_to_csv(models / "digits" / "1", str(npz), part, **{**args, "k": K + 1})
    monkeypatch.setattr(batch_score, "PARQUET_ROW_GROUP", 4)  # the combined files in several row groups
    shards = [tmp_path / f"shard{i}.parquet" for i in range(2)]
    for i, out in enumerate(shards):
        score_to_csv(models / "digits" / "1", str(npz), out, shard=(i, 2), **args)
    assert [pq.read_metadata(out).num_row_groups for out in shards] == [2, 2]  # 4 + 2 rows each
    assert pa.concat_tables([pq.read_table(out) for out in shards]).equals(pq.read_table(whole))


def test_parquet_without_pyarrow_says_what_to_install_before_scoring(models, images, tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "d.npz", images=images, levels=np.array(17))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow: ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    load_model, loaded = batch_score.load_model, []
    monkeypatch.setattr(batch_score, "load_model", lambda *a: loaded.append(a) or load_model(*a))
    argv = [str(models / "digits" / "1"), str(tmp_path / "d.npz"), "-k", "5", "--engine", "onnxruntime", "--quiet"]
    assert batch_score.main([*argv, "--out", str(tmp_path / "s.parquet")]) == 2
    err = capsys.readouterr().err
    assert "needs pyarrow" in err and "pip install pyarrow" in err, err
    assert not loaded and sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]
    assert batch_score.main([*argv, "--out", str(tmp_path / "s.csv")]) == 0  # CSV needs no pyarrow
    assert len(loaded) == 1 and len(read(tmp_path / "s.csv")) == len(images)
