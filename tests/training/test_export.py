import json
import shutil

import numpy as np
import pytest
import torch

from training.config import TrainConfig
from training.export import (
    ExportError,
    export_graphs,
    export_ready,
    load_checkpoint,
    read_verified,
    reexport,
    reexport_main,
    share_weights,
    verify,
    write_version,
)
from training.model import VAE
from vae_contract.manifest import write_manifest


def small_model(levels: int = 17, **kw) -> VAE:
    torch.manual_seed(0)
    cfg = TrainConfig(hidden=16, latent_dim=3, **kw).resolve(levels, 100)
    return VAE(cfg, dim=64, levels=levels, shape=(8, 8)).eval()


def test_version_dir_is_complete_and_verified(version_dir):
    manifest = read_verified(version_dir)
    assert set(manifest["files"]) >= {
        "encoder.onnx",
        "decoder.onnx",
        "log_weights.onnx",
        "weights.bin",
        "checkpoint.json",
    }
    assert manifest["format_version"] == 3
    assert manifest["image"] == {
        "height": 8,
        "width": 8,
        "channels": 1,
        "dim": 64,
        "levels": 17,
        "preprocessing": {"mode": "L", "resize": None, "resample": None, "convert": None},
    }
    assert manifest["metrics"]["nll"]["K"] == 100 and manifest["metrics"]["neg_elbo"]["K"] == 1
    check = manifest["export_check"]
    assert check["max_abs_diff_log_likelihood_nats"] <= check["tolerance_nats"]
    assert 1e-3 < check["tolerance_nats"] < 1e-3 + 2e-6 * 500  # 1e-3 nats + 2e-6 of an 8x8 digit's |log p|
    assert check["prior_as_matmul"] is True  # a trained digits prior is far from fp32 cancellation
    prior = manifest["prior"]
    assert np.isclose(np.exp(prior["log_weights"]).sum(), 1.0)
    assert np.array(prior["means"]).shape == (prior["components"], manifest["latent_dim"])
    assert manifest["training"]["weights"] in ("ema", "raw") and manifest["training"]["time_limited"] is False
    assert len(manifest["check"]["images"]) == len(manifest["check"]["log_likelihood_nats"]) == 32


def test_graphs_share_one_weights_file(version_dir):
    """Each distinct tensor is stored once: the version holds about one copy of the model's weights."""
    manifest = read_verified(version_dir)
    params = manifest["weights"]["parameters"]
    size = (version_dir / "weights.bin").stat().st_size
    assert 4 * params <= size < 4 * params * 1.1 + 64 * 1024
    import onnx

    for spec in manifest["graphs"].values():  # the graphs keep only small tensors inline
        graph = onnx.load(str(version_dir / spec["file"]), load_external_data=False)
        for init in graph.graph.initializer:
            external = init.data_location == onnx.TensorProto.EXTERNAL
            assert external or len(init.raw_data) < 1024, init.name
            if external:
                assert {e.key: e.value for e in init.external_data}["location"] == "weights.bin"


def test_checkpoint_rebuilds_the_model(version_dir):
    model = load_checkpoint(version_dir)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert model.cfg.to_dict() == manifest["training"]["config"]
    x = torch.from_numpy(np.array(manifest["check"]["images"][:4]))
    mu, _ = model.encoder(x)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(version_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], mu.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("levels,likelihood", [(17, "categorical"), (256, "logistic_mixture"), (2, "bernoulli")])
def test_parity_holds_and_a_drift_is_caught(tmp_path, levels, likelihood):
    frozen = export_ready(small_model(levels, likelihood=likelihood))
    export_graphs(frozen, tmp_path)
    share_weights(tmp_path, ["encoder.onnx", "decoder.onnx", "log_weights.onnx"], {})
    x = np.random.default_rng(0).integers(0, levels, (8, 64))
    x[0] = 0
    x[1] = levels - 1  # the edge bins
    assert verify(frozen, tmp_path, x)["max_abs_diff_log_likelihood_nats"] < 1e-3
    with torch.no_grad():  # the graphs on disk no longer match the torch model
        frozen.decoder.net[-1].bias.add_(0.05 * torch.randn_like(frozen.decoder.net[-1].bias))
    with pytest.raises(ExportError, match="parity failed"):
        verify(frozen, tmp_path, x)


