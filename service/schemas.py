"""Request and response bodies of the JSON API (they make the OpenAPI schema at /docs).

Numbers are strict: `true` or "3" is not a number. Images are validated by the service itself
(service/images.py), so a wrong image gives one clear error, not one per pixel; their schema is
declared here for the documentation.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from vae_contract.formulas import MAX_SEED, SCORE_NAMES

DecodeMode = Literal["mean", "mode", "sample", "probs"]
ScoreName = Literal[SCORE_NAMES]  # type: ignore[valid-type]


def is_json_integer(value: Any) -> bool:
    """Whether a parsed JSON value is an integer as JSON Schema has it: 3 or 3.0, never true or 3.5."""
    return type(value) is int or (type(value) is float and value.is_integer())


def integral(values: list[Any]) -> list[Any] | None:
    """values as Python ints when every one is a JSON Schema integer (3.0 becomes 3), else None.
    The common case, all ints already, costs one pass and no copy."""
    if all(type(v) is int for v in values):
        return values
    if all(map(is_json_integer, values)):
        return [int(v) for v in values]
    return None


def _json_integer(value: Any) -> Any:
    """An integer as JSON Schema has it: 3 or 3.0, never true, "3" or 3.5."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


StrictInt = Annotated[int, BeforeValidator(_json_integer)]
StrictFloat = Annotated[float, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]  # true or false, never 1, "yes" or "true"

_LEVEL = {"type": "integer", "minimum": 0, "maximum": 255}
_PIXEL = {"anyOf": [_LEVEL, {"type": "array", "items": _LEVEL, "minItems": 1}]}
IMAGE_SCHEMA = {
    "description": "one image: H x W (grey) or H x W x C (colour) nested integer levels, D flat levels "
    "(0..levels-1 of the model), or a base64 PNG/JPEG (optionally a data:image/png;base64, URL)",
    "anyOf": [
        {"type": "array", "items": {"type": "array", "items": _PIXEL, "minItems": 1}, "minItems": 1},
        {"type": "array", "items": _LEVEL, "minItems": 1},
        {"type": "string", "minLength": 1},
    ],
}
ImageInput = Annotated[Any, WithJsonSchema(IMAGE_SCHEMA)]
LATENT_LIMIT = 1e4  # |z| beyond this is no latent of a trained model, and may overflow a decoder
LatentValue = Annotated[float, Field(strict=True, ge=-LATENT_LIMIT, le=LATENT_LIMIT)]
LatentRow = Annotated[list[LatentValue], Field(min_length=1)]


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = Field(None, min_length=1, description="model name (default: the served default model)")
    version: StrictInt | None = Field(None, ge=1, description="model version (default: the newest)")
    timeout_s: StrictFloat | None = Field(
        None, ge=1, description="stop the work and answer 504 after this many seconds (1 s up to the server's limit)"
    )


class ImagesRequest(ModelRef):
    images: list[ImageInput] = Field(..., min_length=1, description="images (see the image schema)")


class ModelInfo(BaseModel):
    model: str
    version: int


class EncodeResponse(ModelInfo):
    mu: list[list[float]] = Field(..., description="posterior means, (B, latent_dim)")
    log_var: list[list[float]] = Field(..., description="posterior log-variances, (B, latent_dim)")


class DecodeRequest(ModelRef):
    z: list[LatentRow] = Field(..., min_length=1, description="latents, (B, latent_dim), each within +-1e4")
    mode: DecodeMode = Field(
        "mean",
        description="mean: expected grey level (rounded); mode: most likely level; sample: a seeded draw per "
        "pixel; probs: the mode, plus every pixel's distribution",
    )
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED, description="seed of the pixel draws for mode=sample")


class ImagesResponse(ModelInfo):
    images: list[list[list[int | list[int]]]] = Field(
        ..., description="integer levels, (B, H, W) for grey models, (B, H, W, C) for colour"
    )
    probs: list[list[list[list[float] | list[list[float]]]]] | None = Field(
        None,
        description="mode=probs only: per-pixel probability of each level, (B, H, W, levels) for grey, "
        "(B, H, W, C, levels) for colour",
    )


