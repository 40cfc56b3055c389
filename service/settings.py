"""Service settings: one object, read from VAE_* environment variables when the app is built.

Memory has a ceiling that follows from these settings (see README "Limits and memory"):
  peak RSS ~ idle RSS + inference_workers x engine_memory_mb
             + max_connections x max_body_bytes (bodies being read)
             + the queued work's inputs and results (bounded by max_queued_samples)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def available_cpus() -> int:
    """CPUs this process may run on (affinity and cgroup-pinned sets), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _split(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every knob of the service. Environment variables are VAE_<FIELD>, e.g. VAE_MODELS_DIR."""

    model_config = SettingsConfigDict(env_prefix="VAE_", extra="ignore")

    # model repository
    models_dir: Path = Field(Path("models"), description="model repository: <name>/<version>/manifest.json")
    default_model: str | None = Field(
        None, description="model served when a request names none (default: the only model, or 'digits' when several)"
    )
    reload_interval_s: float = Field(
        0.0, ge=0, description="rescan the repository this often (0: only on SIGHUP or POST /admin/reload)"
    )
    # engines
    engine: Literal["auto", "onnxruntime", "openvino"] = Field(
        "auto",
        description="scoring engine; auto: OpenVINO bf16 where the CPU has bf16 instructions and the version's "
        "parity check passes, else onnxruntime fp32 (always the reference, and the engine of encode/decode)",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="precision of the openvino engine")
    fast_path_mean_tolerance_nats: float = Field(
        0.02, gt=0, description="largest mean |log p| difference from fp32 on the check images for the fast path"
    )
    fast_path_max_tolerance_nats: float = Field(
        0.25, gt=0, description="largest |log p| difference from fp32 on any check image for the fast path"
    )
    intra_op_threads: int = Field(0, ge=0, description="threads per engine call; 0 = CPUs available")
    inference_workers: int = Field(1, ge=1, le=64, description="engine calls running at once")
    engine_memory_mb: int = Field(
        128, ge=8, description="working memory of one engine call, in MB: sets the rows (images x samples) per call"
    )
    # batching and admission
    batching: bool = Field(True, description="merge concurrent requests into shared engine calls")
    batch_max_rows: int = Field(256, ge=1, description="most images in one encode/decode engine call")
    batch_max_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="wait this long for more requests before a call that is not full"
    )
    max_batch: int = Field(256, ge=1, description="most images (or latents, or samples) in one request")
    max_k: int = Field(10000, ge=1, description="most importance samples K a /score request may ask for")
    max_request_samples: int = Field(
        1_000_000, ge=1, description="most importance samples (images x K) one request may ask for"
    )
    max_queued_samples: int = Field(
        1_000_000,
        ge=1,
        description="most work (importance samples; an encoded or decoded image counts 1) queued "
        "at once; past it, 503 with Retry-After",
    )
    queue_deadline_fraction: float = Field(
        0.25,
        ge=0,
        le=1,
        description="refuse work (503, Retry-After) that, after the work queued ahead of it at the engines' measured "
        "cost, would be done later than this fraction of the request's deadline, or that would delay a queued "
        "larger score request past twice this fraction of its time left; a unit's cost moves with the load "
        "(up to ~2x on 2 cores, and the first cost is measured idle), hence a quarter (0: off, only "
        "max_queued_samples bounds the queue)",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="deadline of a request's work; a request may ask for less (timeout_s)"
    )
    # HTTP
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    http_impl: Literal["auto", "httptools", "h11"] = Field(
        "auto", description="HTTP/1.1 parser; auto: httptools (C) where installed, else h11 (pure Python)"
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="event loop; auto: uvloop (libuv) where installed, else asyncio's own"
    )
    opentelemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry (spans, metrics, logs to the globally configured providers); "
        "off, the check for configured providers no longer runs on every request (/metrics is the service's own)",
    )
    max_connections: int = Field(512, ge=1, description="open connections; past it new ones are closed at once")
    header_timeout_s: float = Field(10.0, gt=0, description="close a connection whose request head is this slow")
    body_timeout_s: float = Field(30.0, gt=0, description="408 when a request body arrives this slowly")
    keep_alive_s: float = Field(5.0, gt=0, description="close idle keep-alive connections after this")
    graceful_shutdown_s: float = Field(20.0, ge=0, description="on SIGTERM, finish in-flight work for this long")
    # access
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="bearer tokens, comma-separated; set -> every endpoint but liveness and readiness needs one",
    )
    api_keys_file: Path | None = Field(None, description="a file of bearer tokens, one a line (added to api_keys)")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS, comma-separated (default: none, CORS off)"
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split(value)

    @model_validator(mode="after")
    def _admissible(self) -> Settings:
        if self.max_request_samples > self.max_queued_samples:
            raise ValueError("max_request_samples must not exceed max_queued_samples (such a request could never run)")
        return self

    def threads(self) -> int:
        return self.intra_op_threads or available_cpus()

    def keys(self) -> list[str]:
        """Every configured API key (environment and file); empty means access is open."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file is not None:
            text = self.api_keys_file.read_text()
            keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return [k for k in keys if k]
