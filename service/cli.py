"""`vae-serve`: serve a model repository over HTTP (settings also come from VAE_* environment variables)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vae-serve",
        description="Serve VAE model versions over HTTP. Every setting is also a VAE_* environment variable "
        "(docs: Reference, Settings); flags win.",
    )
    p.add_argument("--models", type=Path, help="model repository directory (VAE_MODELS_DIR, default: models)")
    p.add_argument("--host", help="bind address (VAE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (VAE_PORT, default 8000)")
    p.add_argument("--default-model", help="model served when a request names none (VAE_DEFAULT_MODEL)")
    p.add_argument("--threads", type=int, help="threads per engine call (VAE_INTRA_OP_THREADS; 0 = all CPUs)")
    p.add_argument("--engine", choices=["auto", "onnxruntime", "openvino"], help="scoring engine (VAE_ENGINE)")
    p.add_argument("--log-level", help="debug, info, warning, error (VAE_LOG_LEVEL)")
    return p


def main(argv: list[str] | None = None) -> int:
    from service.server import serve
    from service.settings import Settings

    args = build_parser().parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "models_dir": args.models,
            "host": args.host,
            "port": args.port,
            "default_model": args.default_model,
            "intra_op_threads": args.threads,
            "engine": args.engine,
            "log_level": args.log_level,
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
        settings.keys()
    except (ValidationError, OSError) as exc:
        print(f"vae-serve: error: invalid settings: {exc}", file=sys.stderr)
        return 2
    if not settings.models_dir.is_dir():
        print(
            f"vae-serve: error: models directory {settings.models_dir} does not exist "
            "(train one with `vae-train --dataset digits --out models/digits/1`)",
            file=sys.stderr,
        )
        return 2
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
