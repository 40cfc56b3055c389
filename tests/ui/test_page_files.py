"""The web page's files without a browser: shipped as package data, served open, nothing from elsewhere."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

from fastapi.testclient import TestClient

from service.main import create_app
from service.routes.ui import ASSETS, UI_DIR
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_every_file_of_the_page_is_package_data() -> None:
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    files = sorted(p.relative_to(REPO / "service").as_posix() for p in UI_DIR.iterdir())
    assert files == sorted(["ui/index.html", *(f"ui/{name}" for name in ASSETS)])
    for f in files:
        assert any(fnmatch.fnmatch(f, g) for g in globs), f"service/{f} is not in [tool.setuptools.package-data]"


def test_the_page_loads_nothing_from_elsewhere() -> None:
    for path in UI_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"""(src|href)=["'](https?:)?//""", text), path
        assert not re.search(r"""(fetch\(|url\()\s*["'`](https?:)?//""", text), path
        assert "@import" not in text, path


def test_the_page_is_open_and_the_api_behind_it_is_not() -> None:
    app = create_app(Settings(models_dir=REPO / "models", api_keys="k1"))
    client = TestClient(app)  # no lifespan: the page needs no model
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, media in ASSETS.items():
        r = client.get(f"/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media)
        assert f'/ui/{name}"' in page.text  # the page loads it
    assert client.get("/ui/../service/settings.py").status_code == 404
    assert client.get("/ui/main.py").json()["error"]["status"] == 404
    assert client.get("/v1/models").status_code == 401
