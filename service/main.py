"""The app factory: wiring only. `create_app(Settings(...))` builds a fresh app (tests override settings)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.errors import install_handlers
from service.limits import BodyLimitMiddleware
from service.metrics import Metrics, MetricsMiddleware
from service.repository import ModelRepository
from service.routes import health, inference, models
from service.settings import Settings

DESCRIPTION = """
Variational autoencoders behind HTTP: encode images to latent means and log-variances, decode latents,
sample from the prior, reconstruct, and score importance-sampled likelihood (nats and bits/dim, K
samples) with an OOD flag. Every error is `{"error": {"status", "code", "message", "where"}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        repo = ModelRepository(settings)
        repo.load()  # verifies sha256, builds sessions, warms up; /readyz turns ready after this
        app.state.repository = repo
        yield

    app = FastAPI(title="vae-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.repository = None
    install_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(inference.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
