"""The default model ships in the repository (models/digits/1: graphs, weights, manifest, plots), so the
serving image and `make run` serve without torch and without training. `make model` regenerates it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.helpers import REPO

SHIPPED = REPO / "models" / "digits" / "1"


@pytest.fixture(scope="module")
def manifest() -> dict:
    path = SHIPPED / "manifest.json"
    assert path.is_file(), f"{path.relative_to(REPO)} is missing: the default model ships with the repository"
    return json.loads(path.read_text())


def test_every_shipped_file_matches_its_sha256(manifest: dict) -> None:
    """The shipped version verifies as the service verifies it: digest, schema, every file's sha256."""
    from vae_contract.manifest import read_manifest, verify_files

    checked, _ = read_manifest(SHIPPED)
    verify_files(SHIPPED, checked)
    present = {p.name for p in SHIPPED.iterdir() if p.is_file()} - {"manifest.json", "manifest.json.sha256"}
    assert present <= checked["files"].keys(), (
        f"files the manifest does not vouch for: {sorted(present - checked['files'].keys())}"
    )


def test_the_manifest_format_is_the_current_one(manifest: dict) -> None:
    contract = (REPO / "models" / "README.md").read_text()
    current = re.search(r"manifest\.json \(format_version (\d+)\)", contract)
    assert current, "models/README.md names the current format_version"
    assert manifest["format_version"] == int(current.group(1))
    assert (manifest["name"], manifest["version"]) == ("digits", 1)


def test_the_readme_quotes_the_shipped_models_figures(manifest: dict) -> None:
    readme = (REPO / "README.md").read_text()
    metrics = manifest["metrics"]
    for key in ("nll", "neg_elbo"):
        figure = f"{metrics[key]['nats']:.2f}"
        assert figure in readme, f"README.md does not quote the shipped model's test {key}: {figure} nats"


def test_no_checkpoint_is_tracked_by_git() -> None:
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "--", "models"], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    assert not [p for p in tracked if Path(p).suffix in (".pt", ".pth", ".ckpt")]
