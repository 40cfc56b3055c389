"""The Open Inference Protocol (KServe "V2" REST), on the same core as the JSON API.

Each served model `<name>` appears as three V2 models: `<name>-encode` (x -> mu, log_var),
`<name>-decode` (z -> images, probs) and `<name>-score` (x -> log_likelihood, ..., is_ood). Their
metadata derives from the manifest's graph signatures. Request parameters carry the rest:
num_samples (K), seed, score, fpr (score); mode, seed (decode); timeout_s (all). The binary tensor
data extension is supported in both directions (Triton's clients use it by default), and
GET .../config answers Triton's model-configuration call that perf_analyzer makes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service.core import InferenceCore, RequestContext
from service.errors import BadRequest, InvalidInput, NotReady, UnknownModel
from service.http import ApiKeys, BodyReader, JsonBudget, check_json_structure, wait_disconnect
from service.metrics import Metrics
from service.repository import ModelVersion
from service.schemas import integral, is_json_integer

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])
OPS = ("encode", "decode", "score")
HEADER = "inference-header-content-length"
HEADER_KEY = HEADER.encode()  # as ASGI gives header names: lower-case bytes
DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
NUMPY_TO_V2 = {np.dtype(v).newbyteorder("<"): k for k, v in DTYPES.items()}
SCORE_OUTPUTS = ("log_likelihood", "nll_bits_per_dim", "elbo", "ess", "score", "p_value", "is_ood")


def _core(request: Request) -> InferenceCore:
    return request.app.state.core


def split_name(v2_name: str) -> tuple[str, str]:
    base, sep, op = v2_name.rpartition("-")
    if not sep or op not in OPS or not base:
        raise UnknownModel(f"unknown model {v2_name!r}; V2 models are <name>-encode, <name>-decode and <name>-score")
    return base, op


def ascii_int(text: str) -> int | None:
    """`text` as a non-negative integer where it is ASCII digits only, else None. (str.isdigit alone also takes
    superscripts such as '¹', which int() refuses: a 500 that schemathesis found in a version path segment.)"""
    return int(text) if text.isascii() and text.isdigit() else None


def lookup(core: InferenceCore, v2_name: str, version: str | None) -> tuple[ModelVersion, str]:
    base, op = split_name(v2_name)
    number = None
    if version is not None:
        number = ascii_int(version)
        if number is None or number < 1:
            raise UnknownModel(f"model {v2_name!r} has no version {version!r}")
    return core.model(base, number), op


def _tensor(name: str, dtype: str, shape: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": dtype, "shape": [-1 if isinstance(d, str) else d for d in shape]}


def signature(mv: ModelVersion, op: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) of a V2 model, from the manifest's graph signatures."""
    graphs = mv.manifest["graphs"]

    def from_graph(spec: dict[str, list[Any]]) -> list[dict[str, Any]]:
        return [_tensor(n, str(dims[-1]).replace("float", "FP").upper(), dims[:-1]) for n, dims in spec.items()]

    if op == "encode":
        return from_graph(graphs["encoder"]["inputs"]), from_graph(graphs["encoder"]["outputs"])
    if op == "decode":
        outputs = [_tensor("images", "INT64", ["batch", mv.dim])] + from_graph(graphs["decoder"]["outputs"])
        return from_graph(graphs["decoder"]["inputs"]), outputs
    x = {"x": graphs["log_weights"]["inputs"]["x"]}
    names = SCORE_OUTPUTS if mv.calibrations else SCORE_OUTPUTS[:5]
    outputs = [_tensor(n, "BOOL" if n == "is_ood" else "FP64", ["batch"]) for n in names]
    if mv.has_anomaly_maps:  # optional: computed when asked for (parameter anomaly_map or by output name)
        pixels = ["batch", mv.height, mv.width]
        outputs += [_tensor("anomaly_map", "FP32", pixels), _tensor("anomaly_mask", "BOOL", pixels)]
    return from_graph(x), outputs