def test_the_rows_context_is_in_the_exported_graphs(tmp_path):
    """A 256-level model gets the rows context by default; its weights are in the scoring graph (a drift in
    them alone is caught) and its decoder graph is the mean rollout."""
    frozen = export_ready(small_model(256))
    assert frozen.decoder.context
    with torch.no_grad():
        frozen.decoder.context_weights.normal_(0.0, 1.0)
    export_graphs(frozen, tmp_path)
    share_weights(tmp_path, ["encoder.onnx", "decoder.onnx", "log_weights.onnx"], {})
    x = np.random.default_rng(0).integers(0, 256, (8, 64))
    report = verify(frozen, tmp_path, x)
    assert report["max_abs_diff_log_likelihood_nats"] < 1e-3 and report["max_abs_diff_decoder_probs"] < 1e-4
    with torch.no_grad():
        frozen.decoder.context_weights.add_(0.05)
    with pytest.raises(ExportError, match="parity failed"):
        verify(frozen, tmp_path, x)


def test_parity_holds_in_the_logistic_tails(tmp_path):
    """Extreme means and scales: every bin probability stays finite on onnxruntime, as in torch."""
    model = small_model(17, likelihood="logistic_mixture")
    with torch.no_grad():
        model.decoder.net[-1].weight.mul_(20.0)  # log-likelihoods near -1000 nats, components far in the tails
        model.decoder.net[-1].bias.mul_(20.0)
    frozen = export_ready(model)
    export_graphs(frozen, tmp_path)
    share_weights(tmp_path, ["encoder.onnx", "decoder.onnx", "log_weights.onnx"], {})
    x = np.random.default_rng(1).integers(0, 17, (32, 64))
    assert verify(frozen, tmp_path, x)["max_abs_diff_log_likelihood_nats"] < 1e-3


def test_write_version_refuses_on_parity_failure(tmp_path, monkeypatch):
    import training.export as export

    model = small_model()
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


