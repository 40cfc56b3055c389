"""--device and --precision on a machine without a GPU: auto picks the CPU, CUDA-only choices are refused
before any training, bf16 autocast trains on the CPU, and the model handed to export lives on the CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.cli import main
from training.config import ConfigError, TrainConfig
from training.data import prepare
from training.train import check_precision, resolve_device, train

SMALL = dict(hidden=32, latent_dim=4, components=3, epochs=2, iw_train=2, dropout=0.0)


def test_auto_is_cuda_where_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match="device must be one of"):
        resolve_device("tpu")


def test_precision_only_where_it_is_safe():
    check_precision("fp32", torch.device("cpu"))
    check_precision("bf16", torch.device("cpu"))
    check_precision("fp16", torch.device("cuda"))
    with pytest.raises(ConfigError, match="fp16 needs --device cuda"):
        check_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="precision must be one of"):
        TrainConfig(precision="fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_cuda_without_one_before_training(tmp_path, capsys):
    assert main(["--dataset", "digits", "--device", "cuda", "--out", str(tmp_path / "d" / "1"), "--quiet"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
    assert (
        main(["--dataset", "digits", "--precision", "fp16", "--device", "cpu", "--out", str(tmp_path / "d" / "1")]) == 2
    )
    assert "fp16 needs --device cuda" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("eight_bit", [False, True])
def test_bf16_autocast_trains_on_the_cpu_and_returns_a_float32_cpu_model(eight_bit, tmp_path):
    """bf16 in the networks only: 17-level digits, and the same digits as 8-bit images (a logistic mixture
    over rows, whose means and scales bf16 would round to about a level: autocast over the whole bound
    diverged on 8-bit MNIST)."""
    if eight_bit:
        from sklearn.datasets import load_digits

        from vae_contract.formulas import levels_to_pixels

        np.save(tmp_path / "d.npy", levels_to_pixels(load_digits().images.astype(np.uint8), 17))
        data = prepare(f"npy:{tmp_path / 'd.npy'}")
    else:
        data = prepare("digits")
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(**SMALL, precision=precision).resolve(data.levels, len(data.train), data.shape)
        results[precision] = train(cfg, data, progress=False, device="cpu")
    assert cfg.context == ("rows" if eight_bit else "none")
    for r in results.values():
        assert math.isfinite(r.best_val_loss)
        assert {(p.device.type, p.dtype) for p in r.model.parameters()} == {("cpu", torch.float32)}
    # the same steps in bf16 land within 2 nats of fp32's validation loss
    assert abs(results["bf16"].best_val_loss - results["fp32"].best_val_loss) < 2.0
