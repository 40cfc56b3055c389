"""Schemathesis, every check, against the live service: the OpenAPI schema says exactly what is accepted.

Bounded in time (deterministic generation, a fixed number of examples per operation and a time cap).
tests/service/schemathesis.toml lists the only statuses accepted for schema-valid requests beyond 2xx,
each with its reason (an uploaded image must decode; a V2 tensor's data must fit its shape).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.service.conftest import LiveServer

HERE = Path(__file__).parent


def test_schemathesis_all_checks_find_nothing(models_dir, tmp_path):
    # part of the dev extra that `make test` installs: missing, it fails rather than skips (CI must run it)
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert found, "schemathesis is not installed next to this Python: pip install -e '.[dev]'"
    exe = Path(found)
    with LiveServer(models_dir, api_keys="st-key") as server:
        run = subprocess.run(
            [
                str(exe),
                "--config-file",
                str(HERE / "schemathesis.toml"),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "all",
                "-H",
                "Authorization: Bearer st-key",
                "--max-examples",
                "20",
                "--generation-deterministic",
                "--max-time",
                "150",
                "--continue-on-failure",
                "--no-color",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
    summary = run.stdout[-3000:]
    assert run.returncode == 0, summary
    assert "Failures:" not in run.stdout, summary
    print(summary[-600:])  # the case count, shown with `pytest -s` or -rP