def metadata(request: Request, v2_name: str, version: str | None) -> dict[str, Any]:
    mv, op = lookup(_core(request), v2_name, version)
    inputs, outputs = signature(mv, op)
    versions = [str(v) for v in sorted(request.app.state.repository.models[mv.name])] if version is None else [version]
    image = {"height": mv.height, "width": mv.width, "channels": mv.channels, "levels": mv.levels}
    return {
        "name": v2_name,
        "versions": versions,
        "platform": "vae-serve",
        "inputs": inputs,
        "outputs": outputs,
        # images go in as [N, H W C] (channel fastest), [N, H, W] (grey) or [N, H, W, C]
        "parameters": {"image": image, "image_layouts": [["N", "H*W*C"], ["N", "H", "W", "C"]]},
    }


def config(request: Request, v2_name: str, version: str | None) -> dict[str, Any]:
    """Triton's model configuration (perf_analyzer reads it): dims without the batch axis."""
    mv, op = lookup(_core(request), v2_name, version)
    inputs, outputs = signature(mv, op)

    def entries(tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"name": t["name"], "data_type": "TYPE_" + t["datatype"].replace("FP", "FP"), "dims": t["shape"][1:] or [1]}
            for t in tensors
        ]

    return {
        "name": v2_name,
        "platform": "vae-serve",
        "backend": "vae-serve",
        "max_batch_size": request.app.state.settings.max_batch,
        "input": entries(inputs),
        "output": entries(outputs),
        "version_policy": {"latest": {"num_versions": 1}},
    }


# --- tensors ------------------------------------------------------------------------------------


def decode_tensor(spec: dict[str, Any], binary: bytes | None) -> np.ndarray:
    name = spec.get("name")
    dtype = spec.get("datatype")
    shape = spec.get("shape")
    where = f"inputs[{name}]"
    if not isinstance(name, str) or not name or not isinstance(dtype, str) or not isinstance(shape, list):
        raise BadRequest("each input needs a name, a datatype and a shape", "inputs")
    if dtype not in DTYPES:
        raise InvalidInput(f"datatype {dtype} is not supported here; use one of {sorted(DTYPES)}", where)
    # an integer as JSON Schema has it: 3 or 3.0, never true or 3.5
    if not all(type(d) in (int, float) and d >= 0 and float(d).is_integer() for d in shape):
        raise InvalidInput(f"shape must be non-negative integers, got {shape}", where)
    shape = [int(d) for d in shape]
    count = math.prod(shape)
    np_dtype = np.dtype(DTYPES[dtype]).newbyteorder("<")
    if binary is not None:
        if len(binary) != count * np_dtype.itemsize:
            raise InvalidInput(
                f"{len(binary)} bytes of binary data do not make a {dtype} tensor of shape {shape}", where
            )
        return np.frombuffer(binary, dtype=np_dtype).reshape(shape)
    data = spec.get("data")
    if data is None:
        raise InvalidInput("the input has neither data nor binary_data_size", where)
    if not isinstance(data, list):
        raise InvalidInput(f"data holds 0 values; shape {shape} needs {count}", where)
    if any(type(v) is list for v in data):
        try:
            flat = np.asarray(data, dtype=object).reshape(-1).tolist()
        except ValueError:  # ragged nesting
            raise InvalidInput("data is not a (nested) list of the tensor's shape", where) from None
    else:  # the flat form most clients send: no round trip through an object array
        flat = data
    if len(flat) != count:
        raise InvalidInput(f"data holds {len(flat)} values; shape {shape} needs {count}", where)
    kinds = set(map(type, flat))
    if dtype == "BOOL":
        ok = kinds <= {bool}
    elif np_dtype.kind in "iu":
        ints = integral(flat) if kinds <= {int, float} else None
        ok, flat = ints is not None, ints or flat
    else:
        ok = kinds <= {int, float}
    if not ok:
        raise InvalidInput(f"data values do not match datatype {dtype}", where)
    try:
        return np.asarray(flat, dtype=np_dtype).reshape(shape)
    except (OverflowError, ValueError):
        raise InvalidInput(f"data values do not fit datatype {dtype}", where) from None


