from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np

from service.images import levels_to_pixels, pixels_to_levels
from service.repository import ModelRepository, load_version
from service.settings import Settings
from tests.service.conftest import make_client


def test_levels_round_trip_through_pixels():
    for levels in (2, 3, 16, 17, 100, 256):
        lv = np.arange(levels)
        np.testing.assert_array_equal(pixels_to_levels(levels_to_pixels(lv, levels), levels), lv)


def test_tampered_version_is_not_served(version_dir, tmp_path):
    bad = tmp_path / "digits" / "2"
    shutil.copytree(version_dir, bad)
    blob = bytearray((bad / "log_weights.onnx").read_bytes())
    blob[100] ^= 0x01
    (bad / "log_weights.onnx").write_bytes(bytes(blob))
    shutil.copytree(version_dir, tmp_path / "digits" / "1")
    repo = ModelRepository(Settings(models_dir=tmp_path, intra_op_threads=1))
    repo.load()
    assert sorted(repo.models["digits"]) == [1]  # version 2 is refused, version 1 still served
    assert "sha256" in repo.failures["digits/2"] and "log_weights.onnx" in repo.failures["digits/2"]
    with make_client(tmp_path / "digits" / "2") as c:  # nothing loadable at all: not ready
        r = c.get("/readyz")
        assert r.status_code == 503 and not r.json()["ready"]
        assert c.post("/sample", json={"n": 1}).status_code == 503


def test_newest_version_is_default(version_dir, tmp_path):
    for v in ("1", "3"):
        shutil.copytree(version_dir, tmp_path / "digits" / v)
    with make_client(tmp_path) as c:
        assert c.post("/sample", json={"n": 1}).json()["version"] == 3
        assert c.post("/sample", json={"n": 1, "version": 1}).json()["version"] == 1


def test_sample_prior_follows_the_mixture(version_dir):
    mv = load_version(version_dir, Settings(intra_op_threads=1))
    z = mv.runtime.sample_prior(20000, np.random.default_rng(0))
    w = np.exp(mv.runtime.prior_log_weights)
    mean = w @ mv.runtime.prior_means
    np.testing.assert_allclose(z.mean(0), mean, atol=0.1)


def test_service_never_imports_torch(models_dir):
    code = textwrap.dedent(f"""
        import sys
        from fastapi.testclient import TestClient
        from service.main import create_app
        from service.settings import Settings
        with TestClient(create_app(Settings(models_dir={str(models_dir)!r}, intra_op_threads=1))) as c:
            img = [[0] * 8] * 8
            assert c.post("/score", json={{"images": [img], "num_samples": 20}}).status_code == 200
            assert c.post("/sample", json={{"n": 2}}).status_code == 200
            assert c.post("/reconstruct", json={{"images": [img]}}).status_code == 200
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "training")))
        assert not bad, bad
        print("torch-free")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "torch-free" in out.stdout, out.stderr
