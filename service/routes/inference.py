"""encode / decode / sample / reconstruct / score, as JSON and (for images in) multipart upload.

Routes are glue: parse and check the input, call the model runtime, shape the output. Ask for a
PNG (a grid for several images) with `Accept: image/png` on /decode, /sample and /reconstruct.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile

from service.deps import MetricsDep, RepoDep, SettingsDep
from service.errors import APIError
from service.images import decode_image_bytes, encode_png, parse_images
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
    ScoreRequest,
    ScoreResponse,
)
from service.scoring import score_images
from service.settings import Settings

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in [
        (404, "unknown model or version"),
        (413, "request body too large"),
        (422, "invalid input: shape, range, limits"),
        (503, "not ready"),
    ]
}
PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "JSON by default; a PNG grid with Accept: image/png"}
}
ScaleQuery = Annotated[int, Query(ge=1, le=64, description="PNG output only: integer upscaling factor")]

router = APIRouter(tags=["inference"], responses=ERRORS)


# --- shared steps -------------------------------------------------------------------------------


def check_batch(n: int, settings: Settings, field: str) -> None:
    if n > settings.max_batch:
        raise APIError(422, "batch_too_large", f"{n} items exceed the limit of {settings.max_batch} per request", field)


def images_in(mv: ModelVersion, items: list[Any], settings: Settings) -> np.ndarray:
    check_batch(len(items), settings, "images")
    rt = mv.runtime
    return parse_images(items, rt.height, rt.width, rt.levels)


def uploads_in(mv: ModelVersion, files: list[UploadFile], settings: Settings) -> np.ndarray:
    check_batch(len(files), settings, "files")
    rt = mv.runtime
    return np.stack(
        [
            decode_image_bytes(f.file.read(), rt.height, rt.width, rt.levels, f"files[{i}] ({f.filename})")
            for i, f in enumerate(files)
        ]
    )


def wants_png(request: Request) -> bool:
    return "image/png" in request.headers.get("accept", "")


def images_out(
    request: Request, mv: ModelVersion, probs: np.ndarray, mode: DecodeMode, seed: int, scale: int, **extra: Any
) -> Response | dict[str, Any]:
    """Per-pixel distributions (B, D, levels) -> the JSON body or a PNG."""
    rt = mv.runtime
    rng = np.random.default_rng(seed)
    pixels = rt.images_from_probs(probs, "mode" if mode == "probs" else mode, rng)
    images = pixels.reshape(-1, rt.height, rt.width)
    if wants_png(request):
        return Response(encode_png(images, rt.levels, scale=scale), media_type="image/png")
    body: dict[str, Any] = {"model": mv.name, "version": mv.version, "images": images.tolist(), **extra}
    if mode == "probs":
        body["probs"] = np.round(probs.reshape(len(images), rt.height, rt.width, rt.levels), 6).tolist()
    return body


def latents_in(mv: ModelVersion, z: list[list[float]], settings: Settings) -> np.ndarray:
    check_batch(len(z), settings, "z")
    latent = mv.runtime.latent_dim
    for i, row in enumerate(z):
        if len(row) != latent:
            raise APIError(
                422, "wrong_shape", f"latent has {len(row)} values; this model's latent_dim is {latent}", f"z[{i}]"
            )
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused below
        array = np.asarray(z, dtype=np.float64).astype(np.float32)
    bad = ~np.isfinite(array)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise APIError(422, "non_finite", "latents must be finite numbers within float32 range", f"z[{i}][{j}]")
    return array


def decode_checked(mv: ModelVersion, z: np.ndarray) -> np.ndarray:
    probs = mv.runtime.decode(z)
    if not np.all(np.isfinite(probs)):
        raise APIError(422, "non_finite", "these latents are too large: the decoder's output is not finite", "z")
    return probs


# --- routes ---------------------------------------------------------------------------------------


@router.post("/encode", response_model=EncodeResponse, summary="Posterior mean and log-variance of q(z|x)")
def encode(req: ImagesRequest, repo: RepoDep, settings: SettingsDep) -> dict[str, Any]:
    mv = repo.get(req.model, req.version)
    return _encode(mv, images_in(mv, req.images, settings))


@router.post("/encode/upload", response_model=EncodeResponse, summary="/encode for uploaded PNG/JPEG files")
def encode_upload(
    repo: RepoDep,
    settings: SettingsDep,
    files: Annotated[list[UploadFile], File()],
    model: Annotated[str | None, Form()] = None,
    version: Annotated[int | None, Form(ge=1)] = None,
) -> dict[str, Any]:
    mv = repo.get(model, version)
    return _encode(mv, uploads_in(mv, files, settings))


def _encode(mv: ModelVersion, x: np.ndarray) -> dict[str, Any]:
    mu, log_var = mv.runtime.encode(x)
    return {"model": mv.name, "version": mv.version, "mu": mu.tolist(), "log_var": log_var.tolist()}


@router.post("/decode", response_model=ImagesResponse, responses=PNG_RESPONSE, summary="Images from latents z")
def decode(req: DecodeRequest, request: Request, repo: RepoDep, settings: SettingsDep, scale: ScaleQuery = 1) -> Any:
    mv = repo.get(req.model, req.version)
    probs = decode_checked(mv, latents_in(mv, req.z, settings))
    return images_out(request, mv, probs, req.mode, req.seed, scale)


@router.post(
    "/sample", response_model=SampleResponse, responses=PNG_RESPONSE, summary="Images sampled from the prior (seeded)"
)
def sample(req: SampleRequest, request: Request, repo: RepoDep, settings: SettingsDep, scale: ScaleQuery = 1) -> Any:
    mv = repo.get(req.model, req.version)
    check_batch(req.n, settings, "n")
    rng = np.random.default_rng(req.seed)
    z = mv.runtime.sample_prior(req.n, rng)
    probs = mv.runtime.decode(z)
    # the pixel draws use a stream of their own, so a sample's image depends only on (seed, n)
    return images_out(request, mv, probs, req.mode, req.seed + 1, scale, z=z.tolist())


@router.post(
    "/reconstruct",
    response_model=ImagesResponse,
    responses=PNG_RESPONSE,
    summary="Encode, then decode the posterior mean",
)
def reconstruct(
    req: ReconstructRequest, request: Request, repo: RepoDep, settings: SettingsDep, scale: ScaleQuery = 1
) -> Any:
    mv = repo.get(req.model, req.version)
    return _reconstruct(request, mv, images_in(mv, req.images, settings), req.mode, req.seed, scale)


@router.post(
    "/reconstruct/upload",
    response_model=ImagesResponse,
    responses=PNG_RESPONSE,
    summary="/reconstruct for uploaded PNG/JPEG files",
)
def reconstruct_upload(
    request: Request,
    repo: RepoDep,
    settings: SettingsDep,
    files: Annotated[list[UploadFile], File()],
    model: Annotated[str | None, Form()] = None,
    version: Annotated[int | None, Form(ge=1)] = None,
    mode: Annotated[DecodeMode, Form()] = "mode",
    seed: Annotated[int, Form(ge=0)] = 0,
    scale: ScaleQuery = 1,
) -> Any:
    mv = repo.get(model, version)
    return _reconstruct(request, mv, uploads_in(mv, files, settings), mode, seed, scale)


def _reconstruct(request: Request, mv: ModelVersion, x: np.ndarray, mode: DecodeMode, seed: int, scale: int) -> Any:
    mu, _ = mv.runtime.encode(x)
    return images_out(request, mv, mv.runtime.decode(mu), mode, seed, scale)


@router.post(
    "/score",
    response_model=ScoreResponse,
    summary="Importance-sampled likelihood (nats, bits/dim), ELBO, ESS and the OOD flag",
)
def score(req: ScoreRequest, repo: RepoDep, settings: SettingsDep, metrics: MetricsDep) -> dict[str, Any]:
    mv = repo.get(req.model, req.version)
    return _score(
        mv, images_in(mv, req.images, settings), req.num_samples, req.seed, req.score, req.fpr, settings, metrics
    )


@router.post("/score/upload", response_model=ScoreResponse, summary="/score for uploaded PNG/JPEG files")
def score_upload(
    repo: RepoDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    files: Annotated[list[UploadFile], File()],
    model: Annotated[str | None, Form()] = None,
    version: Annotated[int | None, Form(ge=1)] = None,
    num_samples: Annotated[int, Form(ge=1)] = 1000,
    seed: Annotated[int, Form(ge=0)] = 0,
    score: Annotated[str | None, Form()] = None,
    fpr: Annotated[float | None, Form(gt=0, lt=1)] = None,
) -> dict[str, Any]:
    mv = repo.get(model, version)
    return _score(mv, uploads_in(mv, files, settings), num_samples, seed, score, fpr, settings, metrics)


def _score(
    mv: ModelVersion,
    x: np.ndarray,
    k: int,
    seed: int,
    score_name: str | None,
    fpr: float | None,
    settings: Settings,
    metrics: Any,
) -> dict[str, Any]:
    if k > settings.max_k:
        raise APIError(422, "k_too_large", f"num_samples {k} exceeds the limit of {settings.max_k}", "num_samples")
    body = score_images(mv, x, k, seed, score_name, fpr, settings.k_chunk_elements)
    metrics.images_scored.labels(mv.name).inc(len(x))
    return body