def parse_request(
    body: bytes, header_length: str | None, budget: JsonBudget
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """An inference request's JSON header and its input tensors. header_length: the
    Inference-Header-Content-Length header (binary tensor data follows the JSON header), or None.
    budget: the most arrays, objects and strings the JSON header may hold (413 past it, unparsed)."""
    if header_length is not None:
        length = ascii_int(header_length)
        if length is None or length > len(body):
            raise BadRequest(f"{HEADER} must be the byte length of the JSON header within the body")
        head, rest = body[:length], body[length:]
    else:
        head, rest = body, b""
    check_json_structure(head, budget)
    try:
        req = orjson.loads(head)  # RFC 8259 JSON: no NaN or Infinity; integers past 64 bits read as floats
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the inference request is not UTF-8 JSON: {exc}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise BadRequest("the inference request needs a non-empty 'inputs' list")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for spec in req["inputs"]:
        if not isinstance(spec, dict):
            raise BadRequest("each input must be a JSON object")
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest("an input's parameters must be a JSON object", "inputs")
        size = params.get("binary_data_size")
        chunk = None
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(rest):
                raise BadRequest("binary_data_size does not fit the binary data sent")
            chunk = rest[offset : offset + size]
            offset += size
        tensors[str(spec.get("name"))] = decode_tensor(spec, chunk)
    if offset != len(rest):
        raise BadRequest(f"{len(rest) - offset} bytes of binary data are not claimed by any input")
    return req, tensors


def _param(params: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = params.get(name, default)
    if value is default:
        return value
    if kind is float and type(value) is int:
        value = float(value)
    elif kind is int and is_json_integer(value):
        value = int(value)
    if type(value) is not kind:
        raise InvalidInput(f"parameter {name} must be {kind.__name__}, got {value!r}", f"parameters.{name}")
    return value


def single(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
    extra = sorted(set(tensors) - {name})
    if name not in tensors or extra:
        raise InvalidInput(f"this model takes exactly one input, {name!r}; got {sorted(tensors)}", "inputs")
    return tensors[name]


@dataclass
class Reply:
    """An inference response's body: JSON, or (binary tensor data) a JSON header and the tensors' bytes."""

    body: bytes
    header_length: int | None = None  # of the JSON header, when binary data follows it

    def headers(self) -> list[tuple[bytes, bytes]]:
        kind = b"application/json" if self.header_length is None else b"application/octet-stream"
        out = [(b"content-type", kind), (b"content-length", str(len(self.body)).encode())]
        if self.header_length is not None:
            out.append((HEADER_KEY, str(self.header_length).encode()))
        return out

    def response(self) -> Response:
        """The same reply as a Starlette response, for the declared routes (one set of headers: headers())."""
        response = Response(self.body)
        response.raw_headers = self.headers()
        return response


async def infer(
    core: InferenceCore,
    v2_name: str,
    version: str | None,
    body: bytes,
    header_length: str | None,
    disconnected: Callable[[], Awaitable[None]] | None,
) -> Reply:
    """One inference request, from its body to its reply (errors raise service errors)."""
    mv, op = lookup(core, v2_name, version)
    req, tensors = parse_request(body, header_length, JsonBudget.of(core.settings, core.repository.models))
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("parameters must be a JSON object")
    ctx = RequestContext.start(core.settings, _param(params, "timeout_s", float, None), disconnected)
    outputs: dict[str, tuple[np.ndarray, str]] = {}
    out_params: dict[str, Any] = {}
    if op == "encode":
        x = core.check_images(mv, single(tensors, "x"), "inputs[x]")
        enc = await core.encode(mv, x, ctx)
        outputs = {"mu": (enc.mu, "FP32"), "log_var": (enc.log_var, "FP32")}
    elif op == "decode":
        z = core.check_latents(mv, single(tensors, "z"), "inputs[z]")
        mode = core.check_mode(_param(params, "mode", str, "mean"), "parameters.mode")
        wanted = _requested(req)
        probs = wanted is None or "probs" in wanted
        dec = await core.decode(mv, z, mode, _param(params, "seed", int, 0), ctx, with_probs=probs)
        outputs = {"images": (dec.images, "INT64")}
        if dec.probs is not None:
            outputs["probs"] = (dec.probs, "FP32")
    else:
        x = core.check_images(mv, single(tensors, "x"), "inputs[x]")
        wanted = _requested(req)
        s = await core.score(
            mv,
            x,
            _param(params, "num_samples", int, 1000),
            _param(params, "seed", int, 0),
            _param(params, "score", str, None),
            _param(params, "fpr", float, None),
            ctx,
            anomaly_map=_param(params, "anomaly_map", bool, False)
            or bool(wanted and {"anomaly_map", "anomaly_mask"} & set(wanted)),
        )
        outputs = {
            "log_likelihood": (s.log_likelihood, "FP64"),
            "nll_bits_per_dim": (s.nll_bpd, "FP64"),
            "elbo": (s.elbo, "FP64"),
            "ess": (s.ess, "FP64"),
            "score": (np.asarray(s.score, dtype=np.float64), "FP64"),
        }
        if s.p_value is not None and s.is_ood is not None:
            outputs["p_value"] = (s.p_value, "FP64")
            outputs["is_ood"] = (np.asarray(s.is_ood, dtype=bool), "BOOL")
        if s.maps is not None:
            outputs["anomaly_map"] = (s.maps.maps.astype(np.float32), "FP32")
            outputs["anomaly_mask"] = (s.maps.masks, "BOOL")
        out_params = {
            "num_samples": s.k,
            "seed": s.seed,
            "engine": s.engine,
            "score_name": s.score_name,
            "score_units": s.score_units,
            "fpr": s.fpr,
            "threshold": s.threshold,
            **({"pixel_threshold": s.maps.threshold, "anomaly_map_units": s.maps.units} if s.maps else {}),
        }
    return render(req, mv, v2_name, outputs, out_params)


def _requested(req: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    outs = req.get("outputs")
    if outs is None:
        return None
    if not isinstance(outs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) and isinstance(o.get("parameters") or {}, dict)
        for o in outs
    ):
        raise BadRequest("outputs must be a list of objects with a name (and optional parameters object)")
    return {o["name"]: (o.get("parameters") or {}) for o in outs}


def render(
    req: dict[str, Any], mv: ModelVersion, v2_name: str, outputs: dict[str, tuple[np.ndarray, str]], params: dict
) -> Reply:
    wanted = _requested(req)
    if wanted is not None:
        unknown = sorted(set(wanted) - set(outputs))
        if unknown:
            raise InvalidInput(f"unknown outputs {unknown}; this model gives {sorted(outputs)}", "outputs")
    binary_all = bool((req.get("parameters") or {}).get("binary_data_output", False))
    entries, blobs = [], []
    for name, (array, dtype) in outputs.items():
        if wanted is not None and name not in wanted:
            continue
        entry: dict[str, Any] = {"name": name, "datatype": dtype, "shape": list(array.shape)}
        as_binary = wanted.get(name, {}).get("binary_data", binary_all) if wanted is not None else binary_all
        if as_binary:
            raw = np.ascontiguousarray(array, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    body: dict[str, Any] = {"model_name": v2_name, "model_version": str(mv.version), "outputs": entries}
    if "id" in req:
        body["id"] = req["id"]
    if params:
        body["parameters"] = params
    head = orjson.dumps(body)  # a non-finite number becomes null (RFC 8259 JSON has none)
    if not blobs:
        return Reply(head)
    return Reply(head + b"".join(blobs), len(head))


# --- routes -------------------------------------------------------------------------------------


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict:
    return {
        "name": "vae-serve",
        "version": request.app.version,
        "extensions": ["binary_tensor_data", "model_configuration"],
    }


@router.get("/health/live", summary="Server liveness")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness")
async def ready(request: Request) -> JSONResponse:
    ok = bool(request.app.state.repository.ready)
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/models/{model}", summary="Model metadata (newest version)")
async def model_metadata(request: Request, model: str) -> dict:
    return metadata(request, model, None)


@router.get("/models/{model}/versions/{version}", summary="Model metadata of one version")
async def model_version_metadata(request: Request, model: str, version: str) -> dict:
    return metadata(request, model, version)


@router.get("/models/{model}/ready", summary="Model readiness")
async def model_ready(request: Request, model: str) -> dict:
    if not request.app.state.repository.ready:
        raise NotReady("no model is loaded yet")
    lookup(_core(request), model, None)
    return {"name": model, "ready": True}


@router.get("/models/{model}/versions/{version}/ready", summary="Model version readiness")
async def model_version_ready(request: Request, model: str, version: str) -> dict:
    lookup(_core(request), model, version)
    return {"name": model, "version": version, "ready": True}


@router.get("/models/{model}/config", summary="Triton model configuration (for perf_analyzer)")
async def model_config(request: Request, model: str) -> dict:
    return config(request, model, None)


@router.get("/models/{model}/versions/{version}/config", summary="Triton model configuration of one version")
async def model_version_config(request: Request, model: str, version: str) -> dict:
    return config(request, model, version)


async def _routed_infer(request: Request, model: str, version: str | None) -> Response:
    body = await request.body()
    disconnected = lambda: wait_disconnect(request.receive)  # noqa: E731
    reply = await infer(_core(request), model, version, body, request.headers.get(HEADER), disconnected)
    return reply.response()


@router.post("/models/{model}/infer", summary="Inference (JSON or binary tensor data)")
async def model_infer(request: Request, model: str) -> Response:
    return await _routed_infer(request, model, None)


@router.post("/models/{model}/versions/{version}/infer", summary="Inference on one version")
async def model_version_infer(request: Request, model: str, version: str) -> Response:
    return await _routed_infer(request, model, version)


# --- the inference lane -------------------------------------------------------------------------

INFER_PATHS = ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer")


class InferLane:
    """ASGI middleware, the outermost one of the app's own: POST .../infer is answered here, past the
    rest of the middleware stack and FastAPI's router.

    For one-image requests the HTTP machinery costs more than the inference: FastAPI's router (matching
    every route, solving the endpoint's parameters, its exception and exit-stack wrappers) took longer
    than the handler itself, and each middleware layer is a coroutine, a send wrapper and a replayed
    receive per request (README Performance). The lane applies the same policies in one frame: the API
    keys (ApiKeys), the body limit and timeout (BodyReader), the request metrics (labelled by the same
    route templates), the app's own exception handlers; it sends the reply as two ASGI messages. Only
    the two infer routes are matched, with their own path patterns. With CORS configured, a request that
    carries an Origin header takes the whole stack instead, so CORSMiddleware handles it. The routes stay
    declared above: they are what the OpenAPI document shows, and they answer those requests.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, keys: ApiKeys, reader: BodyReader, cors: bool) -> None:
        self.app, self.metrics, self.keys, self.reader, self.cors = app, metrics, keys, reader, cors
        self.routes = [r for r in router.routes if isinstance(r, APIRoute) and r.path in INFER_PATHS]
        assert len(self.routes) == len(INFER_PATHS), "the infer routes and INFER_PATHS disagree"

    def _match(self, scope: Scope) -> tuple[APIRoute, dict[str, str]] | None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/infer"):
            return None
        if self.cors and any(name == b"origin" for name, _ in scope["headers"]):
            return None
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # mounted below a prefix: match what the router would
            path = path[len(root) :]
        for route in self.routes:
            match = route.path_regex.match(path)
            if match:
                return route, match.groupdict()  # str parameters: Starlette's convertor leaves them as they are
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = self._match(scope)
        if matched is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        route, params = matched
        scope.update(route=route, endpoint=route.endpoint, path_params=params)
        status = 500  # what the metrics record when the client left before an answer (as MetricsMiddleware)
        try:
            try:
                reply = await self._answer(scope, receive, params)
                if reply is None:
                    return
                status = 200
                await send({"type": "http.response.start", "status": 200, "headers": reply.headers()})
                await send({"type": "http.response.body", "body": reply.body})
            except Exception as exc:  # noqa: BLE001 - rendered by the app's handler for it, as when routed
                handler = _handler_for(scope["app"].exception_handlers, exc)
                if handler is None:
                    raise
                response = await handler(Request(scope, receive, send), exc)
                status = response.status_code
                await response(scope, receive, send)
        finally:
            self.metrics.observe_request(route.path, "POST", status, time.perf_counter() - start)

    async def _answer(self, scope: Scope, receive: Receive, params: dict[str, str]) -> Reply | None:
        refused = self.keys.refusal(scope, routed=True)
        if refused is not None:
            raise refused
        body = await self.reader.read(scope, receive)
        if body is None:  # the client disconnected before sending all of it
            return None
        header_length = None
        for name, value in scope["headers"]:
            if name == HEADER_KEY:
                header_length = value.decode("latin-1")
        core: InferenceCore = scope["app"].state.core

        def disconnected() -> Awaitable[None]:
            return wait_disconnect(receive)

        return await infer(core, params["model"], params.get("version"), body, header_length, disconnected)


def _handler_for(handlers: dict[Any, Any], exc: Exception) -> Any:
    """The app's exception handler for exc, by its classes in order (as Starlette's private lookup does)."""
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
