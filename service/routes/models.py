"""What is served: each model's versions (with their digests and scoring engines) and manifests."""

from __future__ import annotations

from fastapi import APIRouter, Path, Request

from service.errors import NotReady
from service.routes.inference import ERRORS

router = APIRouter(tags=["models"], responses={k: v for k, v in ERRORS.items() if k in (401, 403, 404, 503)})


@router.get("/v1/models", summary="Every served model: versions, digests, shapes, metrics, scoring engine")
async def list_models(request: Request) -> dict:
    repo = request.app.state.repository
    if not repo.loaded_once.is_set():
        raise NotReady("the model repository is still loading; see /readyz")
    out = []
    default = repo.default_name()
    for name, versions in sorted(repo.models.items()):
        out.append(
            {
                "name": name,
                "versions": sorted(versions),
                "newest": max(versions),
                "default": name == default,
                "details": {str(v): mv.describe() for v, mv in sorted(versions.items())},
            }
        )
    return {"models": out, "failures": dict(repo.failures)}


@router.get("/v1/models/{name}/{version}", summary="The full manifest of one model version, and its digest")
async def get_manifest(request: Request, name: str, version: int = Path(..., ge=1, le=2**31 - 1)) -> dict:
    mv = request.app.state.core.model(name, version)
    return {**mv.manifest, "digest": mv.digest, "scoring": mv.scoring.describe()}
