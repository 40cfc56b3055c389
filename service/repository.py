"""The model repository: <models_dir>/<name>/<version>/manifest.json, verified and loaded.

A version is served only after every file the manifest names matches its sha256, its sessions are
built and a warm-up run succeeded. A broken version is reported (and /readyz says so) but does not
stop the others from being served.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.calibration import ScoreCalibration
from service.errors import APIError
from service.runtime import ModelRuntime
from service.settings import Settings

log = logging.getLogger("vae_serve")
SUPPORTED_FORMATS = {1}


class ModelLoadError(RuntimeError):
    pass


@dataclass
class ModelVersion:
    name: str
    version: int
    path: Path
    manifest: dict[str, Any]
    runtime: ModelRuntime
    calibrations: dict[str, ScoreCalibration] = field(default_factory=dict)  # parsed once, at load


@dataclass
class ModelRepository:
    settings: Settings
    models: dict[str, dict[int, ModelVersion]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # "name/version" -> why it is not served

    def load(self) -> None:
        root = self.settings.models_dir
        if not root.is_dir():
            self.failures[str(root)] = "models directory does not exist"
            log.error("models directory %s does not exist", root)
            return
        for manifest_path in sorted(root.glob("*/*/manifest.json")):
            version_dir = manifest_path.parent
            key = f"{version_dir.parent.name}/{version_dir.name}"
            try:
                mv = load_version(version_dir, self.settings)
            except ModelLoadError as exc:
                self.failures[key] = str(exc)
                log.error("not serving %s: %s", key, exc)
                continue
            self.models.setdefault(mv.name, {})[mv.version] = mv
            log.info("serving %s (verified %d files, warmed up)", key, len(mv.manifest["files"]))

    @property
    def ready(self) -> bool:
        return bool(self.models)

    def default_name(self) -> str | None:
        if self.settings.default_model:
            return self.settings.default_model
        if len(self.models) == 1:
            return next(iter(self.models))
        return "digits" if "digits" in self.models else (sorted(self.models)[0] if self.models else None)

    def get(self, name: str | None = None, version: int | None = None) -> ModelVersion:
        """The named (or default) model at the given (or newest) version; 404 when there is none."""
        name = name or self.default_name()
        if name is None or name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise APIError(404, "unknown_model", f"no model named {name!r} is served (served: {known})", "model")
        versions = self.models[name]
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise APIError(
                404,
                "unknown_version",
                f"model {name!r} has no version {version} (served: {sorted(versions)})",
                "version",
            )
        return versions[version]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_version(version_dir: Path, settings: Settings) -> ModelVersion:
    """Read, verify (sha256 of every named file), open and warm up one model version."""
    try:
        version = int(version_dir.name)
    except ValueError as exc:
        raise ModelLoadError(f"version directory {version_dir.name!r} is not an integer") from exc
    try:
        manifest = json.loads((version_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"unreadable manifest.json: {exc}") from exc
    if manifest.get("format_version") not in SUPPORTED_FORMATS:
        raise ModelLoadError(f"manifest format_version {manifest.get('format_version')!r} is not supported")
    files = manifest.get("files", {})
    for graph in manifest.get("graphs", {}).values():
        if graph["file"] not in files:
            raise ModelLoadError(f"graph file {graph['file']} has no sha256 in the manifest")
    for fname, expected in files.items():
        path = version_dir / fname
        if not path.is_file():
            raise ModelLoadError(f"{fname} is named in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelLoadError(
                f"{fname}: sha256 {actual[:16]}... does not match the manifest "
                f"({expected[:16]}...): the file was modified or corrupted"
            )
    try:
        runtime = ModelRuntime(version_dir, manifest, settings.threads(), settings.inter_op_threads)
        runtime.warm_up()
    except Exception as exc:  # onnxruntime raises several types for a bad graph
        raise ModelLoadError(f"cannot load the ONNX graphs: {exc}") from exc
    blocks = (manifest.get("calibration") or {}).get("scores", {})
    calibrations = {name: ScoreCalibration.from_manifest(name, block) for name, block in blocks.items()}
    return ModelVersion(version_dir.parent.name, version, version_dir, manifest, runtime, calibrations)
