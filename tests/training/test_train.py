"""The training loop: deterministic, never stopped by the clock unless asked, weight averaging that cannot hurt."""

import json

import numpy as np
import pytest
import torch

from training.config import TrainConfig
from training.data import prepare
from training.model import VAE
from training.pipeline import run
from training.train import WeightAverage, train

SMALL = dict(hidden=32, latent_dim=4, components=3, epochs=6, eval_k=50, iw_train=2, dropout=0.1)


def test_same_command_same_seed_same_model(tmp_path):
    """Trained twice with the same data, config and seed: identical weights, graphs and metrics."""
    cfg = TrainConfig(**SMALL)
    manifests = [run(cfg, tmp_path / str(i) / "1", plots=False, progress=False, log=lambda *_: None) for i in (1, 2)]
    a, b = (tmp_path / str(i) / "1" for i in (1, 2))
    for name in ("weights.bin", "encoder.onnx", "decoder.onnx", "log_weights.onnx", "checkpoint.json", "metrics.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for key in ("metrics", "calibration", "check", "export_check", "prior"):
        assert manifests[0][key] == manifests[1][key], key
    assert manifests[0]["training"]["best_epoch"] == manifests[1]["training"]["best_epoch"]
    other = run(cfg.replace(seed=1), tmp_path / "3" / "1", plots=False, progress=False, log=lambda *_: None)
    assert other["metrics"] != manifests[0]["metrics"]


def test_weight_average_warms_up():
    torch.manual_seed(0)
    model = VAE(TrainConfig(hidden=8, latent_dim=2).resolve(17, 10), dim=4, levels=17)
    avg = WeightAverage(model, decay=0.999)
    before = [p.detach().clone() for p in avg.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.update()  # first step: decay min(0.999, 2/11), so the average moves 9/11 of the way
    for b, p in zip(before, avg.model.parameters()):
        torch.testing.assert_close(p, b + 9 / 11)


def test_the_better_of_raw_and_averaged_weights_is_kept():
    data = prepare("digits")
    cfg = TrainConfig(**SMALL, ema=0.99).resolve(data.levels, len(data.train))
    result = train(cfg, data, progress=False)
    assert result.weights in ("raw", "ema") and set(result.val_loss_at_best) == {"raw", "ema"}
    assert result.best_val_loss == min(result.val_loss_at_best.values())
    assert result.val_loss_at_best[result.weights] == result.best_val_loss
    assert not result.time_limited and result.stopped_because.startswith("epoch cap")


def test_a_time_limit_is_explicit_loud_and_recorded(tmp_path):
    lines = []
    cfg = TrainConfig(**{**SMALL, "epochs": 50}, max_minutes=1e-6)
    manifest = run(cfg, tmp_path / "t" / "1", plots=False, progress=False, log=lines.append)
    training = manifest["training"]
    assert training["time_limited"] is True and training["epochs_run"] == 1
    assert "TIME LIMIT" in training["stopped_because"]
    assert any(line.startswith("WARNING: --max-minutes") for line in lines)


def test_metrics_log_has_no_clock(version_dir):
    rows = [json.loads(line) for line in (version_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("seconds" not in r for r in rows)
    assert {"val_loss_raw", "val_loss_ema", "steps"} <= set(rows[0])


def test_progress_bar_total_is_the_epoch_cap(capsys):
    data = prepare("digits")
    cfg = TrainConfig(**{**SMALL, "epochs": 3}).resolve(data.levels, len(data.train))
    train(cfg, data, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "/1875" not in err


@pytest.mark.parametrize("levels", [17, 256])
def test_pixels_that_never_vary_do_not_break_training(levels):
    """All-black images plus one bright one: no NaN from the edge bins or the input scaling."""
    rng = np.random.default_rng(0)
    imgs = np.zeros((30, 4, 4), dtype=np.uint8)
    imgs[::7] = rng.integers(0, levels, (5, 4, 4))
    from training.data import ImageData

    data = ImageData(imgs[:20], imgs[20:25], imgs[25:], levels, "synthetic")
    cfg = TrainConfig(hidden=8, latent_dim=2, components=2, epochs=3).resolve(levels, 20)
    assert np.isfinite(train(cfg, data, progress=False).best_val_loss)
