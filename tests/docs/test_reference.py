"""The docs' reference pages come from the code (scripts/docs_reference.py, run by MkDocs as a hook):
change an option, a setting or a route, and the page changes with it."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
from pydantic import Field

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ref():
    spec = importlib.util.spec_from_file_location("docs_reference", REPO / "scripts" / "docs_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_reference"] = module
    spec.loader.exec_module(module)
    return module


def test_a_new_setting_appears_on_the_settings_page(ref) -> None:
    class More(Settings):
        frobnicate_s: float = Field(2.5, ge=0, description="how long to frobnicate")

    before, after = ref.settings_page(Settings), ref.settings_page(More)
    assert "VAE_FROBNICATE_S" not in before
    assert "| `VAE_FROBNICATE_S` | float | `2.5` | how long to frobnicate (>= 0) |" in after
    for name, field in Settings.model_fields.items():  # every real field, with its own description
        assert f"`VAE_{name.upper()}`" in before and ref.cell(field.description or "")[:30] in before


def test_a_new_option_appears_on_the_cli_page(ref) -> None:
    from service.cli import build_parser

    parser = build_parser()
    before = ref.cli_page([("vae-serve", "service.cli:main", parser)])
    assert "--models MODELS" in before and "--engine" in before
    parser.add_argument("--frobnicate", type=int, default=3, help="frobnicate N times (default: %(default)s)")
    after = ref.cli_page([("vae-serve", "service.cli:main", parser)])
    assert "--frobnicate" not in before
    assert "| `--frobnicate FROBNICATE` | frobnicate N times (default: 3) |" in after


def test_every_entry_point_has_its_parser(ref) -> None:
    points = ref.entry_points()
    assert {"vae-train", "vae-serve"} <= set(points)
    for name, target in points.items():
        parser = ref.parser_of(target)
        assert isinstance(parser, argparse.ArgumentParser), name
        assert len(parser._actions) > 1, name


def test_the_http_page_lists_every_route_of_the_schema(ref) -> None:
    from service.main import create_app

    schema = create_app(Settings(models_dir=REPO / "models")).openapi()
    page = ref.openapi_page(schema)
    for path, item in schema["paths"].items():
        for method in item:
            assert f"### `{method.upper()} {path}`" in page
    assert "### ScoreRequest" in page and "`num_samples`" in page
    schema["paths"]["/frobnicate"] = {"post": {"summary": "Frobnicate", "tags": ["inference"], "responses": {}}}
    assert "### `POST /frobnicate`" in ref.openapi_page(schema)


def test_the_site_builds_strict_and_offline(tmp_path: Path) -> None:
    """`mkdocs build --strict` (what `make docs` runs): the generated pages are in it, and the pages load no
    script, style sheet, font or image from elsewhere."""
    import re
    import subprocess

    site = tmp_path / "site"
    env = {"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for page in ("reference/http-api", "reference/cli", "reference/settings", "reference/model-contract"):
        assert (site / page / "index.html").is_file(), page
    assert "VAE_MAX_K" in (site / "reference" / "settings" / "index.html").read_text()
    assert "format_version" in (site / "reference" / "model-contract" / "index.html").read_text()
    for html in site.rglob("*.html"):
        text = html.read_text()
        assert not re.search(r"<(script|img|link)[^>]+(src|href)=\"(https?:)?//", text), html
