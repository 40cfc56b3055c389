from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.settings import Settings


def make_client(models_dir: Path, **overrides) -> TestClient:
    return TestClient(create_app(Settings(models_dir=models_dir, intra_op_threads=1, **overrides)))


@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    with make_client(models_dir, max_batch=64, max_k=5000, max_body_bytes=256 * 1024) as c:
        yield c


@pytest.fixture(scope="session")
def test_images():
    from training.data import prepare

    return prepare("digits").test  # (447, 8, 8) uint8, levels 0..16
