"""Dependencies shared by the routers, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import APIError
from service.metrics import Metrics
from service.repository import ModelRepository
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_repository(request: Request) -> ModelRepository:
    repo = getattr(request.app.state, "repository", None)
    if repo is None or not repo.ready:
        raise APIError(503, "not_ready", "no model is loaded yet; see /readyz")
    return repo


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
RepoDep = Annotated[ModelRepository, Depends(get_repository)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