class SampleRequest(ModelRef):
    n: StrictInt = Field(16, ge=1, description="number of images (at most the max batch setting)")
    seed: StrictInt = Field(
        0, ge=0, le=MAX_SEED, description="seed: sample i is drawn from seed and i, so n=4 is a prefix of n=8"
    )
    mode: DecodeMode = Field(
        "mean",
        description="how latents become images, as for /decode; the default, mean, shows each sample's expected "
        "image (per-pixel draws, mode=sample, look like salt-and-pepper noise because pixels are independent)",
    )


class SampleResponse(ImagesResponse):
    z: list[list[float]] = Field(..., description="the latents drawn from the prior, (n, latent_dim)")


class ReconstructRequest(ImagesRequest):
    mode: DecodeMode = Field("mean", description="how the posterior mean latent becomes an image, as for /decode")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED, description="seed of the pixel draws for mode=sample")


class ScoreRequest(ImagesRequest):
    num_samples: StrictInt = Field(1000, ge=1, description="importance samples K (at most the max K setting)")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED, description="seed of the importance samples")
    score: ScoreName | None = Field(None, description="OOD score (default: the model's calibrated default)")
    fpr: StrictFloat | None = Field(
        None, gt=0, lt=1, description="target false-positive rate of the OOD threshold (default: the model's, 0.01)"
    )
    anomaly_map: StrictBool = Field(
        False,
        description="also return each image's anomaly map (H x W, from the same K samples) and its mask at fpr "
        "(a pixel false-positive rate); with Accept: image/png, the images beside their heat-map overlays",
    )


class ImageScore(BaseModel):
    log_likelihood_nats: float = Field(..., description="importance-sampled log p(x), nats")
    nll_nats: float = Field(..., description="-log p(x), nats")
    nll_bits_per_dim: float = Field(..., description="-log2 p(x) / D, bits per dimension")
    elbo_nats: float = Field(..., description="mean log importance weight over the K samples, nats")
    ess: float = Field(..., description="effective sample size of the K importance weights, in [1, K]")
    score: float = Field(..., description="the OOD score (higher = more anomalous), in score_units")
    threshold: float | None = Field(None, description="score above this is flagged at the requested fpr")
    p_value: float | None = Field(None, description="(1 + #calibration scores >= score) / (n + 1)")
    is_ood: bool | None = Field(None, description="score > threshold; null when the model is not calibrated")
    anomaly_map: list[list[float]] | None = Field(
        None,
        description="with anomaly_map: H x W, each pixel's surprise in nats against normal pixels (-ln of the "
        "fraction of validation pixels as unusual, by the pixel's expected NLL under the posterior or its distance "
        "from the reconstruction, smoothed or not, whichever is most unusual; models/README.md), higher = more "
        "anomalous",
    )
    anomaly_mask: list[list[int]] | None = Field(
        None, description="with anomaly_map: H x W of 1 where the map exceeds pixel_threshold, else 0"
    )
    pixel_threshold: float | None = Field(
        None, description="with anomaly_map: the validation pixels' 1 - fpr quantile of the map (nats)"
    )


class ScoreResponse(ModelInfo):
    num_samples: int = Field(..., description="K, the importance samples per image")
    seed: int
    engine: str = Field(..., description="the engine and precision that computed the scores, e.g. 'openvino bf16'")
    score_name: str = Field(..., description="which OOD score")
    score_units: str
    fpr: float | None = None
    results: list[ImageScore]


class ErrorDetail(BaseModel):
    status: int
    code: str = Field(..., description="stable machine-readable reason, e.g. wrong_shape, out_of_range")
    message: str
    where: str | None = Field(None, description="the offending field, e.g. images[3]")
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
