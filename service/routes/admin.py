"""Administration: rescan the model repository (always needs an API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from service.routes.inference import ERRORS

router = APIRouter(tags=["admin"], responses={k: v for k, v in ERRORS.items() if k in (401, 403)})


@router.post(
    "/admin/reload",
    summary="Rescan the model repository: new and changed versions are verified and warmed up, then swapped in",
)
async def reload(request: Request) -> dict:
    report = await run_in_threadpool(request.app.state.reload)
    return {"scan": report.as_dict(), "models": {n: sorted(v) for n, v in request.app.state.repository.models.items()}}
