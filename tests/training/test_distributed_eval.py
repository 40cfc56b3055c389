"""Evaluation and calibration shared among `torchrun` processes give the numbers of one process.

Each process takes a contiguous slice of every batch and the same slice of the batch's noise, drawn whole as
one process draws it (as training does), so every image meets the same noise; the processes then gather
every image's values. What may differ is the floating-point work on a slice against the whole batch (the
matrix products' blocking follows the batch's size, measured at up to 4e-6 nats an image): both sides run
one thread, and the per-image values are compared to 1e-4 nats and the calibration's numbers to 1e-5
relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

# float32's rounding of a log-likelihood of ~150 nats is ~1e-5 nats; the two sides differ by a few of those
NATS_PER_IMAGE = 1e-4
NATS_PER_PIXEL = 1e-5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# A 2-layer ladder (so LLR>k is shared too) with random weights, and batches of 7 images over 101: the last
# batch (3 images) splits unevenly, 2 and 1.
SETUP = """
import numpy as np, torch
import training.evaluate
from training.config import TrainConfig
from training.data import prepare_config
from training.model import VAE

cfg = TrainConfig(hidden=32, latent_dim=4, latent_layers=2, components=3)
data = prepare_config(cfg)
resolved = cfg.resolve(data.levels, len(data.train), data.shape)
torch.manual_seed(0)
model = VAE(resolved, data.dim, data.levels, data.shape).eval()
training.evaluate.MAX_ELEMENTS = 7 * 20 * model.decoder.floats_per_sample  # read at each pass: batches of 7
assert training.evaluate.rows_per_pass(model) // 20 == 7
x = data.flat("val")[:101].astype(np.int64)
"""

WORK = """
from training.evaluate import evaluate
from training.ood import calibrate, image_statistics
stats = image_statistics(model, x, 20, seed=5, maps=True, procs=procs)
out = {
    "metrics": evaluate(model, torch.from_numpy(x), k=20, chunk=20, seed=1, procs=procs),
    "calibration": calibrate(model, x, k=20, seed=2, procs=procs),
    "nll_bpd": stats.nll_bpd.tolist(), "elbo_gap_bpd": stats.elbo_gap_bpd.tolist(),
    "llr_bpd": stats.llr_bpd.tolist(), "expected_nll": stats.expected_nll.tolist(),
}
"""


def close(a, b, rel: float, path: str = "") -> None:
    """Every number in a and b (nested dicts and lists) agrees to `rel` relative; everything else is equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            close(a[key], b[key], rel, f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            close(u, v, rel, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= rel * max(1.0, abs(a)), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
def test_two_processes_evaluate_and_calibrate_as_one(tmp_path, monkeypatch):
    setup = SETUP
    worker = tmp_path / "worker.py"
    worker.write_text(
        textwrap.dedent(f"""
        import json, sys
        from training.train import Distributed
        {textwrap.indent(setup, "        ").strip()}
        procs = Distributed.from_env()
        procs.init(torch.device("cpu"))
        {textwrap.indent(WORK, "        ").strip()}
        procs.close()
        json.dump(out, open(sys.argv[1] + f".{{procs.rank}}", "w"))
    """)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(TORCHRUN + [str(worker), str(tmp_path / "two")], capture_output=True, text=True, env=env,
                          timeout=300, cwd=os.getcwd())  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    two = [json.loads((tmp_path / f"two.{rank}").read_text()) for rank in (0, 1)]
    assert two[0] == two[1]  # every process holds every image's values

    import training.evaluate

    # the setup sets training.evaluate.MAX_ELEMENTS in this process too: put it back after the test (a later
    # test's batches, and so its noise, would otherwise change)
    monkeypatch.setattr(training.evaluate, "MAX_ELEMENTS", training.evaluate.MAX_ELEMENTS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scope: dict = {"procs": None}
        exec(setup + WORK, scope)
    finally:
        torch.set_num_threads(threads)
    one = json.loads(json.dumps(scope["out"]))
    for name in ("nll_bpd", "elbo_gap_bpd", "llr_bpd"):
        a, b = np.array(one[name]), np.array(two[0][name])
        assert a.shape == b.shape == (101,)
        print(f"{name}: max |1 process - 2 processes| = {np.abs(a - b).max():.2e} bits/dim")
        np.testing.assert_allclose(b, a, rtol=0, atol=NATS_PER_IMAGE / (64 * np.log(2)))
    a, b = np.array(one["expected_nll"]), np.array(two[0]["expected_nll"])
    print(f"expected_nll: max |1 process - 2 processes| = {np.abs(a - b).max():.2e} nats a pixel")
    np.testing.assert_allclose(b, a, rtol=0, atol=NATS_PER_PIXEL)
    close(one["metrics"], two[0]["metrics"], 1e-5)
    close(one["calibration"], two[0]["calibration"], 1e-5)
