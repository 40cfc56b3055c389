"""docker-compose.yml, checked by the Compose CLI itself (`config`, no engine needed) and read back as JSON."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.deploy.helpers import REPO, tool


def _compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # no engine is contacted by `config`; an unreachable DOCKER_HOST proves it
    # the file's own defaults, whatever this shell exports
    ours = (
        "API_PORT",
        "API_CPUS",
        "TRAIN_CPUS",
        "VAE_TAG",
        "VAE_LOG_LEVEL",
        "TORCH_INDEX_URL",
        "HOST_UID",
        "HOST_GID",
        "FAST_PATH",
        "MODELS_DIR",
    )
    full_env = {k: v for k, v in os.environ.items() if k not in ours}
    full_env.update(DOCKER_HOST="unix:///nonexistent/docker.sock", **(env or {}))
    return subprocess.run(
        [tool("docker-compose"), "--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml"), *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _config(*profiles: str, env: dict[str, str] | None = None) -> dict:
    flags = [f for p in profiles for f in ("--profile", p)]
    out = _compose(*flags, "config", "--format", "json", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("profiles", [(), ("train",)])
def test_compose_accepts_the_file(profiles: tuple[str, ...]) -> None:
    flags = [f for p in profiles for f in ("--profile", p)]
    out = _compose(*flags, "config", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "warn" not in out.stderr.lower(), out.stderr


def test_the_api_service() -> None:
    services = _config()["services"]
    assert set(services) == {"api"}, "train runs only under its profile"
    api = services["api"]
    assert api["build"]["target"] == "serve"
    assert api["ports"] == [{"mode": "ingress", "target": 8000, "published": "8000", "protocol": "tcp"}]
    [models] = [v for v in api["volumes"] if v["target"] == "/models"]
    assert models["type"] == "bind" and models["read_only"] is True
    assert models["source"] == str(REPO / "models")
    assert api["restart"] == "unless-stopped"
    health = api["healthcheck"]
    assert "/readyz" in " ".join(health["test"]) and "start_period" in health
    limits = api["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0 and int(limits["memory"]) > 0
    env = api["environment"]
    assert env["VAE_MODELS_DIR"] == "/models" and env["VAE_HOST"] == "0.0.0.0" and env["VAE_PORT"] == "8000"
    assert env["VAE_INTRA_OP_THREADS"] == str(int(float(limits["cpus"]))), "threads = the CPU limit"
    assert "container_name" not in api, "a fixed container name forbids --scale"
    assert api["read_only"] is True and api["cap_drop"] == ["ALL"]


def test_the_api_image_has_the_fast_path_unless_told_otherwise() -> None:
    assert _config()["services"]["api"]["build"]["args"]["FAST_PATH"] == "1"
    assert _config(env={"FAST_PATH": "0"})["services"]["api"]["build"]["args"]["FAST_PATH"] == "0"


def test_several_api_replicas_take_a_port_range() -> None:
    api = _config(env={"API_PORT": "8000-8002"})["services"]["api"]
    assert api["ports"][0]["published"] == "8000-8002" and api["ports"][0]["target"] == 8000


def test_the_train_service() -> None:
    services = _config("train")["services"]
    train = services["train"]
    assert train["profiles"] == ["train"]
    assert train["build"]["target"] == "train"
    assert train["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    [models] = [v for v in train["volumes"] if v["target"] == "/models"]
    assert models["source"] == str(REPO / "models") and not models.get("read_only")
    # an empty TORCH_INDEX_URL (wheels from requirements/wheels/) reaches the build as empty
    offline = _config("train", env={"TORCH_INDEX_URL": ""})["services"]["train"]
    assert offline["build"]["args"]["TORCH_INDEX_URL"] == ""


def test_models_dir_moves_the_model_repository_of_both_services(tmp_path) -> None:
    services = _config("train", env={"MODELS_DIR": str(tmp_path)})["services"]
    for name in ("api", "train"):
        [models] = [v for v in services[name]["volumes"] if v["target"] == "/models"]
        assert models["source"] == str(tmp_path), name
    [api_models] = [v for v in services["api"]["volumes"] if v["target"] == "/models"]
    assert api_models["read_only"] is True
