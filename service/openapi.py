"""The OpenAPI schema, made exact: the service's own limits and the served models' shapes, every status.

FastAPI derives a schema from the routes; this module finishes it so that it describes what is really
accepted: numbers bounded by the settings (num_samples <= max_k, images <= max_batch, ...), image
arrays shaped and ranged like the served models, model names and versions that exist, latents of the
served latent sizes, and for every operation every status it can answer with the body it then has.
It is rebuilt after every repository scan, since the served models decide part of it.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.settings import Settings
from service.v2 import DTYPES, SCORE_OUTPUTS
from vae_contract.formulas import MAX_SEED, SCORE_NAMES

V2_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
    "title": "V2Error",
}
REST_STATUSES = {
    "400": "the body is not UTF-8 JSON",
    "401": "an API key is needed",
    "403": "the API key is not valid",
    "404": "unknown model or version",
    "408": "the body arrived too slowly",
    "413": "the body is too large",
    "415": "the body is not sent as application/json (or multipart/form-data for uploads)",
    "422": "invalid input: shape, range, limits, unknown names",
    "503": "not ready, or at capacity (Retry-After says when to retry)",
    "504": "the work did not finish within the request's deadline",
}
V2_STATUSES = {
    "400": "the request cannot be used (JSON shape, tensors, parameters, values)",
    "401": "an API key is needed",
    "403": "the API key is not valid",
    "404": "unknown model or version",
    "408": "the body arrived too slowly",
    "413": "the body is too large",
    "503": "not ready, or at capacity (Retry-After says when to retry)",
    "504": "the work did not finish within the request's deadline",
}
OPEN = {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"}
# The smallest PNG is 67 bytes (signature, IHDR, IDAT, IEND), a JPEG takes more: no shorter file is an image.
MIN_IMAGE_BYTES = 67
MIN_IMAGE_BASE64 = 4 * -(-MIN_IMAGE_BYTES // 3)
# Base64 of a PNG (its 8-byte signature and the first byte of IHDR's length) or a JPEG (SOI and a marker),
# in groups of four with the standard padding: what service.images decodes with validate=True.
BASE64_IMAGE = (
    r"^(data:image/(png|jpeg);base64,)?(iVBORw0KGgoA|/9j/)"
    r"([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
)


def v2_infer_body(settings: Settings, models: dict[str, dict[int, Any]]) -> dict[str, Any]:
    """An inference request as the service reads it: one input tensor of a served signature's name, a
    datatype it supports and values of that datatype (flat, or nested as rows), the
    parameters it reads with their types and bounds. What JSON Schema cannot relate (the number of values
    to the shape, the shape and input name to the model in the path, the values to the model's range) is
    refused with 400, as the operation's description says."""
    graphs = [mv.manifest["graphs"] for vs in models.values() for mv in vs.values()]
    names = sorted({name for g in graphs for part in ("encoder", "decoder") for name in g[part]["inputs"]})
    colour = any(mv.channels > 1 for vs in models.values() for mv in vs.values())
    ranks = (2, 3, 4) if colour else (2, 3)  # [N, D] images or latents, [N, H, W] grey or [N, H, W, C] images

    def nested(scalar: dict[str, Any]) -> dict[str, Any]:
        """Values flat (what clients send), or nested as the tensor's rows."""
        rows = {"type": "array", "items": scalar, "minItems": 1}
        return {"anyOf": [{"type": "array", "items": scalar, "minItems": 1}, {"type": "array", "items": rows}]}

    def tensor(datatypes: list[str], scalar: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["name", "shape", "datatype", "data"],
            "properties": {
                "name": {"type": "string", "enum": names} if names else {"type": "string", "minLength": 1},
                "shape": {
                    "type": "array",
                    "prefixItems": [_int(1, settings.max_batch)],  # the batch
                    "items": _int(1, 2**31 - 1),
                    "minItems": min(ranks),
                    "maxItems": max(ranks),
                },
                "datatype": {"type": "string", "enum": datatypes},
                "parameters": {"type": "object", "properties": {"binary_data_size": False}},
                "data": nested(scalar),
            },
        }

    ints = [d for d in DTYPES if d.startswith(("INT", "UINT"))]
    floats = [d for d in DTYPES if d.startswith("FP")]
    outputs = sorted({*SCORE_OUTPUTS, "mu", "log_var", "images", "probs"})
    return {
        "required": True,
        "description": "Refused with 400 beyond the schema: data whose count does not match the shape, an input "
        "or shape that is not the path's model's (GET /v2/models/{model} says which), values outside its range. "
        "The binary tensor data extension is accepted too (not described by this schema): the JSON header, then "
        "the tensors' bytes, with the Inference-Header-Content-Length header giving the JSON's length and each "
        "input's parameters.binary_data_size its bytes",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "num_samples": _int(1, settings.max_k),
                                "seed": _int(0, MAX_SEED),
                                "score": {"type": "string", "enum": served_scores(models)},
                                "fpr": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                                "mode": {"type": "string", "enum": ["mean", "mode", "sample", "probs"]},
                                "timeout_s": {
                                    "type": "number",
                                    "exclusiveMinimum": 0,
                                    "maximum": settings.request_timeout_s,
                                },
                                "binary_data_output": {"type": "boolean"},
                            },
                        },
                        "inputs": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 1,
                            "items": {
                                "anyOf": [
                                    tensor(["BOOL"], {"type": "boolean"}),
                                    tensor(ints, {"type": "integer"}),
                                    tensor(floats, {"type": "number"}),
                                ]
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "enum": outputs},
                                    "parameters": {
                                        "type": "object",
                                        "properties": {"binary_data": {"type": "boolean"}},
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    }


