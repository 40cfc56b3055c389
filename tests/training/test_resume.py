"""Resumable training: checkpoints every N steps and at SIGTERM/SIGINT; a resumed run is the uninterrupted one.

Interruptions are made at deterministic steps by the run's own `on_step` hook sending the process a real
signal (the handler `vae-train` installs turns it into "finish the step, write the checkpoint, stop"); one
test sends SIGTERM to a `vae-train` subprocess, as a cloud machine's pre-emption would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.config import ConfigError, TrainConfig
from training.export import ExportError
from training.pipeline import run, work_dir
from training.train import CHECKPOINT_FILE, TrainingInterrupted

# dropout, the weight average, IWAE noise and a mixture prior: every random stream the loop has
SMALL = dict(hidden=32, latent_dim=4, components=3, epochs=5, patience=2, eval_k=20, iw_train=2, dropout=0.1, ema=0.99)
COMPARED = ("weights.bin", "encoder.onnx", "decoder.onnx", "log_weights.onnx", "checkpoint.json", "metrics.jsonl")
STEPS_PER_EPOCH = 16  # digits: 1000 training images, batch 64


def quiet(*_: object) -> None:
    pass


def interrupt_at(step: int, signum: int):
    def hook(done: int) -> None:
        if done == step:
            os.kill(os.getpid(), signum)

    return hook


def in_a_fresh_process(request: pytest.FixtureRequest, test_file: str = __file__) -> bool:
    """Run the calling test again in a new interpreter when this one has loaded OpenVINO (the service tests
    do); True when it did (the caller then returns). In such a process the interrupted-and-resumed run died
    of SIGSEGV (reproduced: tests/service/test_batch_score.py's first test, then this file's first test;
    not with onnxruntime alone, nor in vae-train's own process, which never loads OpenVINO), and so did the
    DataLoader-workers run of test_stream.py (its workers' SIGCHLD). Not understood yet; the test still runs
    in full, as vae-train runs, in a process of its own."""
    if "openvino" not in sys.modules or os.environ.get("VAE_TEST_FRESH_PROCESS"):
        return False
    env = {**os.environ, "VAE_TEST_FRESH_PROCESS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{test_file}::{request.node.name}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return True


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "d" / "1"
    run(TrainConfig(**SMALL), out, plots=False, progress=False, log=quiet)
    return out


def assert_same_model(a: Path, b: Path) -> None:
    for name in COMPARED:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_interrupted_twice_and_resumed_is_byte_identical(request, tmp_path_factory, tmp_path):
    """SIGINT mid-epoch, resume, SIGTERM at an epoch's last step, resume: the same weights, graphs and log
    (the interrupted run also wrote periodic checkpoints every 7 steps, the uninterrupted one none)."""
    if in_a_fresh_process(request):
        return
    uninterrupted = request.getfixturevalue("uninterrupted")
    cfg = TrainConfig(**SMALL)
    out = tmp_path / "d" / "1"
    ckpt = work_dir(out) / CHECKPOINT_FILE
    # the process's own handlers (Python's default_int_handler, or SIG_IGN where a shell started it in the background)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="SIGINT received: stopped after step 21") as info:
        run(
            cfg,
            out,
            plots=False,
            progress=False,
            log=quiet,
            checkpoint_every=7,
            on_step=interrupt_at(21, signal.SIGINT),
        )
    assert info.value.checkpoint == ckpt and ckpt.is_file() and not out.exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # the handlers are put back
    with pytest.raises(ExportError, match="add --resume"):  # not resumed: refused, nothing lost
        run(cfg, out, plots=False, progress=False, log=quiet)
    with pytest.raises(TrainingInterrupted, match="SIGTERM"):
        run(cfg, out, plots=False, progress=False, log=quiet, checkpoint_every=7, resume=True,
            on_step=interrupt_at(3 * STEPS_PER_EPOCH, signal.SIGTERM))  # fmt: skip
    lines: list[str] = []
    steps_run: list[int] = []
    manifest = run(cfg, out, plots=False, progress=False, log=lines.append, resume=True, on_step=steps_run.append)
    assert any("resuming from" in line and "step 48" in line for line in lines)
    assert steps_run[0] == 3 * STEPS_PER_EPOCH + 1 and manifest["training"]["resumed_from_step"] == 48
    assert_same_model(uninterrupted, out)
    assert not work_dir(out).exists()  # removed once the version is written


def test_a_failure_after_training_keeps_the_checkpoint_and_resume_skips_training(uninterrupted, tmp_path, monkeypatch):
    import training.pipeline as pipeline

    def broken(*args, **kwargs):
        raise ExportError("disk full (simulated)")

    lines: list[str] = []
    out = tmp_path / "d" / "1"
    with monkeypatch.context() as m:
        m.setattr(pipeline, "write_version", broken)
        with pytest.raises(ExportError, match="simulated"):
            run(TrainConfig(**SMALL), out, plots=False, progress=False, log=lines.append)
    assert (work_dir(out) / CHECKPOINT_FILE).is_file()
    assert any("--resume" in line for line in lines)  # the log says how to go on
    steps_run: list[int] = []
    run(TrainConfig(**SMALL), out, plots=False, progress=False, log=quiet, resume=True, on_step=steps_run.append)
    assert steps_run == []  # training had finished: only evaluation and export ran again
    assert_same_model(uninterrupted, out)


def test_resume_refuses_another_configuration(request, tmp_path):
    if in_a_fresh_process(request):  # it interrupts a run with a signal too
        return
    out = tmp_path / "d" / "1"
    with pytest.raises(TrainingInterrupted):
        run(TrainConfig(**SMALL), out, plots=False, progress=False, log=quiet, on_step=interrupt_at(3, signal.SIGTERM))
    with pytest.raises(ConfigError, match=r"another configuration \(hidden: 32 -> 16\)"):
        run(TrainConfig(**{**SMALL, "hidden": 16}), out, plots=False, progress=False, log=quiet, resume=True)


def test_sigterm_to_vae_train_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    """A pre-empted machine: SIGTERM to the process; exit 143, a checkpoint, and the --resume hint."""
    out = tmp_path / "d" / "1"
    ckpt = work_dir(out) / CHECKPOINT_FILE
    args = ["--dataset", "digits", "--hidden", "16", "--latent-dim", "2", "--epochs", "1000", "--patience", "1000"]
    args += ["--quiet", "--no-plots", "--checkpoint-every", "5", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "training.cli", *args], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ckpt.exists(), "no periodic checkpoint appeared"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted: SIGTERM received: stopped after step" in err and "--resume" in err
    state = torch.load(ckpt, weights_only=True)
    assert state["steps"] >= 5 and not state["finished"] and not out.exists()
