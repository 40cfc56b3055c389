"""The Dockerfile, without a Docker engine: hadolint, the serving stage's configuration, the pinned dependency
sets it installs, the build context, and the serving stage's exact start command run here on a test model."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.helpers import REPO, dockerfile_stages, image_config, stage_chain, tool


def test_hadolint_finds_nothing() -> None:
    out = subprocess.run(
        [tool("hadolint"), "--no-fail", "--format", "json", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    findings = json.loads(out.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in serious)


def test_the_default_stage_serves_without_torch_as_a_non_root_user() -> None:
    stages = dockerfile_stages()
    names = [s.name for s in stages]
    assert "serve" in names and "train" in names, names
    chain = [s.name for s in stage_chain(stages)]
    assert "serve" in chain, f"the last stage must be the serving image, it derives from {chain}"
    assert "build-train" not in chain and "train" not in chain

    cfg = image_config()
    assert cfg.entrypoint[:1] == ["vae-serve"], cfg.entrypoint
    assert not any("--workers" in a for a in cfg.entrypoint + cfg.cmd), "one uvicorn worker per container"
    assert cfg.user and cfg.user.split(":")[0].isdigit() and int(cfg.user.split(":")[0]) != 0, cfg.user
    assert "8000" in cfg.exposed
    assert cfg.env["VAE_HOST"] == "0.0.0.0" and cfg.env["VAE_PORT"] == "8000"
    assert cfg.env["VAE_MODELS_DIR"] == "/models"
    assert cfg.healthcheck and "/readyz" in " ".join(cfg.healthcheck)
    assert cfg.healthcheck[0] == "python", "the slim image has no curl: the healthcheck uses python's urllib"

    # the serving venv is built from the serve lock only, and the models are baked in at /models
    serve_text = "\n".join(f"{i} {a}" for s in stages if s.name in ("build-serve", "serve") for i, a in s.instructions)
    assert "requirements/serve.txt" in serve_text and "train.txt" not in serve_text
    assert re.search(r"^COPY .*models/? /models/?$", serve_text, re.M), serve_text


def test_the_serving_build_trims_openvino_and_checks_what_is_left() -> None:
    """The serving venv loses OpenVINO's GPU/NPU plugins and other frontends; the same RUN must prove that the
    CPU plugin still compiles the ONNX graphs, and FAST_PATH=0 must leave openvino out altogether."""
    build = next(s for s in dockerfile_stages() if s.name == "build-serve")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in build.instructions if i == "ARG" and "=" in a}
    assert args.get("FAST_PATH") == "1", "the fast path is in the default image"
    [trim] = [a for i, a in build.instructions if i == "RUN" and "libopenvino_intel_cpu_plugin.so" in a]
    assert "-delete" in trim and "compile_model(" in trim and "'CPU'" in trim
    assert "OPTIMIZATION_CAPABILITIES" in trim
    installs = [a for i, a in build.instructions if i == "RUN" and "pip install --no-deps -r" in a]
    assert installs and "FAST_PATH" in installs[0] and "openvino" in installs[0]


def test_the_train_target_runs_vae_train_with_a_cpu_torch() -> None:
    cfg = image_config("train")
    assert cfg.entrypoint[:1] == ["vae-train"]
    assert cfg.user and cfg.user.split(":")[0] != "0"
    build = next(s for s in dockerfile_stages() if s.name == "build-train")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in build.instructions if i == "ARG" and "=" in a}
    assert args.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    assert any(i == "COPY" and a.startswith("--from=torch-wheels") for i, a in build.instructions)


def _locked(name: str) -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements" / name).read_text().splitlines():
        if line and not line.startswith("#"):
            pkg, _, version = line.partition("==")
            assert version, f"requirements/{name}: not an exact pin: {line}"
            pins[canonicalize_name(pkg)] = Version(version)
    return pins


@pytest.mark.parametrize("extra", ["serve", "train"])
def test_the_locks_pin_every_dependency_of_pyproject(extra: str) -> None:
    """Each requirement of pyproject.toml (base + extra) is pinned in requirements/<extra>.txt and satisfied.
    When this fails after a dependency change: `make lock`."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _locked(f"{extra}.txt")
    for spec in project["dependencies"] + project["optional-dependencies"][extra]:
        req = Requirement(spec)
        if req.marker and not req.marker.evaluate({"python_version": "3.11", "sys_platform": "linux"}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements/{extra}.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements/{extra}.txt pins {req.name}=={pins[name]}, pyproject wants {req.specifier}: run `make lock`"
        )
    if extra == "serve":
        assert "torch" not in pins
    else:
        assert str(pins["torch"]) == "2.13.0+cpu"
    build = _locked("build.txt")
    for spec in tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]:
        req = Requirement(spec)
        assert req.specifier.contains(build[canonicalize_name(req.name)])


def test_the_build_context_leaves_out_venvs_caches_checkpoints_and_git() -> None:
    patterns = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    }
    for needed in (".git", ".venv", "**/__pycache__", ".pytest_cache", ".ruff_cache", "**/*.pt", "build", "dist"):
        assert needed in patterns, f".dockerignore lacks {needed}"
    assert "bench/results*.json" in patterns
    for kept in ("models", "requirements", "service", "training", "pyproject.toml", "README.md"):
        assert kept not in patterns and f"{kept}/" not in patterns, f"{kept} is needed in the build context"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _image_argv(argv: list[str], bin_dir: Path) -> list[str]:
    """The image's PATH has the venv's bin first; here that is this interpreter's bin directory."""
    first = bin_dir / argv[0]
    if argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    return [str(first) if first.exists() else argv[0], *argv[1:]]


def test_the_serving_start_command_serves_a_model(models_dir: Path, tmp_path: Path) -> None:
    """ENTRYPOINT + CMD and ENV of the default stage, run outside a container: /readyz answers 200, and the
    image's HEALTHCHECK command fails before the server is up and passes once it is ready."""
    cfg = image_config()
    bin_dir = Path(sys.executable).parent
    port = _free_port()
    env = {**os.environ, **{k: v for k, v in cfg.env.items() if k != "PATH"}}
    # what a container run changes: the mounted models, a free port, and loopback only on this machine
    env.update(VAE_MODELS_DIR=str(models_dir), VAE_PORT=str(port), VAE_HOST="127.0.0.1")
    argv = _image_argv(cfg.entrypoint + cfg.cmd, bin_dir)
    assert cfg.healthcheck is not None
    health = _image_argv(cfg.healthcheck, bin_dir)
    assert subprocess.run(health, env=env, capture_output=True, timeout=30).returncode != 0

    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/readyz"
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            status = _status(url)
            if status == 200:
                break
            time.sleep(0.25)
        log.seek(0)
        assert status == 200, f"{argv} never got ready (last /readyz: {status}); log:\n{log.read()[-3000:]}"
        assert _status(f"http://127.0.0.1:{port}/healthz") == 200
        checked = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
