"""encode / decode / sample / reconstruct / score, as JSON and (images in) multipart upload.

Routes only parse, call the core and shape the answer. Ask for a PNG (a grid for several images)
with `Accept: image/png` on /decode, /sample and /reconstruct.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.core import DecodeResult, InferenceCore, ScoreResult
from service.errors import InvalidInput
from service.http import JsonRoute, request_context
from service.images import decode_image_bytes, encode_png, overlay_png, parse_image_items
from service.repository import ModelVersion
from service.schemas import (
    DecodeMode,
    DecodeRequest,
    EncodeResponse,
    ErrorResponse,
    ImagesRequest,
    ImagesResponse,
    ReconstructRequest,
    SampleRequest,
    SampleResponse,
    ScoreName,
    ScoreRequest,
    ScoreResponse,
)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in [
        (400, "the body is not UTF-8 JSON"),
        (401, "an API key is needed"),
        (403, "the API key is not valid"),
        (404, "unknown model or version"),
        (408, "the body arrived too slowly"),
        (413, "the body is too large"),
        (415, "the body is not sent as application/json"),
        (422, "invalid input: shape, range, limits, unknown names"),
        (503, "not ready, or at capacity (Retry-After says when to retry)"),
        (504, "the work did not finish within the request's deadline"),
    ]
}
PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "JSON by default; a PNG grid with Accept: image/png"}
}
ScaleQuery = Annotated[int, Query(ge=1, le=64, description="PNG output only: integer upscaling factor")]

router = APIRouter(tags=["inference"], responses=ERRORS, route_class=JsonRoute)
uploads = APIRouter(tags=["inference"], responses=ERRORS)


def get_core(request: Request) -> InferenceCore:
    return request.app.state.core


CoreDep = Annotated[InferenceCore, Depends(get_core)]


async def images_from_json(core: InferenceCore, mv: ModelVersion, items: list[Any]) -> np.ndarray:
    core.check_count(len(items), "images")
    parsed = await run_in_threadpool(parse_image_items, items, mv.image_format)
    return core.check_images(mv, parsed)


async def images_from_uploads(
    core: InferenceCore, mv: ModelVersion, request: Request, files: list[UploadFile] | None
) -> np.ndarray:
    if not files:
        form = await request.form()
        got = ", ".join(sorted(set(form.keys()))) or "none"
        raise InvalidInput(f"send the images as files in the multipart field 'files' (fields received: {got})", "files")
    core.check_count(len(files), "files")
    blobs = [await f.read() for f in files]

    def decode() -> np.ndarray:
        fmt = mv.image_format
        return np.stack([decode_image_bytes(b, fmt, f"files[{i}]") for i, b in enumerate(blobs)])

    return core.check_images(mv, await run_in_threadpool(decode), "files")


def wants_png(request: Request) -> bool:
    return "image/png" in request.headers.get("accept", "")


def images_out(request: Request, result: DecodeResult, scale: int, **extra: Any) -> Response | dict[str, Any]:
    mv = result.mv
    images = result.images.reshape(-1, *mv.image_shape)
    if wants_png(request):
        return Response(encode_png(images, mv.levels, scale=scale), media_type="image/png")
    body: dict[str, Any] = {"model": mv.name, "version": mv.version, "images": images.tolist(), **extra}
    if result.probs is not None:
        body["probs"] = np.round(result.probs.reshape(len(images), *mv.image_shape, mv.levels), 6).tolist()
    return body


def score_body(r: ScoreResult) -> dict[str, Any]:
    nll = -r.log_likelihood
    maps = r.maps
    results = [
        {
            "log_likelihood_nats": float(r.log_likelihood[i]),
            "nll_nats": float(nll[i]),
            "nll_bits_per_dim": float(r.nll_bpd[i]),
            "elbo_nats": float(r.elbo[i]),
            "ess": float(r.ess[i]),
            "score": float(r.score[i]),
            "threshold": r.threshold,
            "p_value": None if r.p_value is None else float(r.p_value[i]),
            "is_ood": None if r.is_ood is None else bool(r.is_ood[i]),
            **(
                {
                    "anomaly_map": np.round(maps.maps[i], 4).tolist(),
                    "anomaly_mask": maps.masks[i].astype(int).tolist(),
                    "pixel_threshold": maps.threshold,
                }
                if maps is not None
                else {}
            ),
        }
        for i in range(len(r.log_likelihood))
    ]
    return {
        "model": r.mv.name,
        "version": r.mv.version,
        "num_samples": r.k,
        "seed": r.seed,
        "engine": r.engine,
        "score_name": r.score_name,
        "score_units": r.score_units,
        "fpr": r.fpr,
        "results": results,
    }


# --- JSON ---------------------------------------------------------------------------------------


@router.post("/encode", response_model=EncodeResponse, summary="Posterior mean and log-variance of q(z|x)")
async def encode(req: ImagesRequest, request: Request, core: CoreDep) -> dict[str, Any]:
    mv = core.model(req.model, req.version)
    x = await images_from_json(core, mv, req.images)
    r = await core.encode(mv, x, request_context(request, req.timeout_s))
    return {"model": mv.name, "version": mv.version, "mu": r.mu.tolist(), "log_var": r.log_var.tolist()}


@router.post("/decode", response_model=ImagesResponse, responses=PNG_RESPONSE, summary="Images from latents z")
async def decode(req: DecodeRequest, request: Request, core: CoreDep, scale: ScaleQuery = 1) -> Any:
    mv = core.model(req.model, req.version)
    z = core.check_latents(mv, latents_array(req.z, mv.latent_dim))
    r = await core.decode(mv, z, req.mode, req.seed, request_context(request, req.timeout_s))
    return images_out(request, r, scale)


def latents_array(rows: list[list[float]], latent_dim: int) -> np.ndarray:
    for i, row in enumerate(rows):
        if len(row) != latent_dim:
            raise InvalidInput(
                f"latent has {len(row)} values; this model's latent_dim is {latent_dim}", f"z[{i}]", code="wrong_shape"
            )
    return np.asarray(rows, dtype=np.float64)


@router.post(
    "/sample", response_model=SampleResponse, responses=PNG_RESPONSE, summary="Images sampled from the prior (seeded)"
)
async def sample(req: SampleRequest, request: Request, core: CoreDep, scale: ScaleQuery = 1) -> Any:
    mv = core.model(req.model, req.version)
    r = await core.sample(mv, req.n, req.mode, req.seed, request_context(request, req.timeout_s))
    assert r.z is not None
    return images_out(request, r, scale, z=r.z.tolist())


@router.post(
    "/reconstruct",
    response_model=ImagesResponse,
    responses=PNG_RESPONSE,
    summary="Encode, then decode the posterior mean",
)
async def reconstruct(req: ReconstructRequest, request: Request, core: CoreDep, scale: ScaleQuery = 1) -> Any:
    mv = core.model(req.model, req.version)
    x = await images_from_json(core, mv, req.images)
    r = await core.reconstruct(mv, x, req.mode, req.seed, request_context(request, req.timeout_s))
    return images_out(request, r, scale)


@router.post(
    "/score",
    response_model=ScoreResponse,
    responses=PNG_RESPONSE,
    summary="Importance-sampled likelihood (nats, bits/dim), ELBO, ESS and the OOD flag",
)
async def score(req: ScoreRequest, request: Request, core: CoreDep) -> Any:
    mv = core.model(req.model, req.version)
    x = await images_from_json(core, mv, req.images)
    ctx = request_context(request, req.timeout_s)
    r = await core.score(mv, x, req.num_samples, req.seed, req.score, req.fpr, ctx, anomaly_map=req.anomaly_map)
    return score_out(request, r, x)


def score_out(request: Request, r: ScoreResult, x: np.ndarray) -> Any:
    """JSON, or with anomaly maps and Accept: image/png each image beside its heat-map overlay."""
    if r.maps is not None and wants_png(request):
        mv = r.mv
        png = overlay_png(x.reshape(-1, *mv.image_shape), mv.levels, r.maps.maps, r.maps.threshold, r.maps.units)
        return Response(png, media_type="image/png")
    return score_body(r)


# --- uploads ------------------------------------------------------------------------------------

FilesField = Annotated[list[UploadFile], File(description="PNG or JPEG files, one image each")]
ModelField = Annotated[str | None, Form(min_length=1)]
VersionField = Annotated[int | None, Form(ge=1)]
TimeoutField = Annotated[float | None, Form(ge=1)]


@uploads.post("/encode/upload", response_model=EncodeResponse, summary="/encode for uploaded PNG/JPEG files")
async def encode_upload(
    request: Request,
    core: CoreDep,
    files: FilesField,
    model: ModelField = None,
    version: VersionField = None,
    timeout_s: TimeoutField = None,
) -> dict[str, Any]:
    mv = core.model(model, version)
    x = await images_from_uploads(core, mv, request, files)
    r = await core.encode(mv, x, request_context(request, timeout_s))
    return {"model": mv.name, "version": mv.version, "mu": r.mu.tolist(), "log_var": r.log_var.tolist()}


@uploads.post(
    "/reconstruct/upload",
    response_model=ImagesResponse,
    responses=PNG_RESPONSE,
    summary="/reconstruct for uploaded PNG/JPEG files",
)
async def reconstruct_upload(
    request: Request,
    core: CoreDep,
    files: FilesField,
    model: ModelField = None,
    version: VersionField = None,
    mode: Annotated[DecodeMode, Form()] = "mean",
    seed: Annotated[int, Form(ge=0)] = 0,
    timeout_s: TimeoutField = None,
    scale: ScaleQuery = 1,
) -> Any:
    mv = core.model(model, version)
    x = await images_from_uploads(core, mv, request, files)
    r = await core.reconstruct(mv, x, mode, seed, request_context(request, timeout_s))
    return images_out(request, r, scale)


@uploads.post(
    "/score/upload",
    response_model=ScoreResponse,
    responses=PNG_RESPONSE,
    summary="/score for uploaded PNG/JPEG files",
)
async def score_upload(
    request: Request,
    core: CoreDep,
    files: FilesField,
    model: ModelField = None,
    version: VersionField = None,
    num_samples: Annotated[int, Form(ge=1)] = 1000,
    seed: Annotated[int, Form(ge=0)] = 0,
    score: Annotated[ScoreName | None, Form()] = None,
    fpr: Annotated[float | None, Form(gt=0, lt=1)] = None,
    anomaly_map: Annotated[bool, Form()] = False,
    timeout_s: TimeoutField = None,
) -> Any:
    mv = core.model(model, version)
    x = await images_from_uploads(core, mv, request, files)
    ctx = request_context(request, timeout_s)
    r = await core.score(mv, x, num_samples, seed, score, fpr, ctx, anomaly_map=anomaly_map)
    return score_out(request, r, x)
