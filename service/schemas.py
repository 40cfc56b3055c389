"""Request and response bodies of the JSON API (they make the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: One image: H x W nested integers, D flat integers, or a base64 PNG/JPEG string.
ImageInput = list[list[int]] | list[int] | str
DecodeMode = Literal["mean", "mode", "sample", "probs"]


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = Field(None, description="model name (default: the served default model)")
    version: int | None = Field(None, ge=1, description="model version (default: the newest)")


class ImagesRequest(ModelRef):
    images: list[ImageInput] = Field(
        ...,
        min_length=1,
        description="images as grey levels 0..levels-1 (H x W or flat D integers) or base64-encoded PNG/JPEG strings",
    )


class ModelInfo(BaseModel):
    model: str
    version: int


class EncodeResponse(ModelInfo):
    mu: list[list[float]] = Field(..., description="posterior means, (B, latent_dim)")
    log_var: list[list[float]] = Field(..., description="posterior log-variances, (B, latent_dim)")


class DecodeRequest(ModelRef):
    z: list[list[float]] = Field(..., min_length=1, description="latents, (B, latent_dim), finite")
    mode: DecodeMode = Field(
        "mean",
        description="mean: expected grey level (rounded); mode: most likely level; "
        "sample: a seeded draw; probs: also return every pixel's distribution",
    )
    seed: int = Field(0, ge=0, description="seed of the draw for mode=sample")


class ImagesResponse(ModelInfo):
    images: list[list[list[int]]] = Field(..., description="integer grey levels, (B, H, W)")
    probs: list[list[list[list[float]]]] | None = Field(
        None, description="mode=probs only: per-pixel probability of each level, (B, H, W, levels)"
    )


class SampleRequest(ModelRef):
    n: int = Field(16, ge=1, description="number of images (at most the max batch setting)")
    seed: int = Field(0, ge=0, description="seed of the latents and of the pixel draws")
    mode: DecodeMode = Field("sample", description="how latents become images, as for /decode")


class SampleResponse(ImagesResponse):
    z: list[list[float]] = Field(..., description="the latents drawn from the prior, (n, latent_dim)")


class ReconstructRequest(ImagesRequest):
    mode: DecodeMode = Field("mode", description="how the posterior mean latent becomes an image, as for /decode")
    seed: int = Field(0, ge=0)


class ScoreRequest(ImagesRequest):
    num_samples: int = Field(1000, ge=1, description="importance samples K (at most the max K setting)")
    seed: int = Field(0, ge=0, description="seed of the importance samples")
    score: str | None = Field(None, description="OOD score to use (default: the model's calibrated default)")
    fpr: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="target false-positive rate of the OOD threshold (default: the model's default, 0.01)",
    )


class ImageScore(BaseModel):
    log_likelihood_nats: float = Field(..., description="importance-sampled log p(x), nats")
    nll_nats: float = Field(..., description="-log p(x), nats")
    nll_bits_per_dim: float = Field(..., description="-log2 p(x) / D, bits per dimension")
    elbo_nats: float = Field(..., description="mean log importance weight over the K samples, nats")
    ess: float = Field(..., description="effective sample size of the K importance weights, in [1, K]")
    score: float | None = Field(None, description="the OOD score (higher = more anomalous), in score_units")
    threshold: float | None = Field(None, description="score above this is flagged at the requested fpr")
    p_value: float | None = Field(None, description="(1 + #calibration scores >= score) / (n + 1)")
    is_ood: bool | None = Field(None, description="score > threshold; null when the model is not calibrated")


class ScoreResponse(ModelInfo):
    num_samples: int = Field(..., description="K, the importance samples per image")
    seed: int
    score_name: str | None = Field(None, description="which OOD score (null when the model is not calibrated)")
    score_units: str | None = None
    fpr: float | None = None
    results: list[ImageScore]


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str
    where: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