@pytest.mark.parametrize("victim", ["decoder.onnx", "weights.bin"])
def test_tampered_file_is_detected(version_dir, tmp_path, victim):
    copy = tmp_path / "digits" / "1"
    shutil.copytree(version_dir, copy)
    data = bytearray((copy / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / victim).write_bytes(bytes(data))
    with pytest.raises(ExportError, match=f"{victim}.*sha256"):
        read_verified(copy)


def test_edited_manifest_is_detected(version_dir, tmp_path):
    copy = tmp_path / "digits" / "1"
    shutil.copytree(version_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["calibration"]["scores"]["combined"]["quantiles"]["values"] = [
        v + 1000 for v in manifest["calibration"]["scores"]["combined"]["quantiles"]["values"]
    ]
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with pytest.raises(ExportError, match="manifest was modified"):
        read_verified(copy)


@pytest.mark.parametrize("likelihood,levels", [("logistic_mixture", 17), ("categorical", 17), ("bernoulli", 2)])
def test_the_scoring_graph_names_its_low_precision_span(tmp_path, likelihood, levels):
    """decoder_hidden is the decoder's first activation, decoder_features its output layer's result; cut
    there into three graphs (as the service's bf16 path does) and run in fp32, they compute the whole."""
    import onnx
    import onnxruntime as ort

    from service.engine import _split_at_span

    frozen = export_ready(small_model(levels, likelihood=likelihood))
    spec = export_graphs(frozen, tmp_path)["log_weights"]
    share_weights(tmp_path, ["encoder.onnx", "decoder.onnx", "log_weights.onnx"], {})
    assert spec["low_precision_span"] == {"input": "decoder_hidden", "output": "decoder_features"}
    graph = onnx.load(str(tmp_path / "log_weights.onnx"))
    made_by = {out: node for node in graph.graph.node for out in node.output}
    assert made_by["decoder_hidden"].op_type == "LeakyRelu"
    assert made_by["decoder_features"].op_type == "Gemm"
    assert "vae.decoder.net.0.weight" in made_by[made_by["decoder_hidden"].input[0]].input
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    head, span, tail = (
        core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        for m in _split_at_span(core, tmp_path / "log_weights.onnx", "decoder_hidden", "decoder_features")
    )
    rng = np.random.default_rng(0)
    x = rng.integers(0, levels, (5, 64))
    eps = rng.standard_normal((7, 5, 3)).astype(np.float32)
    whole = ort.InferenceSession(str(tmp_path / "log_weights.onnx")).run(None, {"x": x, "eps": eps})[0]
    hidden = head([x, eps])[0]
    assert hidden.shape == (35, 16)
    cut = tail([x, eps, span([hidden])[0]])[0]
    np.testing.assert_allclose(cut, whole, rtol=1e-5, atol=1e-4)


def test_reexport_rewrites_the_graphs_and_keeps_the_records(version_dir, tmp_path):
    """vae-export: the same model, graphs from this exporter, every record and extra file carried over."""
    before = read_verified(version_dir)
    out = tmp_path / "digits" / "3"
    assert reexport_main([str(version_dir), "--out", str(out)]) == 0
    after = read_verified(out)
    assert (after["name"], after["version"]) == ("digits", 3)
    for key in ("metrics", "calibration", "training", "data", "prior", "image", "likelihood", "latent_dim"):
        assert after[key] == before[key], key
    assert set(after["files"]) == set(before["files"])
    for fname in set(before["files"]) - {"log_weights.onnx", "encoder.onnx", "decoder.onnx", "weights.bin"}:
        if fname != "checkpoint.json":
            assert after["files"][fname] == before["files"][fname], fname
    np.testing.assert_allclose(
        after["check"]["log_likelihood_nats"], before["check"]["log_likelihood_nats"], rtol=0, atol=1e-3
    )
    assert after["export_check"]["max_abs_diff_log_likelihood_nats"] < 1e-3
    # in place: the same version directory, verified afterwards
    copy = tmp_path / "inplace" / "digits" / "1"
    shutil.copytree(version_dir, copy)
    reexport(copy)
    assert read_verified(copy)["metrics"] == before["metrics"]
    # an existing other directory is not overwritten without --force
    assert reexport_main([str(version_dir), "--out", str(out)]) == 1
    assert reexport_main([str(version_dir), "--out", str(out), "--force"]) == 0


def test_recalibrate_gives_an_older_version_the_scores_added_since(version_dir, tmp_path):
    """vae-export --recalibrate: a version calibrated before elbo_gap and dose gains them, on the same
    validation images, K and seed, so the result is the very calibration training writes today."""
    manifest = read_verified(version_dir)
    cal = manifest["calibration"]
    assert {"elbo_gap", "dose"} <= set(cal["scores"]) and cal["scores"]["dose"]["parts"] == [
        "nll_bpd",
        "complexity",
        "elbo_gap",
    ]
    stale = {name: block for name, block in cal["scores"].items() if name not in ("elbo_gap", "dose")}
    old = tmp_path / "old" / "digits" / "1"
    shutil.copytree(version_dir, old)
    write_manifest(old, {**manifest, "calibration": {**cal, "scores": stale}})
    out = tmp_path / "new" / "digits" / "1"
    assert reexport_main([str(old), "--out", str(out)]) == 0
    assert read_verified(out)["calibration"]["scores"] == stale  # without --recalibrate the block carries over
    assert reexport_main([str(old), "--out", str(out), "--force", "--recalibrate"]) == 0
    assert read_verified(out)["calibration"] == cal


def test_reexport_refuses_what_is_not_a_verified_version(version_dir, tmp_path, capsys):
    broken = tmp_path / "digits" / "1"
    shutil.copytree(version_dir, broken)
    (broken / "manifest.json").write_text("{}")
    assert reexport_main([str(broken)]) == 1
    assert "vae-export:" in capsys.readouterr().err


def test_a_version_written_before_the_rows_context_still_loads(tmp_path):
    """Checkpoints written before the rows context have no "context" in their config and no image_shape
    (the shipped digits version was one until its re-export): the shipped weights, in that older form."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "models" / "digits" / "1"
    version = tmp_path / "digits" / "1"
    version.mkdir(parents=True)
    ckpt = json.loads((shipped / "checkpoint.json").read_text())
    ckpt["config"].pop("context", None)
    ckpt.pop("image_shape", None)
    (version / "checkpoint.json").write_text(json.dumps(ckpt))
    shutil.copy(shipped / ckpt["weights"], version / ckpt["weights"])
    model = load_checkpoint(version)
    assert model.cfg.context == "none" and not model.decoder.context
    reference = load_checkpoint(shipped)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_a_pixel_graph_that_differs_from_the_model_is_refused(tmp_path, monkeypatch):
    """The pixel graph is held to the torch model's per-pixel NLLs on their own: a graph whose pixels are
    shuffled among themselves keeps every log weight (the sum) and still fails."""
    frozen = export_ready(small_model(256))
    export_graphs(frozen, tmp_path)
    x = np.random.default_rng(0).integers(0, 256, (8, 64))
    report = verify(frozen, tmp_path, x)
    assert 0 <= report["max_abs_diff_pixel_nll_nats"] < 1e-3
    original = frozen.pixel_terms

    def shuffled(xb, eps):
        log_w, pixels = original(xb, eps)
        return log_w, pixels.flip(-1)  # the same sum, the pixels in the wrong places

    monkeypatch.setattr(frozen, "pixel_terms", shuffled)
    with pytest.raises(ExportError, match="pixel_log_weights"):
        verify(frozen, tmp_path, x)
