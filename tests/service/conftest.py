from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

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

    return prepare("digits").test[..., 0]  # (447, 8, 8) uint8, levels 0..16: grey images as the API takes them


def png_b64(img: np.ndarray, levels: int = 17, mode: str = "L", fmt: str = "PNG") -> str:
    pixels = np.rint(img.astype(float) * 255 / (levels - 1)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def metric_value(text: str, name: str) -> float:
    """The value of an unlabelled metric in a /metrics page."""
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def error_of(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["status"] == status and err["message"]
    if code:
        assert err["code"] == code, err
    return err


class LiveServer:
    """The real app under uvicorn (with this service's protocol guards) on a free port, in a thread."""

    def __init__(self, models_dir: Path, **overrides):
        import socket
        import threading

        import uvicorn

        from service.server import uvicorn_config

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        settings = Settings(models_dir=models_dir, port=self.port, log_level="warning", intra_op_threads=1, **overrides)
        self.settings = settings
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn_config(self.app, settings))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("the live server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def live(models_dir: Path) -> Iterator[LiveServer]:
    with LiveServer(models_dir) as server:
        yield server
