"""Schemathesis, every check, against the live service: the OpenAPI schema says exactly what is accepted.

Two runs: one with deterministic generation (the same cases every time) and one with a fresh random seed
(printed, and named in any failure, so `--seed N` reproduces it). schemathesis.toml at the repository's
root lists the only statuses accepted for schema-valid requests beyond 2xx, each with its reason (an image
must decode; a V2 tensor must fit its shape and model), and schemathesis_hooks.py checks that each such
refusal is one of those reasons, not a refusal of the request's form.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import LiveServer

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def st_server(models_dir):
    with LiveServer(models_dir, api_keys="st-key") as server:
        yield server


def run_schemathesis(server: LiveServer, tmp_path: Path, *generation: str) -> subprocess.CompletedProcess:
    # part of the dev extra that `make test` installs: missing, it fails rather than skips (CI must run it)
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert found, "schemathesis is not installed next to this Python: pip install -e '.[dev]'"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HERE / "schemathesis_hooks.py")}
    return subprocess.run(
        [
            found,
            "--config-file",
            str(ROOT / "schemathesis.toml"),
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "all",
            "-H",
            "Authorization: Bearer st-key",
            "--max-examples",
            "20",
            *generation,
            "--max-time",
            "75",  # the two runs together take what one took before (CI has 2 cores)
            "--continue-on-failure",
            "--no-color",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )


def assert_clean(run: subprocess.CompletedProcess, label: str) -> None:
    summary = run.stdout[-4000:]
    assert run.returncode == 0, f"{label}\n{summary}"
    assert "Failures:" not in run.stdout, f"{label}\n{summary}"
    assert "refusals_are_documented" in run.stdout or "Test cases:" in run.stdout, summary
    print(label, summary[-600:])  # the case count, shown with `pytest -s` or -rP


def test_schemathesis_all_checks_find_nothing_deterministic(st_server, tmp_path):
    assert_clean(run_schemathesis(st_server, tmp_path, "--generation-deterministic"), "deterministic generation")


def test_schemathesis_all_checks_find_nothing_random_seed(st_server, tmp_path):
    seed = random.SystemRandom().randrange(2**31)
    print(f"schemathesis seed: {seed} (reproduce: schemathesis run ... --seed {seed})")
    assert_clean(run_schemathesis(st_server, tmp_path, "--seed", str(seed)), f"schemathesis --seed {seed}")
