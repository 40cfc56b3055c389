"""The app factory: wiring only. `create_app(Settings(...))` builds a fresh app (tests override settings)."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.batching import Scheduler
from service.core import InferenceCore
from service.http import (
    ApiKeys,
    AuthMiddleware,
    BodyLimitMiddleware,
    BodyReader,
    InternalErrorMiddleware,
    install_handlers,
)
from service.metrics import Metrics, MetricsMiddleware
from service.openapi import build_openapi
from service.repository import ModelRepository, ScanReport
from service.routes import admin, health, inference, models, ui
from service.settings import Settings
from service.v2 import InferLane
from service.v2 import router as v2_router

VERSION = "0.2.0"
DESCRIPTION = """
Variational autoencoders behind HTTP: encode images to latent means and log-variances, decode latents,
sample from the prior, reconstruct, and score importance-sampled likelihood (nats and bits/dim, K
samples) with an OOD flag. The Open Inference Protocol (KServe V2) is served under /v2. Every JSON API
error is `{"error": {"status", "code", "message", "where"}}`; V2 errors are `{"error": "..."}`.
"""
log = logging.getLogger("vae_serve")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = Metrics()
    repository = ModelRepository(settings)
    scheduler = Scheduler(settings, metrics)
    core = InferenceCore(settings, repository, scheduler, metrics)

    def reload() -> ScanReport:
        report = repository.scan()
        metrics.reloads.inc()
        app.openapi_schema = None  # the served models shape the schema: rebuild it on the next request
        return report

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        stop = threading.Event()
        await asyncio.to_thread(reload)  # ready means ready: verified and warmed up before serving
        # What start-up made (modules, the engines, the app: ~90k objects) lives as long as the process:
        # out of the collector's sight, a full collection takes microseconds instead of ~50 ms, which
        # stalled the event loop and set the p99 latency under load (README Performance).
        gc.collect()
        gc.freeze()
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: threading.Thread(target=reload, daemon=True).start())
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests), or no signals
            log.debug("SIGHUP reload is not available in this process")
        if settings.reload_interval_s > 0:

            def poll() -> None:
                while not stop.wait(settings.reload_interval_s):
                    reload()

            threading.Thread(target=poll, name="vae-reload", daemon=True).start()
        yield
        stop.set()
        scheduler.stop()

    app = FastAPI(
        title="vae-serve",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        **telemetry_options(settings),
    )
    app.state.settings, app.state.metrics = settings, metrics
    app.state.repository, app.state.scheduler, app.state.core = repository, scheduler, core
    app.state.reload = reload
    install_handlers(app)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    routers = (health.router, models.router, inference.router, inference.uploads, admin.router, v2_router, ui.router)
    for router in routers:
        app.include_router(router)
    install_docs(app)
    keys = ApiKeys(settings.keys(), routes=lambda: app.routes)
    reader = BodyReader(settings.max_body_bytes, settings.body_timeout_s)
    app.add_middleware(BodyLimitMiddleware, reader=reader)
    app.add_middleware(AuthMiddleware, keys=keys)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "inference-header-content-length"],
            expose_headers=["retry-after", "inference-header-content-length"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(InternalErrorMiddleware)  # a bug's 500 keeps the connection (uvicorn drops it otherwise)
    # outermost of the app's own: V2 inference applies the same keys, body limit and metrics in one frame
    app.add_middleware(InferLane, metrics=metrics, keys=keys, reader=reader, cors=bool(settings.cors_origins))
    return app


def telemetry_options(settings: Settings) -> dict[str, Any]:
    """FastAPI's native OpenTelemetry, off unless asked for: with it on, every request asks the global
    tracer, meter and logger providers whether they are configured (~5.5 us a request, measured)."""
    if settings.opentelemetry or "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}  # FastAPI's defaults (releases before 0.165 have no native telemetry to turn off)
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def install_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the assets the swagger-ui-bundle package ships: no CDN, works offline."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="vae-serve API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )
