"""Shared fixtures: a small digits model trained, evaluated and exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = dict(
    hidden=64,
    latent_dim=8,
    epochs=80,
    patience=10,
    eval_k=100,
    seed=0,
    components=4,
    iw_train=2,
    ema=0.99,
    dropout=0.0,
)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding digits/1, trained for real on the built-in digits."""
    from training.config import TrainConfig
    from training.pipeline import run

    root = tmp_path_factory.mktemp("models")
    cfg = TrainConfig.from_dict({**TINY, "dataset": "digits"})
    run(cfg, root / "digits" / "1", plots=False, progress=False, log=lambda *_: None)
    return root


@pytest.fixture(scope="session")
def version_dir(models_dir: Path) -> Path:
    return models_dir / "digits" / "1"
