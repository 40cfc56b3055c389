"""Service settings: one object, read from VAE_* environment variables when the app is built."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def available_cpus() -> int:
    """CPUs this process may run on (affinity and cgroup-pinned sets), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    """Every knob of the service. Environment variables are VAE_<FIELD>, e.g. VAE_MODELS_DIR."""

    model_config = SettingsConfigDict(env_prefix="VAE_", extra="ignore")

    models_dir: Path = Field(Path("models"), description="model repository: <name>/<version>/manifest.json")
    default_model: str | None = Field(
        None, description="model served when a request names none (default: the only model, or 'digits' when several)"
    )
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime threads per graph run; 0 = CPUs available")
    inter_op_threads: int = Field(1, ge=1)
    max_batch: int = Field(256, ge=1, description="most images (or latents, or samples) in one request")
    max_k: int = Field(10000, ge=1, description="most importance samples K a /score request may ask for")
    k_chunk_elements: int = Field(
        20000, ge=1, description="importance samples x images per log_weights run: bounds /score memory"
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = "info"

    def threads(self) -> int:
        return self.intra_op_threads or available_cpus()
