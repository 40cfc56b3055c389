"""vae-train end to end on each kind of source (tiny settings: these prove the plumbing, not quality)."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.training.test_data import write_idx
from training.cli import build_parser, main, resolve_config
from training.config import TrainConfig

FAST = ["--epochs", "3", "--hidden", "16", "--latent-dim", "2", "--eval-k", "10", "--quiet", "--no-plots"]


def synthetic(n=60, h=6, w=6, seed=0):
    rng = np.random.default_rng(seed)
    base = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n):
        r = rng.integers(0, h - 2)
        base[i, r : r + 2, :] = 200 + rng.integers(0, 50)
    return base


def run_ok(args, out):
    assert main(args + ["--out", str(out)] + FAST) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export_check"]["max_abs_diff_log_likelihood_nats"] <= 1e-3
    assert np.isfinite(manifest["metrics"]["nll"]["nats"])
    return manifest


def test_idx_source_end_to_end(tmp_path):
    write_idx(tmp_path / "img.idx.gz", synthetic(), compress=True)
    m = run_ok(["--dataset", f"idx:{tmp_path / 'img.idx.gz'}", "--levels", "16"], tmp_path / "models" / "idx" / "1")
    assert m["image"] == {
        "height": 6,
        "width": 6,
        "channels": 1,
        "dim": 36,
        "levels": 16,
        "preprocessing": {"mode": "L", "resize": None, "resample": None, "convert": None},
    }
    assert m["likelihood"] == "logistic_mixture"  # auto: more than 3 levels


def test_8bit_folder_trains_with_the_defaults(tmp_path):
    """256 grey levels: auto picks the logistic mixture, inputs are scaled to [0, 1], nothing blows up."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(synthetic(40, 10, 10)):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    m = run_ok(["--dataset", f"folder:{folder}"], tmp_path / "models" / "png" / "1")
    assert m["likelihood"] == "logistic_mixture" and m["image"]["levels"] == 256
    assert m["training"]["config"]["input_scale"] == "unit"
    assert m["metrics"]["nll"]["bits_per_dim"] < 8.0  # better than uniform after 3 epochs
    # the rows context is the 8-bit default, in the manifest and in the graphs the service runs
    context = m["decoder"]["context"]
    assert m["training"]["config"]["context"] == "rows" and context["kind"] == "rows" and len(context["taps"]) == 4
    from fastapi.testclient import TestClient

    from service.main import create_app
    from service.settings import Settings

    images = [np.asarray(Image.open(folder / "000.png")).reshape(-1).tolist()]
    with TestClient(create_app(Settings(models_dir=tmp_path / "models", intra_op_threads=1))) as client:
        assert client.get("/v1/models").json()["models"][0]["details"]["1"]["context"] == "rows"
        scored = client.post("/score", json={"model": "png", "images": images, "num_samples": 100, "seed": 3})
        assert scored.status_code == 200, scored.text
        assert 0.0 < scored.json()["results"][0]["nll_bits_per_dim"] < 8.0
        decoded = client.post("/sample", json={"model": "png", "n": 2, "seed": 1}, headers={"accept": "image/png"})
        assert decoded.status_code == 200 and decoded.headers["content-type"] == "image/png"


def test_png_folder_binary(tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(synthetic(40, 10, 10)):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    m = run_ok(
        ["--dataset", f"folder:{folder}", "--image-size", "5", "5", "--levels", "2"], tmp_path / "models" / "png" / "1"
    )
    assert m["likelihood"] == "bernoulli" and m["image"]["levels"] == 2 and m["image"]["dim"] == 25


def test_npz_source_end_to_end_with_vamp_and_iwae(tmp_path):
    imgs = synthetic() // 32
    np.savez(tmp_path / "d.npz", train=imgs[:40], val=imgs[40:50], test=imgs[50:], levels=8)
    m = run_ok(
        [
            "--dataset",
            f"npz:{tmp_path / 'd.npz'}",
            "--prior",
            "vamp",
            "--components",
            "3",
            "--iw-train",
            "3",
            "--warmup",
            "2",
            "--beta",
            "0.5",
        ],
        tmp_path / "models" / "npz" / "1",
    )
    assert m["prior"]["kind"] == "vamp" and m["prior"]["components"] == 3 and m["data"]["split"]["kind"] == "fixed"


def test_refuses_to_overwrite_and_reports_bad_data(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", images=synthetic())
    out = tmp_path / "models" / "d" / "1"
    run_ok(["--dataset", f"npz:{tmp_path / 'd.npz'}"], out)
    assert main(["--dataset", f"npz:{tmp_path / 'd.npz'}", "--out", str(out)] + FAST) == 2
    assert "already holds a model version" in capsys.readouterr().err
    assert main(["--dataset", f"npy:{tmp_path / 'missing.npy'}", "--out", str(tmp_path / "x" / "1")] + FAST) == 2
    assert "no such file" in capsys.readouterr().err


def test_enormous_model_is_refused_before_training(tmp_path, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(10):
        Image.fromarray(np.full((28, 28), i * 20, dtype=np.uint8)).save(folder / f"{i}.png")
    # the mlp: 28x28 images would get the conv networks by default, whose per-level logits are a 1x1 convolution
    args = ["--dataset", f"folder:{folder}", "--likelihood", "categorical", "--out", str(tmp_path / "m" / "1")]
    assert main(args + ["--arch", "mlp", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "103.9 M parameters = 416 MB" in err and "logistic_mixture" in err
    assert not (tmp_path / "m").exists()


def test_config_file_and_flags_layer(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"hidden": 32, "prior": "mog"}))
    args = build_parser().parse_args(["--preset", "seed", "--config", str(tmp_path / "c.json"), "--hidden", "48"])
    cfg = resolve_config(args)
    assert (cfg.hidden, cfg.prior, cfg.input_scale) == (48, "mog", "raw")  # flag > file > preset


def test_every_config_field_is_a_flag_with_its_real_default(capsys):
    with pytest.raises(SystemExit):
        main(["-h"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = TrainConfig()
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text, name
    assert f"(default: {defaults.hidden})" in text and f"(default: {defaults.ema})" in text
    assert "max_minutes" not in text  # flags are spelled with dashes
    assert resolve_config(build_parser().parse_args([])) == defaults


def test_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse refuses an unknown choice
        main(["--prior", "flow"])
    assert exc.value.code == 2
    assert main(["--out", str(tmp_path / "a" / "1")] + FAST + ["--latent-dim", "0"]) == 2
    assert "latent_dim must be a positive integer" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "a" / "one")] + FAST) == 2
    assert "integer version" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "a" / "01")] + FAST) == 2