def served_scores(models: dict[str, dict[int, Any]]) -> list[str]:
    """The scores some served version can give (nll_bpd and complexity always, the others where calibrated),
    in SCORE_NAMES's order; every score without a served version (a schema for no model at all)."""
    versions = [mv for vs in models.values() for mv in vs.values()]
    if not versions:
        return list(SCORE_NAMES)
    given = set().union(*(mv.score_names for mv in versions))
    return [name for name in SCORE_NAMES if name in given]


def _int(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    settings: Settings = app.state.settings
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schema = copy.deepcopy(schema)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps["V2Error"] = V2_ERROR
    comps.pop("HTTPValidationError", None)
    comps.pop("ValidationError", None)
    _tighten_bodies(comps, settings, app.state.repository.models)
    for path, ops in schema["paths"].items():
        v2 = path.startswith("/v2")
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            table = V2_STATUSES if v2 else REST_STATUSES
            for code, desc in table.items():
                if path in OPEN and code in ("401", "403"):
                    continue
                if method == "get" and code in ("400", "408", "413", "415"):
                    continue
                ref = "#/components/schemas/V2Error" if v2 else "#/components/schemas/ErrorResponse"
                responses[code] = {"description": desc, "content": {"application/json": {"schema": {"$ref": ref}}}}
            if v2:
                responses.pop("422", None)  # V2 answers a request it cannot use with 400
            if v2 and path.endswith("/infer"):
                op["requestBody"] = v2_infer_body(settings, app.state.repository.models)
                responses["200"] = {
                    "description": "outputs, as JSON or (binary tensor extension) a JSON header plus raw tensors",
                    "content": {"application/json": {"schema": {"type": "object"}}, "application/octet-stream": {}},
                }
            if not v2 and method == "get" and path in ("/healthz", "/metrics", "/v1/models"):
                for code in ("404", "422", "504"):
                    responses.pop(code, None)
            if path.startswith("/admin"):
                for code in ("404", "415", "422", "504"):
                    responses.pop(code, None)
            for param in op.get("parameters", []):
                _tighten_param(path, param, app)
            form = op.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if form is not None:  # each uploaded file is sent as what it is
                form["encoding"] = {"files": {"contentType": "image/png, image/jpeg"}}
    return schema


def _tighten_param(path: str, param: dict[str, Any], app: FastAPI) -> None:
    models = app.state.repository.models
    name, where = param["name"], param["in"]
    if where != "path":
        return
    if path.startswith("/v2/") and name == "model":
        names = sorted(f"{m}-{op}" for m in models for op in ("encode", "decode", "score"))
        if names:
            param["schema"] = {"type": "string", "enum": names}
    elif path.startswith("/v2/") and name == "version":
        versions = sorted({str(v) for vs in models.values() for v in vs})
        if versions:
            param["schema"] = {"type": "string", "enum": versions}
    elif path.startswith("/v1/models/") and name == "name" and models:
        param["schema"] = {"type": "string", "enum": sorted(models)}
    elif path.startswith("/v1/models/") and name == "version" and models:
        param["schema"] = {"type": "integer", "enum": sorted({v for vs in models.values() for v in vs})}


def _tighten_bodies(comps: dict[str, Any], settings: Settings, models: dict[str, dict[int, Any]]) -> None:
    versions = [mv for vs in models.values() for mv in vs.values()]
    for name, body in comps.items():
        props = body.get("properties", {})
        if "num_samples" in props:
            _set(props["num_samples"], maximum=settings.max_k)
        if "score" in props and versions:
            for branch in [props["score"], *props["score"].get("anyOf", [])]:
                if "enum" in branch:
                    branch["enum"] = served_scores(models)
        if "n" in props:
            _set(props["n"], maximum=settings.max_batch)
        if "timeout_s" in props:
            _set(props["timeout_s"], maximum=settings.request_timeout_s)
        if "images" in props:
            props["images"]["maxItems"] = settings.max_batch
            if versions and name.endswith("Request"):
                props["images"]["items"] = _image_schema(versions)
        if "z" in props and versions:
            props["z"]["maxItems"] = settings.max_batch
            sizes = sorted({mv.latent_dim for mv in versions})
            value = props["z"]["items"]["items"]
            props["z"]["items"] = {
                "anyOf": [{"type": "array", "items": value, "minItems": n, "maxItems": n} for n in sizes]
            }
        if "files" in props:
            props["files"].update(minItems=1, maxItems=settings.max_batch)
            props["files"]["items"].update(minLength=MIN_IMAGE_BYTES)
            if "seed" in props:
                _set(props["seed"], maximum=MAX_SEED)
            if versions:
                props.setdefault("model", {})["anyOf"] = [{"type": "string", "enum": sorted(models)}, {"type": "null"}]
                props.setdefault("version", {})["anyOf"] = [
                    {"type": "integer", "enum": sorted({mv.version for mv in versions})},
                    {"type": "null"},
                ]
            _no_null(props)
        if "model" in props and versions:
            props["model"]["anyOf"] = [{"type": "string", "enum": sorted(models)}, {"type": "null"}]
        if "version" in props and versions and name.endswith("Request"):
            props["version"]["anyOf"] = [
                {"type": "integer", "enum": sorted({mv.version for mv in versions})},
                {"type": "null"},
            ]


def _no_null(props: dict[str, Any]) -> None:
    """A multipart form cannot send null: an optional field is one that is left out."""
    for prop in props.values():
        branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
        if len(branches) == 1 and "anyOf" in prop:
            del prop["anyOf"]
            prop.update(branches[0])


def _set(prop: dict[str, Any], **limits: Any) -> None:
    """Apply limits to a property, whether it is a plain type or anyOf [type, null]."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") in ("integer", "number"):
            branch.update(limits)


def _image_schema(versions: list[Any]) -> dict[str, Any]:
    """One image of any served version: H x W (grey) or H x W x C (colour) nested levels in its range, D flat
    levels, or a base64 PNG/JPEG string."""
    shapes: list[dict[str, Any]] = []
    seen = set()
    for mv in versions:
        key = (mv.height, mv.width, mv.channels, mv.levels)
        if key in seen:
            continue
        seen.add(key)
        level = _int(0, mv.levels - 1)
        pixel = level if mv.channels == 1 else _array(level, mv.channels)
        shapes.append(_array(_array(pixel, mv.width), mv.height))
        shapes.append(_array(level, mv.dim))
    shapes.append(
        {
            "type": "string",
            "minLength": MIN_IMAGE_BASE64,
            "pattern": BASE64_IMAGE,
            "description": "a PNG or JPEG file, base64-encoded (standard alphabet, padded, no line breaks), "
            "bare or as a data URL. The schema checks its form; the service then decodes it (grey and colour "
            "are converted to the model's mode; a model trained with --image-size resizes any size): data "
            "that is not a decodable PNG/JPEG of the model's size is refused with 422 (invalid_image, "
            "wrong_shape)",
        }
    )
    return {
        "anyOf": shapes,
        "description": "one image: levels 0..levels-1 of the model as H x W (grey) or H x W x C (colour) nested "
        "lists or one flat list of H W C (channel fastest), or a base64 PNG/JPEG",
    }


def _array(items: dict[str, Any], n: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": n, "maxItems": n}
