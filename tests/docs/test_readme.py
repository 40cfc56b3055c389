"""Every command in the README is exercised, so the README cannot rot.

The README's bash blocks are extracted and each command is matched to how it is exercised:
- run here, in README order, in a scratch directory holding a copy of the shipped model, with two kinds of
  change only: the port (a free one instead of 8000) and, for the one training command, flags that shorten
  training (fewer steps and evaluation images; the command and its data are the README's own);
- `make test`: it is the command that runs this suite (`.ci/run`), and `make docs` is part of it;
- the Docker commands: `make docker-test` (scripts/docker_test.sh) runs them against a Docker engine.
A README command that matches none of these fails the test: add it here when you add it there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
FAST_TRAINING = "--max-steps 60 --eval-k 50 --eval-images 30 --calibration-images 60 --no-plots --quiet"

RUN_HERE = "run here"
MAKE_TEST = "make test"
DOCKER_TEST = "make docker-test"
COVERAGE = [  # (pattern, how the command is exercised)
    (r"make test", MAKE_TEST),
    (r"make docs", MAKE_TEST),
    (r"make run", RUN_HERE),
    (r"docker compose .*", DOCKER_TEST),
    (r"MODELS_DIR=\S+ docker compose .*", DOCKER_TEST),  # DOCKER_TEST_COLOUR_MODEL serves through MODELS_DIR
    (r"\.venv/bin/python scripts/make_patches\.py .*", RUN_HERE),
    (r"\.venv/bin/vae-train .*", RUN_HERE),
    (r"\.venv/bin/vae-serve .*", RUN_HERE),
    (r"curl .*", RUN_HERE),
]


def readme_commands(text: str | None = None) -> list[str]:
    """The commands of the README's ```bash blocks: continuation lines joined, comments dropped."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def how(command: str) -> str:
    matches = [kind for pattern, kind in COVERAGE if re.fullmatch(pattern, command)]
    assert len(matches) == 1, f"README command not covered by tests/docs/test_readme.py: {command}"
    return matches[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} was not ready in {seconds} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_every_readme_command_is_exercised() -> None:
    commands = readme_commands()
    assert len(commands) >= 10
    kinds = {how(c) for c in commands}
    assert kinds == {RUN_HERE, MAKE_TEST, DOCKER_TEST}
    # make test is what CI runs, and it builds the docs; make docker-test runs the Compose commands
    assert re.search(r"^make test\b", (REPO / ".ci" / "run").read_text(), flags=re.M)
    assert re.search(r"^test: .*\bdocs\b", (REPO / "Makefile").read_text(), flags=re.M)
    docker_test = (REPO / "scripts" / "docker_test.sh").read_text()
    for step in (" build ", " up -d ", " down "):
        assert step in docker_test, f"scripts/docker_test.sh does not run compose{step}"


def test_every_make_target_the_readme_names_exists() -> None:
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"`make ([a-z][a-z-]*)`", README.read_text()))
    named |= {c.split()[1] for c in readme_commands() if c.startswith("make ")}
    assert named and named <= targets, f"the README names make targets the Makefile lacks: {named - targets}"


def test_the_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 200


def test_the_readme_commands_run(tmp_path: Path) -> None:
    """The worked example and the API examples, in README order, against the server the README starts."""
    venv = Path(sys.executable).parent.parent
    (tmp_path / ".venv").symlink_to(venv)
    (tmp_path / "scripts").symlink_to(REPO / "scripts")
    shutil.copytree(REPO / "models" / "digits" / "1", tmp_path / "models" / "digits" / "1")
    port = free_port()
    servers: list[subprocess.Popen] = []
    ran = []
    try:
        for command in readme_commands():
            if how(command) != RUN_HERE:
                continue
            command = command.replace("localhost:8000", f"127.0.0.1:{port}")
            if command == "make run":
                make_port = free_port()  # make's own server, from the repository (make test built the venv)
                proc = subprocess.Popen(
                    ["make", "-o", ".venv/.installed", "run", f"PORT={make_port}"],
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                try:
                    wait_ready(f"http://127.0.0.1:{make_port}", proc)
                finally:
                    stop(proc)
                ran.append(command)
                continue
            if "/vae-serve " in command:
                proc = subprocess.Popen(
                    f"{command} --port {port}",
                    shell=True,
                    cwd=tmp_path,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    env={**os.environ, "VAE_INTRA_OP_THREADS": "1"},
                )
                servers.append(proc)
                wait_ready(f"http://127.0.0.1:{port}", proc)
                ran.append(command)
                continue
            if "/vae-train " in command and "--dataset" in command:
                command = f"{command} {FAST_TRAINING}"
            out = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, timeout=600)
            assert out.returncode == 0, f"{command}\n{out.stderr.decode()[-3000:]}"
            if command.startswith("curl ") and " -o " not in command:
                body = json.loads(out.stdout)
                assert "error" not in body, f"{command}: {body}"
            ran.append(command)
    finally:
        for proc in servers:
            stop(proc)
    assert any("/vae-train " in c for c in ran) and any(c.startswith("curl ") for c in ran)
    assert (tmp_path / "samples.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "models" / "mine" / "1" / "manifest.json").exists()
