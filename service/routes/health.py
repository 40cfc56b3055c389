"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import MetricsDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: models loaded, sha256-verified and warmed up",
    responses={503: {"description": "not ready"}},
)
def readyz(request: Request) -> JSONResponse:
    repo = getattr(request.app.state, "repository", None)
    ready = bool(repo and repo.ready)
    body = {
        "ready": ready,
        "models": {name: sorted(v) for name, v in repo.models.items()} if repo else {},
        "failures": repo.failures if repo else {},
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(m: MetricsDep) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
