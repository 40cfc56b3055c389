"""What is served: each model's versions and manifests."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import RepoDep

router = APIRouter(tags=["models"])

# Large or training-only manifest parts left out of the listing (see /v1/models/{name}/{version}).
_BRIEF_OMIT = ("prior", "calibration", "training", "files", "export_check")


@router.get("/v1/models", summary="Every served model: versions, shapes, levels, metrics")
def list_models(repo: RepoDep) -> dict:
    out = []
    for name, versions in sorted(repo.models.items()):
        newest = max(versions)
        out.append(
            {
                "name": name,
                "versions": sorted(versions),
                "newest": newest,
                "default": name == repo.default_name(),
                "manifests": {
                    str(v): {k: val for k, val in mv.manifest.items() if k not in _BRIEF_OMIT}
                    for v, mv in sorted(versions.items())
                },
            }
        )
    return {"models": out}


@router.get("/v1/models/{name}/{version}", summary="The full manifest of one model version")
def get_manifest(name: str, version: int, repo: RepoDep) -> dict:
    return repo.get(name, version).manifest
