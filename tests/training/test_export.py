import json

import numpy as np
import pytest
import torch

from training.config import TrainConfig
from training.export import (
    ExportError,
    export_graphs,
    export_ready,
    load_checkpoint,
    verify,
    verify_files,
    write_version,
)
from training.model import VAE


def test_version_dir_is_complete_and_verified(version_dir):
    manifest = verify_files(version_dir)
    assert set(manifest["files"]) >= {"encoder.onnx", "decoder.onnx", "log_weights.onnx", "checkpoint.pt"}
    assert manifest["image"] == {"height": 8, "width": 8, "dim": 64, "levels": 17}
    assert manifest["metrics"]["nll"]["K"] == 100 and manifest["metrics"]["neg_elbo"]["K"] == 1
    check = manifest["export_check"]
    assert check["max_abs_diff_log_likelihood_nats"] <= check["tolerance_nats"] == 1e-3
    prior = manifest["prior"]
    assert np.isclose(np.exp(prior["log_weights"]).sum(), 1.0)
    assert np.array(prior["means"]).shape == (prior["components"], manifest["latent_dim"])


def test_checkpoint_rebuilds_the_model(version_dir):
    model = load_checkpoint(version_dir)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert model.cfg.to_dict() == manifest["training"]["config"]


def test_parity_failure_writes_nothing(tmp_path):
    torch.manual_seed(0)
    model = VAE(TrainConfig(hidden=16, latent_dim=3), dim=64, levels=17).eval()
    frozen = export_ready(model)
    export_graphs(frozen, tmp_path)
    x = np.random.default_rng(0).integers(0, 17, (8, 64))
    assert verify(frozen, tmp_path, x)["max_abs_diff_log_likelihood_nats"] < 1e-3
    with torch.no_grad():  # the graphs on disk no longer match the torch model
        frozen.decoder.net[-1].bias.add_(0.05 * torch.randn_like(frozen.decoder.net[-1].bias))
    with pytest.raises(ExportError, match="parity failed"):
        verify(frozen, tmp_path, x)


def test_write_version_refuses_on_parity_failure(tmp_path, monkeypatch):
    import training.export as export

    torch.manual_seed(0)
    model = VAE(TrainConfig(hidden=16, latent_dim=3), dim=64, levels=17).eval()
    real_export = export.export_graphs

    def drifting_export(m, out):  # export a perturbed copy: onnxruntime disagrees with torch
        drifted = export.export_ready(m)
        with torch.no_grad():
            drifted.encoder.net[0].bias.add_(0.5)
        return real_export(drifted, out)

    monkeypatch.setattr(export, "export_graphs", drifting_export)
    out = tmp_path / "m" / "1"
    with pytest.raises(ExportError, match="nothing written"):
        write_version(
            model,
            out,
            verify_images=np.zeros((4, 64), dtype=np.int64),
            metrics={},
            training={},
            data_info={"image_shape": [8, 8]},
        )
    assert not out.exists() and not list((tmp_path / "m").iterdir())


def test_tampered_file_is_detected(version_dir, tmp_path):
    import shutil

    copy = tmp_path / "digits" / "1"
    shutil.copytree(version_dir, copy)
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="decoder.onnx.*sha256"):
        verify_files(copy)
