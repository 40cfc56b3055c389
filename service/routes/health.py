"""Liveness, readiness and Prometheus metrics: answered on the event loop, never behind inference work."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


def readiness(request: Request) -> tuple[bool, dict]:
    repo = request.app.state.repository
    ready = bool(repo.ready)
    body = {
        "ready": ready,
        "loading": not repo.loaded_once.is_set(),
        "models": {name: sorted(v) for name, v in repo.models.items()},
        "failures": dict(repo.failures),
    }
    return ready, body


@router.get(
    "/readyz",
    summary="Readiness: at least one model version loaded, verified and warmed up; failures with their reasons",
    responses={503: {"description": "not ready (still loading, or nothing loadable: see failures)"}},
)
async def readyz(request: Request) -> JSONResponse:
    ready, body = readiness(request)
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
