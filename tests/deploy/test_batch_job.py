"""deploy/batch/score-job.yaml, the recipe that fans `vae-score` out across a cluster (a Kubernetes Indexed Job):
it validates (strict) against the Kubernetes schemas, and its pods' command lines, run here one after another
with the index Kubernetes gives each pod and the volumes mapped to local folders, produce parts whose
concatenation (the documented shell line) is byte for byte the file of one unsharded run."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np
import yaml

from tests.deploy.helpers import REPO
from tests.deploy.test_kubernetes import _validate

JOB = REPO / "deploy" / "batch" / "score-job.yaml"


def _job() -> dict:
    return yaml.safe_load(JOB.read_text())


def test_the_job_validates_and_its_counts_agree() -> None:
    job = _job()
    _validate(job)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
    container = spec["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--shard") + 1] == f"$(JOB_COMPLETION_INDEX)/{spec['completions']}"
    # $(VAR) in args expands from the container's env: the index must be declared there
    assert any(e["name"] == "JOB_COMPLETION_INDEX" for e in container["env"])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert container["command"] == ["vae-score"] and scripts["vae-score"] == "service.batch_score:main"
    assert "COPY --from=build-serve /src/models/ /models/" in (REPO / "Dockerfile").read_text()


def _pod_args(container: dict, index: int | None, mounts: dict[str, Path]) -> list[str]:
    """A pod's argument list as Kubernetes expands it ($(JOB_COMPLETION_INDEX)), with the container's paths
    mapped to local folders; index None: the same run unsharded."""
    args = list(container["args"])
    if index is None:
        i = args.index("--shard")
        del args[i : i + 2]
        args = [a.replace("part-$(JOB_COMPLETION_INDEX)", "whole") for a in args]
    else:
        args = [re.sub(r"\$\(JOB_COMPLETION_INDEX\)", str(index), a) for a in args]
    # one pass over each argument: a local folder may itself lie under a mount point's path (/tmp)
    where = re.compile("|".join(re.escape(inside + "/") for inside in mounts))
    return [where.sub(lambda m: f"{mounts[m.group(0)[:-1]]}/", a) for a in args]


def test_the_job_s_pods_make_the_single_run_s_file(tmp_path: Path) -> None:
    from service.batch_score import main
    from training.config import TrainConfig
    from training.data import prepare_config

    job = _job()
    n = job["spec"]["completions"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    volumes = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    mounts = {volumes[name]: tmp_path / name for name in volumes} | {"/models": REPO / "models"}
    for name in volumes:
        (tmp_path / name).mkdir()
    digits = prepare_config(TrainConfig(dataset="digits")).test[:27]  # 27 over 4 pods: parts of 7, 7, 7, 6
    np.save(tmp_path / "data" / "images.npy", np.rint(digits[..., 0] * 255 / 16).astype(np.uint8))

    for index in range(n):  # the pods, one after another
        assert main(_pod_args(container, index, mounts)) == 0
    assert main(_pod_args(container, None, mounts)) == 0

    # the documented merge: head -1 part-0.csv > scores.csv; for i ...; do tail -n +2 part-$i.csv >> scores.csv
    parts = [(tmp_path / "out" / f"part-{i}.csv").read_bytes().split(b"\n", 1) for i in range(n)]
    merged = parts[0][0] + b"\n" + b"".join(rows for _, rows in parts)
    whole = (tmp_path / "out" / "whole.csv").read_bytes()
    assert merged == whole
    assert whole.count(b"\n") == 1 + len(digits)
