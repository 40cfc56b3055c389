"""The model repository: every fault is reported with its reason and never stops the other versions; hot reload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from service.repository import ModelRepository
from service.settings import Settings
from tests.service.conftest import error_of, make_client
from vae_contract.formulas import levels_to_pixels, pixels_to_levels
from vae_contract.manifest import write_manifest


def test_levels_round_trip_through_pixels():
    for levels in (2, 3, 16, 17, 100, 256):
        lv = np.arange(levels)
        np.testing.assert_array_equal(pixels_to_levels(levels_to_pixels(lv, levels), levels), lv)


def copy_version(src, root, name="digits", version="1"):
    dst = root / name / version
    shutil.copytree(src, dst)
    return dst


def edit_manifest(version_dir, change, resign: bool = True):
    """Change manifest.json; re-sign it (a well-formed edit) or not (tampering)."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    manifest = change(manifest)
    if resign:
        (version_dir / "manifest.json").write_text(json.dumps(manifest))
        from vae_contract.manifest import sha256_bytes

        digest = sha256_bytes((version_dir / "manifest.json").read_bytes())
        (version_dir / "manifest.json.sha256").write_text(f"{digest}  manifest.json\n")
    else:
        (version_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


FAULTS = {
    "not_an_object": (lambda m: [], "must hold a JSON object"),
    "calibration_without_quantiles": (
        lambda m: {**m, "calibration": {**m["calibration"], "scores": {"combined": {"units": "x", "n": 5}}}},
        "quantiles",
    ),
    "graph_without_file": (
        lambda m: {**m, "graphs": {**m["graphs"], "encoder": {"inputs": {}, "outputs": {}}}},
        "file",
    ),
    "wrong_format": (lambda m: {**m, "format_version": 1}, "format_version"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_malformed_manifest_is_reported_and_the_rest_served(version_dir, tmp_path, fault):
    change, reason = FAULTS[fault]
    copy_version(version_dir, tmp_path, "digits", "1")
    bad = copy_version(version_dir, tmp_path, "other", "1")
    edit_manifest(bad, change)
    repo = ModelRepository(Settings(models_dir=tmp_path, intra_op_threads=1, engine="onnxruntime"))
    report = repo.scan()
    assert sorted(repo.models) == ["digits"] and report.loaded == ["digits/1"]
    assert reason in repo.failures["other/1"], repo.failures


def test_an_edited_manifest_is_refused(version_dir, tmp_path):
    bad = copy_version(version_dir, tmp_path, "digits", "2")
    copy_version(version_dir, tmp_path, "digits", "1")

    def shift(m):
        for block in m["calibration"]["scores"].values():
            block["quantiles"]["values"] = [v + 1000 for v in block["quantiles"]["values"]]
        return m

    edit_manifest(bad, shift, resign=False)
    repo = ModelRepository(Settings(models_dir=tmp_path, intra_op_threads=1, engine="onnxruntime"))
    repo.scan()
    assert sorted(repo.models["digits"]) == [1]
    assert "manifest was modified" in repo.failures["digits/2"]


def test_tampered_file_is_not_served(version_dir, tmp_path):
    bad = copy_version(version_dir, tmp_path, "digits", "2")
    blob = bytearray((bad / "weights.bin").read_bytes())
    blob[100] ^= 0x01
    (bad / "weights.bin").write_bytes(bytes(blob))
    copy_version(version_dir, tmp_path, "digits", "1")
    repo = ModelRepository(Settings(models_dir=tmp_path, intra_op_threads=1, engine="onnxruntime"))
    repo.scan()
    assert sorted(repo.models["digits"]) == [1]
    assert "sha256" in repo.failures["digits/2"] and "weights.bin" in repo.failures["digits/2"]
    with make_client(tmp_path / "digits" / "2") as c:  # nothing loadable at all: not ready
        r = c.get("/readyz")
        assert r.status_code == 503 and not r.json()["ready"]
        error_of(c.post("/sample", json={"n": 1}), 503, "not_ready")


@pytest.mark.parametrize("name", ["0", "-3", "01", "+2", "1.0", "v2"])
def test_only_positive_integer_versions(version_dir, tmp_path, name):
    copy_version(version_dir, tmp_path, "digits", "1")
    copy_version(version_dir, tmp_path, "digits", name)
    repo = ModelRepository(Settings(models_dir=tmp_path, intra_op_threads=1, engine="onnxruntime"))
    repo.scan()
    assert sorted(repo.models["digits"]) == [1]
    assert "positive integer" in repo.failures[f"digits/{name}"]


def test_an_unreadable_version_is_reported(version_dir, tmp_path, monkeypatch):
    """A directory the service may not read (e.g. mode 0700, another owner) gets a reason, not silence."""
    copy_version(version_dir, tmp_path, "digits", "1")
    locked = copy_version(version_dir, tmp_path, "digits", "2")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    repo = ModelRepository(Settings(models_dir=tmp_path, intra_op_threads=1, engine="onnxruntime"))
    repo.scan()
    assert sorted(repo.models["digits"]) == [1]
    assert "permission denied" in repo.failures["digits/2"]


def test_missing_repository_is_reported(tmp_path):
    repo = ModelRepository(Settings(models_dir=tmp_path / "nope", intra_op_threads=1))
    repo.scan()
    assert not repo.ready and "does not exist" in repo.failures["repository"]
    assert str(tmp_path) not in json.dumps(repo.failures)


def test_hot_reload_adds_changes_and_removes_versions_under_load(version_dir, tmp_path, test_images):
    copy_version(version_dir, tmp_path, "digits", "1")
    img = test_images[0].tolist()
    key = {"authorization": "Bearer k1"}
    with make_client(tmp_path, api_keys="k1", engine="onnxruntime") as c:
        assert c.get("/readyz").json()["models"] == {"digits": [1]}
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                statuses.append(c.post("/score", json={"images": [img], "num_samples": 200}, headers=key).status_code)

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        copy_version(version_dir, tmp_path, "digits", "2")
        report = c.post("/admin/reload", headers=key).json()
        assert report["scan"]["loaded"] == ["digits/2"] and report["models"] == {"digits": [1, 2]}
        assert c.post("/score", json={"images": [img], "num_samples": 10}, headers=key).json()["version"] == 2
        edit_manifest(tmp_path / "digits" / "2", lambda m: {**m, "created": "2000-01-01T00:00:00+00:00"})
        report = c.post("/admin/reload", headers=key).json()
        assert report["scan"]["loaded"] == ["digits/2"] and report["scan"]["unchanged"] == ["digits/1"]
        shutil.rmtree(tmp_path / "digits" / "2")
        report = c.post("/admin/reload", headers=key).json()
        assert report["scan"]["removed"] == ["digits/2"] and report["models"] == {"digits": [1]}
        stop.set()
        for t in threads:
            t.join()
        assert statuses and set(statuses) == {200}, set(statuses)


def test_sighup_rescans_the_repository(version_dir, tmp_path):
    """A real `vae-serve` process: SIGHUP picks up a new version and the process keeps running."""
    copy_version(version_dir, tmp_path, "digits", "1")
    code = textwrap.dedent(f"""
        import json, os, signal, socket, sys, threading, time, urllib.request
        from service.server import serve
        from service.settings import Settings
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        def drive():
            def ready():
                return json.load(urllib.request.urlopen(f"http://127.0.0.1:{{port}}/readyz"))["models"]
            for _ in range(200):
                try:
                    ready(); break
                except Exception:
                    time.sleep(0.05)
            import shutil
            shutil.copytree({str(tmp_path / "digits" / "1")!r}, {str(tmp_path / "digits" / "3")!r})
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(200):
                if ready() == {{"digits": [1, 3]}}:
                    print("reloaded", flush=True); break
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=drive, daemon=True).start()
        serve(Settings(models_dir={str(tmp_path)!r}, port=port, intra_op_threads=1, engine="onnxruntime"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "reloaded" in out.stdout, out.stderr[-2000:]
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: the exit status says SIGTERM
    assert out.returncode == -15 and "Finished server process" in out.stderr and "Traceback" not in out.stderr


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


def test_write_manifest_refuses_an_invalid_manifest(tmp_path):
    from vae_contract.manifest import ManifestError

    with pytest.raises(ManifestError, match="invalid manifest"):
        write_manifest(tmp_path, {"format_version": 2})
